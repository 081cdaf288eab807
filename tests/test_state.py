"""Issue 16: what the tools leave behind. Devices refused up front, every module's mode, the gradients and the
global random state given back, and arguments whose errors name them (one test per defect)."""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import batchlab
from batchlab.budget import memory_budget, probe_batch_size

NO_GPU = not torch.cuda.is_available()


def small_model():
    """A model with a BatchNorm (modes matter) and dropout (it draws from the global generator)."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))


def small_data(n=32):
    generator = torch.Generator().manual_seed(2)
    return TensorDataset(torch.randn(n, 4, generator=generator), torch.randint(0, 3, (n,), generator=generator))


def make_batch(n):
    return torch.randn(n, 4), torch.randint(0, 3, (n,))


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_weights(model, saved):
    return all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


# -- defect 2 and 10: devices ----------------------------------------------------------------------


def test_train_refuses_the_meta_device_before_touching_the_model():
    model = small_model()
    params, saved = list(model.parameters()), weights(model)
    with pytest.raises(ValueError, match="device 'meta' cannot train"):
        batchlab.train(model, small_data(), batch_size=8, steps=1, device="meta", progress=False)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert same_weights(model, saved) and next(model.parameters()).device.type == "cpu"


@pytest.mark.skipif(not NO_GPU, reason="these devices exist on this machine")
@pytest.mark.parametrize("device", ["cuda", "cuda:7", 0])
def test_a_gpu_device_without_a_gpu_is_refused_everywhere(device):
    model, data = small_model(), small_data()
    calls = [
        lambda: batchlab.train(model, data, batch_size=8, steps=1, device=device, progress=False),
        lambda: batchlab.evaluate(model, data, device=device),
        lambda: batchlab.profile_step(model, make_batch(4), device=device),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="is not available on this machine"):
            call()
    with memory_budget("64MiB", model):
        with pytest.raises(ValueError, match="is not available on this machine"):
            probe_batch_size(model, make_batch, device=device)


@pytest.mark.parametrize("device", ["tpu", "gpu0", True, 1.5])
def test_an_unknown_device_names_the_argument(device):
    model, data = small_model(), small_data()
    with pytest.raises((ValueError, TypeError), match="device must be a torch device such as 'cpu'"):
        batchlab.evaluate(model, data, device=device)
    with memory_budget("64MiB", model):
        with pytest.raises((ValueError, TypeError), match="device must be a torch device such as 'cpu'"):
            probe_batch_size(model, make_batch, device=device)


# -- defect 4: every module's train/eval flag ------------------------------------------------------


def frozen_bn_model():
    model = small_model().train()
    model[1].eval()  # a BatchNorm frozen on purpose
    return model


def modes(model):
    return [m.training for m in model.modules()]


def test_train_keeps_a_frozen_batchnorm_frozen():
    model = frozen_bn_model()
    before, stats = modes(model), model[1].running_mean.clone()
    batchlab.train(model, small_data(), batch_size=8, steps=2, progress=False, eval_dataset=small_data(8))
    assert modes(model) == before
    assert torch.equal(model[1].running_mean, stats)  # eval mode: its statistics were not updated


def test_evaluate_and_probe_batch_size_give_back_every_modules_flag():
    model = frozen_bn_model()
    before = modes(model)
    batchlab.evaluate(model, small_data())
    assert modes(model) == before
    with memory_budget("2MiB", model):
        probe_batch_size(model, make_batch, max_trials=4)
    assert modes(model) == before


# -- defect 7: the global random state -------------------------------------------------------------


@pytest.mark.parametrize("name", ["evaluate", "gradient_noise", "step_times", "probe_batch_size"])
def test_tools_do_not_advance_the_global_generator(name):
    model, data = small_model().train(), small_data()
    calls = {
        "evaluate": lambda: batchlab.evaluate(model, data),
        "gradient_noise": lambda: batchlab.gradient_noise(model, data, [4, 8], draws=2),
        "step_times": lambda: batchlab.step_times(model, data, [4], repeats=1),
        "probe_batch_size": lambda: probe_batch_size(model, make_batch, max_trials=3),
    }
    state = torch.get_rng_state()
    with memory_budget("64MiB", model) if name == "probe_batch_size" else warnings.catch_warnings():
        calls[name]()
    assert torch.equal(torch.get_rng_state(), state)


# -- defect 8: gradients ---------------------------------------------------------------------------


def with_gradients(model):
    nn.CrossEntropyLoss()(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
    return [(p.grad, p.grad.clone()) for p in model.parameters()]


def test_probe_batch_size_leaves_existing_gradients_bitwise_as_they_were():
    model = small_model()
    grads = with_gradients(model)
    with memory_budget("2MiB", model):
        probe_batch_size(model, make_batch, max_trials=4)
    assert all(p.grad is g and torch.equal(g, copy) for p, (g, copy) in zip(model.parameters(), grads))


def test_train_gives_back_the_gradients_after_a_failure():
    model = small_model()
    grads = with_gradients(model)
    saved = weights(model)

    calls = []

    def failing_loss(outputs, targets):  # the first step runs (a backward adds to .grad), the second fails
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a loss function that fails")
        return nn.functional.cross_entropy(outputs, targets)

    with pytest.raises(RuntimeError, match="a loss function that fails"):
        batchlab.train(model, small_data(), batch_size=8, steps=2, loss_fn=failing_loss, progress=False)
    assert all(p.grad is g and torch.equal(g, copy) for p, (g, copy) in zip(model.parameters(), grads))
    assert same_weights(model, saved)


# -- defect 9: the CPU without a budget, and the CPU allocator's own error -------------------------


def test_a_cpu_allocation_failure_counts_as_does_not_fit():
    model = small_model()

    def loss_fn(outputs, targets):
        if len(targets) > 8:
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: not enough memory: "
                "you tried to allocate 123456789 bytes."
            )
        return nn.functional.cross_entropy(outputs, targets)

    with memory_budget("1GiB", model):
        search = probe_batch_size(model, make_batch, loss_fn=loss_fn)
    assert search.batch_size == 8 and search.trials[-1][:2] == (16, False)


# -- defect 12: what train checks ------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss_fn", [lambda out, t: 1.5, lambda out, t: nn.functional.cross_entropy(out, t, reduction="none")]
)
def test_train_checks_what_loss_fn_returns(loss_fn):
    model = small_model()
    saved = weights(model)
    with pytest.raises(ValueError, match="loss_fn must return a scalar tensor"):
        batchlab.train(model, small_data(), batch_size=8, steps=1, loss_fn=loss_fn, progress=False)
    assert same_weights(model, saved)


def test_train_refuses_a_model_without_parameters():
    with pytest.raises(ValueError, match="model has no trainable parameters"):
        batchlab.train(nn.Identity(), small_data(), batch_size=8, steps=1, progress=False)


class OneBadItem(Dataset):
    """Sixteen good samples, except item 5."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return (torch.zeros(5) if i == 5 else torch.zeros(4)), 0


def test_a_bad_item_past_the_first_is_named():
    with pytest.raises(TypeError, match=r"dataset item 5 is .* with shapes \[\(5,\), \(\)\], but item 0"):
        batchlab.train(small_model(), OneBadItem(), batch_size=16, steps=1, progress=False)


def test_labels_out_of_range_and_inputs_of_the_wrong_shape_name_the_dataset():
    inputs = torch.randn(16, 4)
    with pytest.raises(ValueError, match="dataset has label 7, but the model has 3 outputs"):
        batchlab.train(
            small_model(), TensorDataset(inputs, torch.full((16,), 7)), batch_size=8, steps=1, progress=False
        )
    with pytest.raises(ValueError, match=r"dataset inputs of shape \(6,\) do not fit the model"):
        batchlab.train(
            small_model(),
            TensorDataset(torch.randn(16, 6), torch.zeros(16, dtype=torch.long)),
            batch_size=8,
            steps=1,
            progress=False,
        )


# -- defect 13: seeds ------------------------------------------------------------------------------


def test_a_seed_too_large_for_numpy_and_torch_is_refused_up_front():
    model, data = small_model(), small_data()
    huge = 2**64
    for call in (
        lambda: batchlab.train(model, data, batch_size=8, steps=1, seed=huge, progress=False),
        lambda: batchlab.build_model("mlp", seed=huge),
        lambda: batchlab.compare_gradients(model.train(), make_batch(8), 2, seed=huge),
        lambda: batchlab.gradient_noise(model, data, [4], seed=huge),
    ):
        with pytest.raises(ValueError, match="seed must be at most 4294967295"):
            call()


def test_setup_refuses_a_bad_seed_before_changing_anything():
    threads, state, deterministic = (
        torch.get_num_threads(),
        torch.get_rng_state(),
        torch.are_deterministic_algorithms_enabled(),
    )
    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match="seed must be at most"):
            batchlab.setup(seed=2**64)
        assert torch.get_num_threads() == 2
        assert torch.equal(torch.get_rng_state(), state)
        assert torch.are_deterministic_algorithms_enabled() == deterministic
    finally:
        torch.set_num_threads(threads)


# -- defect 14: nonsense that used to be accepted --------------------------------------------------


def test_nonsense_is_refused():
    model = batchlab.build_model("mlp", in_shape=(1, 8, 8))
    with pytest.raises(TypeError, match="batch inputs have dtype torch.int64"):
        batchlab.estimate_memory(model, (torch.zeros(4, 1, 8, 8, dtype=torch.long), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(ValueError, match="budget '1e99GB' is more memory than any machine has"):
        with memory_budget("1e99GB"):
            pass
    with pytest.raises(ValueError, match="budget '1e99GB' is more memory"):
        batchlab.max_batch_size(
            model, lambda n: (torch.zeros(n, 1, 8, 8), torch.zeros(n, dtype=torch.long)), budget="1e99GB"
        )
    with pytest.raises(TypeError, match="progress must be True or False"):
        batchlab.train(small_model(), small_data(), batch_size=8, steps=1, progress="no")
    with pytest.raises(TypeError, match="no_sync must be True or False"):
        batchlab.train_ddp("mlp", batchlab.datasets.digits(), batch_size=8, steps=1, no_sync="yes")


def test_a_diverging_run_warns():
    with pytest.warns(RuntimeWarning, match="lr=1e\\+30 is far larger"):
        history = batchlab.train(small_model(), small_data(), batch_size=8, steps=3, lr=1e30, progress=False)
    with pytest.warns(RuntimeWarning, match="training diverged"):
        batchlab.train(small_model(), small_data(), batch_size=8, steps=3, lr=1e30, progress=False)
    assert any(v != v or abs(v) == float("inf") for v in history.loss)


def test_training_without_progress_leaves_no_thread_behind():
    import threading

    from tqdm.auto import tqdm

    if getattr(tqdm, "monitor", None) is not None:
        pytest.skip("tqdm's monitor thread is already running in this process (an earlier bar started it)")
    before = {t.ident for t in threading.enumerate()}
    batchlab.train(small_model(), small_data(), batch_size=8, steps=2, progress=False)
    assert {t.name for t in threading.enumerate() if t.ident not in before} == set()  # tqdm's monitor never ends
