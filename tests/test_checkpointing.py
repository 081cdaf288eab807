"""Activation checkpointing through batchlab.checkpointed: same gradients, less memory, nothing half-applied."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import batchlab
from batchlab.tracker import recomputation


def _grads(model, x, y, seed=0):
    model.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same dropout masks for both runs
        F.cross_entropy(model(x), y).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


CASES = [
    ("cnn_bn", (1, 12, 12), lambda: torch.randn(6, 1, 12, 12)),
    ("resnet18", (3, 32, 32), lambda: torch.randn(2, 3, 32, 32)),
    ("transformer", (10,), lambda: torch.randint(0, 1000, (3, 10))),
]


@pytest.mark.parametrize("name, shape, make", CASES)
@pytest.mark.parametrize("segments", ["blocks", 2])
def test_checkpointed_gradients_equal_plain_gradients(name, shape, make, segments):
    model = batchlab.build_model(name, in_shape=shape)
    x, y = make(), torch.randint(0, 10, (3,)).repeat(2)[: len(make())]
    plain = _grads(model, x, y)
    wrapped = batchlab.checkpointed(model, segments)
    checked = _grads(wrapped, x, y)
    assert checked.keys() == {f"model.{k}" for k in plain}
    for key, grad in plain.items():
        torch.testing.assert_close(checked[f"model.{key}"], grad, rtol=1e-5, atol=1e-6)


def test_blocks_of_the_course_models():
    assert batchlab.checkpoint_blocks(batchlab.build_model("mlp")) == ["0", "1", "2", "3", "4", "5"]
    assert batchlab.checkpoint_blocks(batchlab.build_model("resnet18")) == [
        f"layer{i}.{j}" for i in range(1, 5) for j in range(2)
    ]
    assert batchlab.checkpoint_blocks(batchlab.build_model("transformer", in_shape=(8,))) == [
        "encoder.layers.0",
        "encoder.layers.1",
    ]
    wrapped = batchlab.checkpointed(batchlab.build_model("resnet18"), 3)
    assert wrapped.segments == [
        ["layer1.0", "layer1.1", "layer2.0"],
        ["layer2.1", "layer3.0", "layer3.1"],
        ["layer4.0", "layer4.1"],
    ]
    assert len(batchlab.checkpointed(batchlab.build_model("resnet18")).segments) == 8


def _untouched(model):
    return all("forward" not in m.__dict__ for m in model.modules())


def test_the_model_is_never_changed_even_when_a_forward_fails():
    model = batchlab.build_model("mlp", in_shape=(1, 4, 4))
    keys = list(model.state_dict())
    wrapped = batchlab.checkpointed(model, 2)
    assert _untouched(model) and list(model.state_dict()) == keys
    with pytest.raises(RuntimeError):
        wrapped(torch.randn(2, 3, 5, 5))  # wrong input size: the first Linear fails inside a segment
    assert _untouched(model)
    wrapped(torch.randn(2, 1, 4, 4)).sum().backward()
    assert _untouched(model)
    assert all(p.grad is not None for p in model.parameters())  # the wrapper trains the model's own weights


def test_a_forward_of_a_block_own_is_kept():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    calls = []
    original = model[0].forward

    def counted(x):
        calls.append(1)
        return original(x)

    model[0].forward = counted
    batchlab.checkpointed(model)(torch.randn(2, 3, requires_grad=True)).sum().backward()
    assert model[0].__dict__["forward"] is counted and calls  # used inside the checkpoint, then put back


def test_a_model_without_blocks_is_refused_with_how_to_wrap_its_layers():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.a(x).relu())

    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    message = r"Tiny has no blocks .* Put the layers to checkpoint in an nn.Sequential, or call torch.utils.checkpoint"
    with pytest.raises(ValueError, match=message):
        batchlab.checkpointed(model)
    with pytest.raises(ValueError, match=message):
        batchlab.train(model, data, batch_size=4, steps=1, progress=False, checkpointing="blocks")
    with pytest.raises(ValueError, match=message):
        batchlab.estimate_memory(model, (torch.randn(8, 4), torch.randint(0, 2, (8,))), checkpointing=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and _untouched(model)


@pytest.mark.parametrize("bad", [0, 7, -1, 1.5, "every", None, True])
def test_bad_segment_counts_are_refused(bad):
    with pytest.raises((ValueError, TypeError), match="segments must be"):
        batchlab.checkpointed(batchlab.build_model("mlp"), bad)


def test_checkpointing_twice_is_refused():
    with pytest.raises(ValueError, match="already checkpointed"):
        batchlab.checkpointed(batchlab.checkpointed(batchlab.build_model("mlp")))


def test_checkpointed_training_equals_plain_training():
    data = batchlab.datasets.shapes(64, image_size=12, channels=1, seed=0)
    runs = {}
    for checkpointing in (None, "blocks", 3):
        model = batchlab.build_model("cnn_bn", in_shape=(1, 12, 12))
        runs[checkpointing] = (
            batchlab.train(model, data, batch_size=16, steps=4, progress=False, checkpointing=checkpointing),
            model,
        )
        assert _untouched(model)
    plain, plain_model = runs[None]
    for checkpointing in ("blocks", 3):
        history, model = runs[checkpointing]
        assert history.loss == pytest.approx(plain.loss, rel=1e-5)
        for a, b in zip(model.state_dict().values(), plain_model.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_reentrant_checkpointing_loses_gradients_when_no_input_requires_grad():
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2))
    wrapped = batchlab.checkpointed(model[0], use_reentrant=True)  # only the first part is checkpointed
    x = torch.randn(3, 4)  # data: does not require grad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PyTorch's warning is the only hint
        model[1](wrapped(x)).sum().backward()
    assert model[0][0].weight.grad is None  # silently missing
    assert model[1].weight.grad is not None
    model.zero_grad(set_to_none=True)
    model[1](batchlab.checkpointed(model[0])(x)).sum().backward()  # the default, non-reentrant: all there
    assert model[0][0].weight.grad is not None


CPU_CASES = [
    ("cnn_bn", (1, 28, 28), lambda: torch.randn(32, 1, 28, 28), "blocks"),
    ("cnn_bn", (1, 28, 28), lambda: torch.randn(32, 1, 28, 28), 2),
    ("transformer", (32,), lambda: torch.randint(0, 1000, (8, 32)), "blocks"),
    ("resnet18", (3, 32, 32), lambda: torch.randn(8, 3, 32, 32), 2),
]


@pytest.mark.parametrize("name, shape, make, checkpointing", CPU_CASES)
def test_checkpointed_cpu_estimate_equals_cpu_measurement(name, shape, make, checkpointing):
    model = batchlab.build_model(name, in_shape=shape)
    inputs = make()
    batch = (inputs, torch.randint(0, 10, (len(inputs),)))
    measured = batchlab.profile_step(model, batch, checkpointing=checkpointing)
    estimated = batchlab.estimate_memory(model, batch, device="cpu", checkpointing=checkpointing)
    assert estimated.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.03)
    assert "checkpointed" in estimated.label and "checkpointed" in measured.label


def test_recomputed_activations_count_as_activations():
    model = batchlab.build_model("transformer", in_shape=(64,))
    batch = (torch.randint(0, 1000, (16, 64)), torch.randint(0, 10, (16,)))
    report = batchlab.estimate_memory(model, batch, device="cpu", checkpointing="blocks")
    backward = [e.bytes["activations"] for e in report.timeline if e.phase == "backward"]
    assert any(b > a for a, b in zip(backward, backward[1:]))  # recomputation adds activations in backward
    plain = batchlab.estimate_memory(model, batch, device="cpu")
    backward = [e.bytes["activations"] for e in plain.timeline if e.phase == "backward"]
    assert all(b <= a for a, b in zip(backward, backward[1:]))  # without it, backward only frees them
    assert report.peak_bytes < plain.peak_bytes


def test_recomputation_context_names_new_memory_activations():
    with batchlab.track_memory() as tracker:
        with recomputation():
            kept = torch.ones(256)
        other = torch.ones(128)
    assert tracker.report().breakdown["activations"] == kept.nbytes
    assert tracker.report().breakdown["temporaries"] == other.nbytes
    with recomputation():  # no tracker: nothing to tell
        pass


@pytest.mark.parametrize("bad", [0, 9, "every", 2.5])
def test_bad_checkpointing_arguments_name_the_argument(bad):
    model = batchlab.build_model("resnet18")
    batch = (torch.empty(2, 3, 32, 32, device="meta"), torch.zeros(2, dtype=torch.long, device="meta"))
    message = r"checkpointing must be None, 'blocks' or a number of segments from 1 to 8 \(the blocks of ResNet\)"
    with pytest.raises(ValueError, match=message):
        batchlab.estimate_memory(model, batch, checkpointing=bad)
    with pytest.raises(ValueError, match=message):
        batchlab.profile_step(model, (torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)), checkpointing=bad)
    assert _untouched(model)
