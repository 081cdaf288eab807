"""The private PyTorch APIs batchlab relies on, all in one place.

PyTorch may rename or change anything whose name starts with an underscore without notice. Each
such API is used only here, behind a small public function, and ``tests/test_torch_internals.py``
has a canary test for each that fails loudly, naming the API, when a new PyTorch release changes it:

* :func:`dispatch_mode_base`: ``TorchDispatchMode``, the base of the memory tracker (documented in
  "Extending PyTorch", but it lives in a private module);
* :data:`LIFT_FRESH`: the operation through which ``torch.tensor(data)`` passes a freshly built tensor;
* :func:`shutdown_workers`: ``DataLoader``'s way of stopping its worker processes at once;
* :func:`attention_kernels`: the attention kernels a GPU or a CPU really runs (``aten`` operations
  whose names start with ``_``), swapped in for ``F.scaled_dot_product_attention`` while the memory
  estimator runs a step on the meta device.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch


def dispatch_mode_base():
    """The base class of Python dispatch modes: ``torch.utils._python_dispatch.TorchDispatchMode``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


# torch.tensor(data), torch.as_tensor and torch.from_numpy build their tensor outside the dispatcher and
# then pass it through this operation, which returns it as it is: its storage is new although it is
# also the operation's input.
LIFT_FRESH = torch.ops.aten.lift_fresh


def shutdown_workers(iterator) -> None:
    """Stop the worker processes of a multi-process ``DataLoader`` iterator now (its ``_shutdown_workers``)."""
    iterator._shutdown_workers()


def has_workers(iterator) -> bool:
    """True for the iterator of a ``DataLoader`` with worker processes (it has ``_workers``)."""
    return hasattr(iterator, "_workers")


_attention_lock = threading.Lock()
_attention_route = threading.local()  # the kernel choice of the estimate running in this thread


@contextmanager
def attention_kernels(device: str):
    """Make ``F.scaled_dot_product_attention`` run the kernel ``device`` would run, in this thread only.

    On the meta device PyTorch falls back to the "math" attention, which stores the full
    (length x length) attention matrix for backward. An NVIDIA GPU runs fused kernels instead
    (FlashAttention for half precision, the memory-efficient kernel for float32 or with a mask), which
    keep only the output and one log-sum-exp per query: that is why long sequences fit on a GPU. A CPU
    runs its own flash kernel when there is no dropout. ``nn.MultiheadAttention`` calls the function
    through the ``torch.nn.functional`` module, so the function is swapped there for the duration of the
    block; other threads keep the original.
    """
    functional = torch.nn.functional
    with _attention_lock:
        if getattr(functional.scaled_dot_product_attention, "_batchlab_original", None) is None:
            original = functional.scaled_dot_product_attention

            def routed(*args, **kwargs):
                route = getattr(_attention_route, "device", None)
                if route == "cuda":
                    return fused_attention(*args, **kwargs)
                if route == "cpu":
                    return cpu_attention(original, *args, **kwargs)
                return original(*args, **kwargs)

            routed._batchlab_original, routed._batchlab_users = original, 0
            functional.scaled_dot_product_attention = routed
        functional.scaled_dot_product_attention._batchlab_users += 1
    _attention_route.device = device
    try:
        yield
    finally:
        _attention_route.device = None
        with _attention_lock:
            routed = functional.scaled_dot_product_attention
            routed._batchlab_users -= 1
            if routed._batchlab_users == 0:
                functional.scaled_dot_product_attention = routed._batchlab_original


def cpu_attention(
    original, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """What a CPU runs: its flash kernel without dropout or a mask, else the math attention (``original``)."""
    if dropout_p or attn_mask is not None or enable_gqa:
        return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, is_causal, scale=scale)[0]


def fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """What an NVIDIA GPU runs: FlashAttention for half precision without a mask, else the memory-efficient kernel."""
    aten = torch.ops.aten
    if query.dtype in (torch.float16, torch.bfloat16) and attn_mask is None and query.shape[-1] <= 256:
        return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False, scale=scale)[0]
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # the kernel takes an additive bias
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            attn_mask.logical_not(), float("-inf")
        )
    return aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, query.requires_grad, dropout_p, is_causal, scale=scale
    )[0]
