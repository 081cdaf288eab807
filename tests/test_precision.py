"""Mixed precision in the one training step, in train, in profile_step and in the estimator (chapter 8)."""

import math
import pathlib
import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import batchlab
from batchlab import precision as mixed_precision
from batchlab.steps import make_optimizer, train_step


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def _mlp():
    return batchlab.build_model("mlp", in_shape=(1, 8, 8))


def _train(precision, **kwargs):
    model = _mlp()
    history = batchlab.train(
        model, _data(), batch_size=16, steps=6, optimizer="adam", lr=1e-3, progress=False, precision=precision, **kwargs
    )
    return model, history


@pytest.mark.parametrize("bad", ["fp8", "half", None, "FP16", 16, torch.float16])
def test_bad_precision_is_refused_with_the_choices(bad):
    model = _mlp()
    batch = (torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = [
        lambda: batchlab.train(model, _data(), batch_size=16, steps=1, progress=False, precision=bad),
        lambda: train_step(model, make_optimizer("sgd", model.parameters()), *batch, precision=bad),
        lambda: batchlab.profile_step(model, batch, precision=bad),
        lambda: batchlab.estimate_memory(model, batch, precision=bad),
        lambda: batchlab.max_batch_size(
            model,
            lambda n: (torch.empty(n, 1, 8, 8, device="meta"), torch.empty(n, dtype=torch.long, device="meta")),
            budget="1GiB",
            precision=bad,
        ),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"precision must be one of 'fp32', 'bf16', 'fp16', got"):
            call()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_half_gets_a_hint():
    with pytest.raises(ValueError, match="say 'fp16' or 'bf16'"):
        mixed_precision.check_precision("half")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_training_equals_its_own_rerun(precision):
    model_a, first = _train(precision)
    model_b, second = _train(precision)
    assert first == second
    assert all(torch.equal(a, b) for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()))
    assert first.skipped_steps == []


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_changes_the_arithmetic_not_the_weights_dtype(precision):
    _, fp32 = _train("fp32")
    model, low = _train(precision)
    assert low.loss != fp32.loss  # the products really ran in low precision
    assert max(abs(a - b) for a, b in zip(low.loss, fp32.loss)) < 0.05  # and still trained the same model
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_train_step_runs_forward_in_low_precision_and_keeps_fp32_state(precision):
    model = _mlp()
    opt = make_optimizer("adam", model.parameters())
    seen = {}
    model[1].register_forward_hook(lambda m, i, out: seen.update(linear=out.dtype))
    scaler = mixed_precision.make_scaler("cpu", precision)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    loss = train_step(model, opt, x, y, precision=precision, scaler=scaler)
    assert seen["linear"] == mixed_precision.DTYPES[precision]
    assert math.isfinite(loss)
    state = [t for s in opt.state.values() for t in s.values() if t.dim() > 0]
    assert state and all(t.dtype == torch.float32 for t in state)
    assert not torch.is_autocast_enabled("cpu")  # the region ended with the loss


def test_fp16_without_a_scaler_is_refused():
    model = _mlp()
    with pytest.raises(ValueError, match="precision='fp16' needs a scaler"):
        train_step(
            model,
            make_optimizer("sgd", model.parameters()),
            torch.randn(4, 1, 8, 8),
            torch.randint(0, 10, (4,)),
            precision="fp16",
        )


def _inf_on_call(k):
    calls = []

    def loss_fn(out, target):
        calls.append(1)
        loss = F.cross_entropy(out, target)
        return loss * float("inf") if len(calls) == k else loss

    return loss_fn


def test_gradscaler_skips_a_step_with_an_inf_gradient():
    model = _mlp()
    opt = make_optimizer("sgd", model.parameters())
    scaler = torch.amp.GradScaler("cpu")
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    scale = scaler.get_scale()
    train_step(model, opt, x, y, precision="fp16", scaler=scaler, loss_fn=_inf_on_call(1))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # no update
    assert scaler.get_scale() < scale
    assert all(p.grad is None for p in model.parameters())  # still zeroed for the next step
    train_step(model, opt, x, y, precision="fp16", scaler=scaler)
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_train_reports_skipped_steps_in_history():
    _, history = _train("fp16", loss_fn=_inf_on_call(3))
    assert history.skipped_steps == [3]
    assert repr(history).endswith(", 1 skipped by GradScaler)")
    assert len(history.loss) == 6
    _, bf16 = _train("bf16", loss_fn=_inf_on_call(3))
    assert bf16.skipped_steps == []  # bf16 has no scaler: nothing is skipped (the inf goes into the weights)


def test_a_dtype_the_device_cannot_run_is_refused(monkeypatch):
    mixed_precision._autocast_works.cache_clear()
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    try:
        with pytest.raises(
            ValueError,
            match=r"precision='bf16' cannot run on cpu: PyTorch has no autocast .*"
            r"What works there: 'fp32'",
        ):
            batchlab.train(_mlp(), _data(), batch_size=16, steps=1, progress=False, precision="bf16")
    finally:
        mixed_precision._autocast_works.cache_clear()


def _output_dtypes(model, x, y, region):
    dtypes = {}

    def note(name, out):
        dtypes[name] = tuple(o.dtype for o in out if o is not None) if isinstance(out, tuple) else out.dtype

    handles = [
        m.register_forward_hook(lambda m, i, out, name=name: note(name, out))
        for name, m in model.named_modules()
        if name
    ]
    with region:
        dtypes["loss"] = F.cross_entropy(model(x), y).dtype
    for handle in handles:
        handle.remove()
    return dtypes


@pytest.mark.parametrize(
    "name, shape, make",
    [
        ("mlp", (1, 8, 8), lambda: torch.randn(4, 1, 8, 8)),
        ("cnn_bn", (1, 8, 8), lambda: torch.randn(4, 1, 8, 8)),
        ("transformer", (12,), lambda: torch.randint(0, 1000, (4, 12))),
    ],
)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_simulated_autocast_gives_the_dtypes_real_cpu_autocast_gives(name, shape, make, precision):
    model = batchlab.build_model(name, in_shape=shape)
    x, y = make(), torch.randint(0, 10, (4,))
    real = _output_dtypes(model, x, y, torch.autocast("cpu", dtype=mixed_precision.DTYPES[precision]))
    meta = batchlab.estimate._meta_copy(model)
    with mixed_precision.simulate_autocast_for("cpu"):
        simulated = _output_dtypes(meta, x.to("meta"), y.to("meta"), mixed_precision.autocast("meta", precision))
    assert simulated == real
    assert mixed_precision.DTYPES[precision] in real.values()


def test_cuda_policy_keeps_softmax_and_norms_in_fp32_unlike_cpu():
    cuda, cpu = mixed_precision.AUTOCAST_POLICIES["cuda"], mixed_precision.AUTOCAST_POLICIES["cpu"]
    assert cuda["linear"] == cpu["linear"] == cuda["conv2d"] == "low"
    assert cuda["softmax"] == "fp32_dtype" and "softmax" not in cpu
    assert cuda["layer_norm"] == "fp32" and "layer_norm" not in cpu
    assert cuda["cross_entropy"] == cpu["cross_entropy"] == "fp32"
    x = torch.randn(2, 3, device="meta", dtype=torch.bfloat16)
    with mixed_precision.SimulatedAutocast("cuda", torch.bfloat16):
        assert x.softmax(-1).dtype == torch.float32
        assert F.layer_norm(x, (3,)).dtype == torch.float32
        assert (x @ torch.randn(3, 3, device="meta")).dtype == torch.bfloat16
        assert torch.addcmul(x, x, torch.randn(2, 3, device="meta")).dtype == torch.float32  # promote
    with mixed_precision.SimulatedAutocast("cpu", torch.bfloat16):
        assert x.softmax(-1).dtype == torch.bfloat16


def test_cuda_policy_lists_every_public_op_of_the_installed_torch_autocast_header():
    """Canary: a PyTorch release that moves an operation between autocast's CUDA lists fails here."""
    header = pathlib.Path(torch.__file__).parent / "include" / "ATen" / "autocast_mode.h"
    if not header.exists():
        pytest.skip(f"this PyTorch build ships no {header.name}")
    text = header.read_text()
    lists = {
        "AT_FORALL_LOWER_PRECISION_FP": "low",
        "AT_FORALL_FP32": "fp32",
        "AT_FORALL_FP32_SET_OPT_DTYPE": "fp32_dtype",
        "AT_FORALL_PROMOTE": "promote",
    }
    checked = 0
    for macro, policy in lists.items():
        body = text.split(f"#define {macro}(_)")[1].split("\n\n")[0]
        for name in re.findall(r"_\((\w+)", body):
            public = (
                hasattr(torch.linalg, name[7:])
                if name.startswith("linalg_")
                else hasattr(torch, name) or hasattr(F, name) or hasattr(torch.Tensor, name)
            )
            if public:
                checked += 1
                assert mixed_precision.AUTOCAST_POLICIES["cuda"].get(name) == policy, (macro, name)
    assert checked > 60


def test_simulated_autocast_caches_one_copy_per_weight_per_region():
    layer = nn.Linear(4, 4, device="meta")
    x = torch.randn(2, 4, device="meta")
    with mixed_precision.SimulatedAutocast("cuda", torch.bfloat16) as region:
        layer(layer(x))
        assert len(region.cache) == 2  # weight and bias, cast once although used twice
        copy = region.cache[id(layer.weight)][1]
        assert copy.dtype == torch.bfloat16 and copy.requires_grad
    assert region.cache == {}  # emptied when the region ends, like autocast's cache
    with mixed_precision.SimulatedAutocast("cuda", torch.bfloat16) as outer:
        with mixed_precision.SimulatedAutocast("cuda", torch.bfloat16):
            layer(x)
        assert len(outer.cache) == 2  # a nested region shares the outermost one's cache and leaves it
    assert outer.cache == {}
