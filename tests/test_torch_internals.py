"""Canaries for the private PyTorch APIs behind batchlab.torch_internals.

Each test names the API it checks: when a PyTorch release renames or changes one, the failure says
which, and batchlab/torch_internals.py is the one file to adapt.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import batchlab
from batchlab import torch_internals
from batchlab.estimate import estimate_memory


class Recorder:
    """The names of the aten operations run inside the block (through the adapter's dispatch-mode base)."""

    def __init__(self):
        self.seen = []
        base = torch_internals.dispatch_mode_base()
        recorder = self

        class Mode(base):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                recorder.seen.append(func.overloadpacket.__name__)
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def test_dispatch_mode_base_still_sees_aten_operations():
    try:
        torch_internals.dispatch_mode_base()
    except ImportError as error:
        pytest.fail(f"torch.utils._python_dispatch.TorchDispatchMode is gone ({error}): adapt dispatch_mode_base")
    with Recorder() as recorder:
        torch.ones(3).add(1)
    assert "add" in recorder.seen and "ones" in recorder.seen, (
        f"a TorchDispatchMode no longer sees aten operations: {recorder.seen}"
    )


def test_lift_fresh_still_carries_tensors_built_from_data():
    with Recorder() as recorder:
        torch.tensor([1.0, 2.0])
    assert torch_internals.LIFT_FRESH.__name__ in recorder.seen, (
        f"torch.tensor(data) no longer passes through aten.lift_fresh (saw {recorder.seen}): the memory tracker "
        "would miss tensors built from Python data"
    )


def test_dataloader_worker_shutdown_still_exists():
    iterator = iter(DataLoader(TensorDataset(torch.arange(32.0)), batch_size=8, num_workers=1))
    try:
        assert torch_internals.has_workers(iterator) and callable(getattr(iterator, "_shutdown_workers", None)), (
            "torch changed DataLoader's private _workers / _shutdown_workers: adapt shutdown_workers"
        )
        next(iterator)
        assert any(w.is_alive() for w in iterator._workers)
    finally:
        torch_internals.shutdown_workers(iterator)
    assert not any(w.is_alive() for w in iterator._workers)
    assert not torch_internals.has_workers(iter(DataLoader(TensorDataset(torch.arange(4.0)), batch_size=2)))


def qkv(dtype=torch.float32, device="meta", length=64):
    return [torch.empty(2, 4, length, 32, dtype=dtype, device=device, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_gpu_attention_kernels_still_run_on_the_meta_device(dtype):
    query, key, value = qkv(dtype)
    out = torch_internals.fused_attention(query, key, value)
    assert out.shape == query.shape and out.dtype == dtype
    with Recorder() as recorder:
        torch_internals.fused_attention(
            query, key, value, attn_mask=torch.ones(64, 64, dtype=torch.bool, device="meta")
        )
    assert "_scaled_dot_product_efficient_attention" in recorder.seen, recorder.seen


def test_half_precision_attention_takes_the_flash_kernel():
    with Recorder() as recorder:
        torch_internals.fused_attention(*qkv(torch.bfloat16))
    assert "_scaled_dot_product_flash_attention" in recorder.seen, (
        f"bf16 attention without a mask should run FlashAttention, as on an NVIDIA GPU: {recorder.seen}"
    )
    with Recorder() as recorder:
        torch_internals.fused_attention(*qkv(torch.float32))
    assert "_scaled_dot_product_efficient_attention" in recorder.seen, recorder.seen


def test_the_cpu_flash_kernel_still_runs_and_matches_the_math_attention():
    torch.manual_seed(0)
    query, key, value = (torch.randn(2, 4, 16, 8) for _ in range(3))
    with Recorder() as recorder:
        out = torch_internals.cpu_attention(F.scaled_dot_product_attention, query, key, value)
    assert "_scaled_dot_product_flash_attention_for_cpu" in recorder.seen, recorder.seen
    torch.testing.assert_close(out, F.scaled_dot_product_attention(query, key, value))
    with Recorder() as recorder:  # with dropout the CPU runs the math attention
        torch_internals.cpu_attention(F.scaled_dot_product_attention, query, key, value, dropout_p=0.5)
    assert "_scaled_dot_product_flash_attention_for_cpu" not in recorder.seen


def test_attention_routing_is_undone_and_stays_in_its_thread():
    original = F.scaled_dot_product_attention
    with torch_internals.attention_kernels("cuda"):
        assert F.scaled_dot_product_attention is not original
        with Recorder() as recorder:
            F.scaled_dot_product_attention(*qkv(torch.bfloat16))
        assert "_scaled_dot_product_flash_attention" in recorder.seen
    assert F.scaled_dot_product_attention is original


def transformer_without_dropout(length):
    model = batchlab.build_model("transformer", in_shape=(length,))
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(module, torch.nn.MultiheadAttention):
            module.dropout = 0.0
    return model


def activations(model, length, device, dtype=None):
    tokens = torch.zeros(4, length, dtype=torch.long, device="meta")
    report = estimate_memory(model, (tokens, torch.zeros(4, dtype=torch.long, device="meta")), device=device)
    return report.breakdown["activations"]


def test_the_estimator_takes_the_dropout_free_cpu_attention_path():
    # Without dropout a CPU runs its flash kernel: saved memory grows with the sequence, not its square.
    growth = activations(transformer_without_dropout(1024), 1024, "cpu") / activations(
        transformer_without_dropout(1024), 512, "cpu"
    )
    assert 1.8 < growth < 2.2, growth
