"""The simulated memory budget, the probing batch-size search, and out-of-memory recovery in train."""

import pytest
import torch

import batchlab
from batchlab import datasets
from batchlab.budget import memory_budget, probe_batch_size


def cnn():
    return batchlab.build_model("cnn_bn", in_shape=(3, 32, 32), num_classes=5)


def make_batch(n):
    return torch.randn(n, 3, 32, 32), torch.randint(0, 5, (n,))


def test_a_step_over_budget_raises_a_real_out_of_memory_error():
    model = cnn()
    with memory_budget("40MiB", model) as tracker:
        with pytest.raises(torch.OutOfMemoryError) as caught:
            model(torch.randn(512, 3, 32, 32))
        message = str(caught.value)
        # While the exception (and its traceback) is kept, the failed step's tensors stay alive, but not the
        # block that was refused: what is held is what the message says was in use before it.
        held = tracker.current()
        assert held["inputs"] == 512 * 3 * 32 * 32 * 4
        assert held["temporaries"] == 0 and held["activations"] == 0  # the refused block was the first output
        assert f"{tracker.current_bytes / 2**20:.2f} MiB is in use by tensors" in message
        del caught
        # ... and once it is gone, their memory is free again.
        assert tracker.current()["temporaries"] == 0 and tracker.current()["inputs"] == 0
    # CUDA's opening words (the tools that match CUDA's text recognise it), then who simulated it.
    assert message.startswith("CUDA out of memory. Tried to allocate 64.00 MiB. (Simulated by batchlab.memory_budget")
    assert "no GPU ran out of memory" in message
    assert "Tried to allocate 64.00 MiB" in message and "Of the 40.00 MiB budget" in message
    assert "The 64.00 MiB were not allocated" in message
    assert "parameters 2.08 MiB" in message and "inputs 6.00 MiB" in message
    out = model(torch.randn(512, 3, 32, 32))  # after the block nothing is limited
    assert out.shape == (512, 5)


def test_what_the_forward_pass_saves_counts_as_activations_and_the_refused_block_is_not_held():
    model = batchlab.build_model("cnn_bn", in_shape=(1, 28, 28))
    inputs = torch.randn(256, 1, 28, 28)
    first_output = 256 * 32 * 28 * 28 * 4  # the first convolution's output, which BatchNorm saves
    with memory_budget("48MiB", model) as tracker:
        with pytest.raises(torch.OutOfMemoryError) as caught:
            model(inputs).sum().backward()
        held = tracker.current()
        assert held["activations"] >= first_output and held["temporaries"] == 0
        assert f"activations {held['activations'] / 2**20:.2f} MiB" in str(caught.value)
        refused = float(str(caught.value).split("Tried to allocate ")[1].split(" MiB")[0]) * 2**20
        assert tracker.current_bytes + refused > 48 * 2**20 >= tracker.current_bytes
        del caught
        assert tracker.current()["activations"] == 0


def test_a_step_within_budget_runs_and_the_tracker_uninstalls():
    model = cnn()
    with memory_budget("40 MiB", model) as tracker:
        model(torch.randn(8, 3, 32, 32)).sum().backward()
        assert 0 < tracker.current_bytes <= 40 * 2**20
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)  # the backward ran
    assert not tracker.active
    # The budget's tracker is gone: a new one may start, and a batch whose first output alone (64 MiB)
    # passes the old budget goes through.
    with batchlab.track_memory() as fresh:
        big = torch.randn(512, 3, 32, 32) * 1
        assert fresh.current_bytes >= big.numel() * 4
    assert model(big).shape == (512, 5)


def test_a_budget_below_the_parameters_is_refused():
    with pytest.raises(ValueError, match=r"smaller than what exists already.*parameters 2.08 MiB"):
        with memory_budget("1MiB", cnn()):
            pass
    with pytest.raises(ValueError, match="is not a memory size"):
        with memory_budget("a lot"):
            pass


@pytest.mark.parametrize("mode", ["power", "binsearch"])
def test_probe_batch_size_restores_model_and_optimizer_bitwise(mode):
    model = cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batchlab.train(model, datasets.shapes(64), batch_size=32, steps=1, optimizer=lambda p: optimizer, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    before_momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    with memory_budget("48MiB", model, optimizer):
        search = probe_batch_size(model, make_batch, mode=mode, optimizer=optimizer)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    after_momentum = [optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    assert all(torch.equal(b, a) for b, a in zip(before_momentum, after_momentum))
    assert [n for n, _, _ in search.trials][:3] == [2, 4, 8]
    fitted = [n for n, ok, _ in search.trials if ok]
    failed = [n for n, ok, _ in search.trials if not ok]
    assert search.batch_size == max(fitted) and failed and min(failed) > search.batch_size
    if mode == "binsearch":
        assert min(failed) - search.batch_size == 1  # bisected down to neighbours


def test_probe_batch_size_checks_its_arguments():
    with pytest.raises(ValueError, match="mode must be one of 'power', 'binsearch'"):
        probe_batch_size(cnn(), make_batch, mode="random")
    model = cnn()
    with pytest.raises(ValueError, match=r"make_batch\(2\) must return 2 samples"):
        with memory_budget("48MiB", model):
            probe_batch_size(model, lambda n: make_batch(n + 1))
    with pytest.raises(ValueError, match="probe_batch_size on the CPU needs a memory_budget block"):
        probe_batch_size(model, make_batch)  # without a budget the search would grow until the machine runs out


def test_train_halves_the_micro_batch_on_out_of_memory():
    data = datasets.digits()
    recovered = batchlab.build_model("mlp", in_shape=(1, 8, 8))
    reference = batchlab.build_model("mlp", in_shape=(1, 8, 8))
    with memory_budget("5MiB", recovered):
        history = batchlab.train(recovered, data, batch_size=512, steps=4, on_oom="halve", progress=False)
    assert history.notes and all("effective batch is still 512" in note for note in history.notes)
    halvings = len(history.notes)
    expected = batchlab.train(reference, data, batch_size=512, steps=4, accumulation_steps=2**halvings, progress=False)
    for p, q in zip(recovered.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert history.loss == pytest.approx(expected.loss, rel=1e-5)


def test_halving_stops_at_one_sample_per_micro_batch():
    """Batch 3: 1 micro-batch, then 2 (of 2 and 1 samples), then 3 of one sample each, not 4 (more micro-batches
    than samples, which train_step refuses). Small weights, large activations: only the activations halve."""
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 5, (6,), generator=g)
    data = torch.utils.data.TensorDataset(images, labels)

    def net():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return torch.nn.Sequential(
                torch.nn.Conv2d(3, 32, 3, padding=1),
                torch.nn.ReLU(),
                torch.nn.Conv2d(32, 32, 3, padding=1),
                torch.nn.ReLU(),
                torch.nn.AdaptiveAvgPool2d(1),
                torch.nn.Flatten(),
                torch.nn.Linear(32, 5),
            )

    recovered, reference = net(), net()
    weights = sum(p.numel() * 4 for p in recovered.parameters())
    with memory_budget(weights + 900 * 2**10, recovered):  # room for one sample's activations, not two
        history = batchlab.train(recovered, data, batch_size=3, steps=1, on_oom="halve", progress=False)
    assert [note.split("; now ")[1].split(" of")[0] for note in history.notes] == ["2 micro-batches", "3 micro-batches"]
    batchlab.train(reference, data, batch_size=3, steps=1, accumulation_steps=3, progress=False)
    for p, q in zip(recovered.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_train_without_on_oom_lets_the_error_through_and_restores_the_model():
    model = batchlab.build_model("mlp", in_shape=(1, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with memory_budget("5MiB", model):
        with pytest.raises(torch.OutOfMemoryError):
            batchlab.train(model, datasets.digits(), batch_size=512, steps=2, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="on_oom must be None"):
        batchlab.train(model, datasets.digits(), batch_size=64, steps=1, on_oom="skip", progress=False)


# -- issue 16 defect 3: batchlab's tools inside a budget ------------------------------------------------


def test_profile_step_inside_a_budget_reports_and_its_memory_counts_against_the_budget():
    model = cnn()
    batch = make_batch(8)
    alone = batchlab.profile_step(model, batch)
    with memory_budget("40MiB", model) as tracker:
        before = tracker.current()
        nested = batchlab.profile_step(model, batch)
        assert tracker.current() == before  # what the nested step made is freed, and booked as freed
        # A budget too small for the nested step (its model copy, optimizer state and activations) refuses it.
        with pytest.raises(torch.OutOfMemoryError, match="Simulated by batchlab.memory_budget") as caught:
            batchlab.profile_step(model, make_batch(512))
        assert "Of the 40.00 MiB budget" in str(caught.value)
        del caught
        assert tracker.current() == before  # once the error is gone, nothing of the failed step is counted
        assert tracker.active and tracker._observer.live == sum(before.values())  # the budget's own count too
    assert (nested.peak_bytes, nested.breakdown) == (alone.peak_bytes, alone.breakdown)
    assert before["parameters"] == sum(p.numel() * 4 for p in model.parameters())


def test_the_nested_step_alone_passes_a_budget_that_the_model_fits():
    """The budget counts profile_step's copy of the model and its step: a budget with room for the model
    and not for the copy plus the step raises, though the model alone fits."""
    model = cnn()
    batch = make_batch(8)
    step_peak = batchlab.profile_step(model, batch).peak_bytes
    model_bytes = sum(p.numel() * 4 for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    with memory_budget(model_bytes + step_peak // 2, model):
        with pytest.raises(torch.OutOfMemoryError):
            batchlab.profile_step(model, batch)
    with memory_budget(model_bytes + 2 * step_peak, model):
        batchlab.profile_step(model, batch)


def test_the_estimators_meta_step_inside_a_budget_costs_nothing():
    model, batch = cnn(), make_batch(4096)  # made before the block: its 48 MiB do not count
    with memory_budget("3MiB", model) as tracker:
        before = tracker.current()
        report = batchlab.estimate_memory(model, batch, device="cpu")
        assert tracker.current() == before
    assert report.peak_bytes > 3 * 2**20  # far more than the budget, estimated on meta tensors
