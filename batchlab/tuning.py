"""The two levers of chapter 8: mixed precision and activation checkpointing.

**Mixed precision.** :func:`autocast` is the context :func:`batchlab.train_step` runs the forward pass
and the loss under: ``torch.autocast`` with bfloat16 or float16, on the inputs' device. Weights,
gradients and optimizer state stay float32; autocast runs the matrix products and convolutions in the
low precision (caching one low-precision copy of each weight for the forward pass) and keeps the
numerically delicate operations (softmax, losses, norms, sums, exp, ...) in float32. float16 has so
few exponent bits that small gradients underflow to zero, so it needs loss scaling
(``torch.amp.GradScaler``, see :func:`make_scaler`).

The memory estimator runs its step on the ``meta`` device, which autocast does not know. There,
:func:`autocast` gives a :class:`SimulatedAutocast` instead: the same cast policy, applied by a
``TorchFunctionMode`` above autograd (where autocast itself sits), from the op lists of PyTorch's
``aten/src/ATen/autocast_mode.cpp`` (:data:`AUTOCAST_POLICIES`).

**Activation checkpointing.** :func:`checkpointed` wraps a model so that its blocks run under
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: a checkpointed block keeps only its
input for backward, and runs its forward a second time during backward to get the rest back.
"""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from .validation import check_bool, check_int, check_model

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision, name: str = "precision") -> str:
    """Return ``precision`` if it is one of :data:`PRECISIONS`; else a ValueError listing them."""
    if isinstance(precision, str) and precision in PRECISIONS:
        return precision
    options = ", ".join(repr(p) for p in PRECISIONS)
    hint = " (for half precision say 'fp16' or 'bf16')" if precision in ("half", "float16", "bfloat16") else ""
    raise ValueError(f"{name} must be one of {options}, got {precision!r}{hint}")


@functools.cache
def _autocast_works(device_type: str, precision: str) -> str:
    """'' if PyTorch runs ``precision`` autocast on ``device_type`` here, else why not."""
    if not torch.amp.is_autocast_available(device_type):
        return f"PyTorch has no autocast for device type {device_type!r}"
    if device_type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        return "this GPU does not support bfloat16"
    try:
        with torch.autocast(device_type=device_type, dtype=DTYPES[precision]):
            probe = nn.functional.linear(torch.ones(2, 2, device=device_type), torch.ones(2, 2, device=device_type))
    except RuntimeError as error:
        return str(error).splitlines()[0]
    if probe.dtype != DTYPES[precision]:
        return f"autocast on {device_type} ran a matrix product in {probe.dtype}"
    return ""


def check_autocast(device_type: str, precision: str) -> None:
    """Raise a ValueError if PyTorch cannot run ``precision`` autocast on ``device_type`` (meta always works)."""
    if precision == "fp32" or device_type == "meta":
        return
    why = _autocast_works(device_type, precision)
    if why:
        works = [p for p in PRECISIONS if p == "fp32" or not _autocast_works(device_type, p)]
        raise ValueError(
            f"precision={precision!r} cannot run on {device_type}: {why}. What works there: "
            f"{', '.join(repr(p) for p in works)}"
        )


# -- the cast policy of torch.autocast, for the meta device -------------------------------------------

# Taken from PyTorch's aten/src/ATen/autocast_mode.cpp and autocast_mode.h (AT_FORALL_LOWER_PRECISION_FP,
# AT_FORALL_FP32, AT_FORALL_FP32_SET_OPT_DTYPE, AT_FORALL_PROMOTE and the AutocastCPU registrations), by
# the names the operations have in Python (F.cross_entropy is aten's cross_entropy_loss, ``a @ b`` matmul).
# "low": eligible float tensors cast to the low precision; "fp32": cast to float32; "fp32_dtype": float32
# unless a dtype is given (softmax, sums); "promote": all cast to the widest float type among them.
# Everything else runs in the dtype its inputs have (ReLU, BatchNorm, pooling, additions). The mode sees
# only the outermost torch function of a Python composite, so F.multi_head_attention_forward, which is
# not in autocast's lists but whose inner products (projections, attention) are, is listed as "low": its
# inputs and weights cast on entry give the dtypes autocast gives inside it (need_weights=False).
_LOW_CUDA = (
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_tbc",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "convolution",
    "_convolution",
    "prelu",
    "addmm",
    "addmv",
    "addr",
    "matmul",
    "__matmul__",
    "__rmatmul__",
    "einsum",
    "mm",
    "mv",
    "linalg_vecdot",
    "linear",
    "addbmm",
    "baddbmm",
    "bmm",
    "chain_matmul",
    "linalg_multi_dot",
    "lstm_cell",
    "gru_cell",
    "rnn_tanh_cell",
    "rnn_relu_cell",
    "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention",
    "multi_head_attention_forward",
)
_FP32_CUDA = (
    "acos",
    "asin",
    "cosh",
    "erfinv",
    "exp",
    "expm1",
    "log",
    "log10",
    "log2",
    "log1p",
    "reciprocal",
    "rsqrt",
    "sinh",
    "tan",
    "pow",
    "__pow__",
    "__rpow__",
    "softplus",
    "layer_norm",
    "native_layer_norm",
    "rms_norm",
    "frobenius_norm",
    "group_norm",
    "nuclear_norm",
    "cosine_similarity",
    "poisson_nll_loss",
    "cosine_embedding_loss",
    "nll_loss",
    "hinge_embedding_loss",
    "kl_div",
    "l1_loss",
    "smooth_l1_loss",
    "huber_loss",
    "mse_loss",
    "margin_ranking_loss",
    "multilabel_margin_loss",
    "soft_margin_loss",
    "triplet_margin_loss",
    "multi_margin_loss",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "dist",
    "pdist",
    "cdist",
    "renorm",
    "logsumexp",
    "interpolate",
    "norm",
)
_FP32_DTYPE_CUDA = (
    "prod",
    "softmax",
    "log_softmax",
    "cumprod",
    "cumsum",
    "linalg_vector_norm",
    "linalg_matrix_norm",
    "sum",
)
_PROMOTE_CUDA = (
    "addcdiv",
    "addcmul",
    "atan2",
    "bilinear",
    "cross",
    "dot",
    "vdot",
    "grid_sampler",
    "index_put",
    "tensordot",
    "scatter_add",
)
_LOW_CPU = (
    "conv1d",
    "conv2d",
    "conv3d",
    "bmm",
    "mm",
    "linalg_vecdot",
    "baddbmm",
    "addmm",
    "addbmm",
    "linear",
    "_convolution",
    "matmul",
    "__matmul__",
    "__rmatmul__",
    "conv_tbc",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "prelu",
    "scaled_dot_product_attention",
    "multi_head_attention_forward",
)
_FP32_CPU = (
    "avg_pool3d",
    "binary_cross_entropy",
    "grid_sampler",
    "polar",
    "prod",
    "quantile",
    "nanquantile",
    "stft",
    "cdist",
    "trace",
    "view_as_complex",
    "cholesky",
    "cholesky_inverse",
    "cholesky_solve",
    "inverse",
    "lu_solve",
    "orgqr",
    "ormqr",
    "pinverse",
    "max_pool3d",
    "max_unpool2d",
    "max_unpool3d",
    "adaptive_avg_pool3d",
    "mse_loss",
    "cosine_embedding_loss",
    "nll_loss",
    "hinge_embedding_loss",
    "poisson_nll_loss",
    "smooth_l1_loss",
    "cross_entropy",
    "l1_loss",
    "huber_loss",
    "margin_ranking_loss",
    "soft_margin_loss",
    "triplet_margin_loss",
    "multi_margin_loss",
    "ctc_loss",
    "kl_div",
    "multilabel_margin_loss",
    "binary_cross_entropy_with_logits",
)
_PROMOTE_CPU = ("stack", "cat", "index_copy")


def _policy_table(low, fp32, fp32_dtype, promote) -> dict:
    table = {name: "promote" for name in promote}
    table.update({name: "fp32_dtype" for name in fp32_dtype})
    table.update({name: "fp32" for name in fp32})
    table.update({name: "low" for name in low})
    return table


AUTOCAST_POLICIES = {
    "cuda": _policy_table(_LOW_CUDA, _FP32_CUDA, _FP32_DTYPE_CUDA, _PROMOTE_CUDA),
    "cpu": _policy_table(_LOW_CPU, _FP32_CPU, (), _PROMOTE_CPU),
}

_simulated = threading.local()  # .target: the device whose policy meta steps follow; .active: the region


class SimulatedAutocast(TorchFunctionMode):
    """``torch.autocast(target, dtype)`` for tensors on the meta device (which autocast does not serve).

    Every torch function named in ``AUTOCAST_POLICIES[target]`` gets its floating-point tensor arguments
    cast as autocast would cast them, through autograd (so backward sees the casts, as it sees
    autocast's). Low-precision copies of weights (float32 leaves that require grad) are made once per
    region and reused, like autocast's cache, which is emptied when the outermost region exits.
    """

    def __init__(self, target: str, dtype: torch.dtype):
        super().__init__()
        self.target, self.dtype = target, dtype
        self.policy = AUTOCAST_POLICIES[target]
        self.cache: dict = {}

    def __enter__(self):
        self.outer, _simulated.active = getattr(_simulated, "active", None), self
        if self.outer is not None:
            self.cache = self.outer.cache  # one cache for nested regions, as autocast has
        return super().__enter__()

    def __exit__(self, *exc):
        _simulated.active = self.outer
        if self.outer is None:
            self.cache.clear()  # autocast's clear_cache(): the copies live on only where backward saved them
        return super().__exit__(*exc)

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = self.policy.get(getattr(func, "__name__", ""))
        if rule is None:
            return func(*args, **kwargs)
        if rule == "fp32_dtype":
            if kwargs.get("dtype") is None and _eligible(args[0] if args else None):
                kwargs = {**kwargs, "dtype": torch.float32}
            return func(*args, **kwargs)
        if rule == "promote":
            floats = [t.dtype for t in _tensors(args, kwargs) if _eligible(t)]
            to = functools.reduce(torch.promote_types, floats) if floats else None
        else:
            to = self.dtype if rule == "low" else torch.float32
        done = {}  # one cast per tensor per call: F.multi_head_attention_forward tests `query is key`

        def cast(tensor):
            if id(tensor) not in done:
                done[id(tensor)] = self._cast(tensor, to, cache=rule == "low")
            return done[id(tensor)]

        return func(*_map(cast, args), **_map(cast, kwargs))

    def _cast(self, tensor, to, cache):
        if to is None or not _eligible(tensor) or tensor.dtype == to:
            return tensor
        if cache and tensor.dtype == torch.float32 and tensor.requires_grad and tensor.is_leaf:
            if id(tensor) not in self.cache:
                self.cache[id(tensor)] = (tensor, tensor.to(to))  # the tensor too: its id stays unique
            return self.cache[id(tensor)][1]
        return tensor.to(to)


def _eligible(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64


def _tensors(args, kwargs) -> list:
    found = []
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


def _map(fn, value):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map(fn, v) for v in value)
    if isinstance(value, dict):
        return {k: _map(fn, v) for k, v in value.items()}
    return value


@contextmanager
def simulate_autocast_for(target: str):
    """Meta-device steps in this block follow the autocast policy of ``target`` ("cuda" or "cpu")."""
    outer, _simulated.target = getattr(_simulated, "target", None), target
    try:
        yield
    finally:
        _simulated.target = outer


def autocast(device_type: str, precision: str):
    """The context the forward pass and loss run under for ``precision`` on ``device_type``.

    ``"fp32"``: nothing. Otherwise ``torch.autocast(device_type, dtype)``, or on the meta device a
    :class:`SimulatedAutocast` with the policy of the device being estimated (default CUDA).
    """
    check_precision(precision)
    if precision == "fp32":
        return nullcontext()
    if device_type == "meta":
        return SimulatedAutocast(getattr(_simulated, "target", None) or "cuda", DTYPES[precision])
    check_autocast(device_type, precision)
    return torch.autocast(device_type=device_type, dtype=DTYPES[precision])


def autocast_depth() -> int:
    """How many ``torch.autocast`` blocks the caller is in, active or not (PyTorch counts both)."""
    depth = torch.autocast_increment_nesting()
    torch.autocast_decrement_nesting()
    return depth - 1


def enclosing_autocast() -> str | None:
    """The precision of a ``torch.autocast`` region the caller is in ("bf16" / "fp16"), or None."""
    for device_type in ("cuda", "cpu"):
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))
    return None


# -- loss scaling ---------------------------------------------------------------------------------------


def make_scaler(device_type: str, precision: str):
    """The loss scaler a step of ``precision`` needs: a ``torch.amp.GradScaler`` for fp16, else None.

    On the meta device (the estimator) a :class:`MetaGradScaler` does the same tensor work without values.
    """
    check_precision(precision)
    if precision != "fp16":
        return None
    if device_type == "meta":
        return MetaGradScaler()
    return torch.amp.GradScaler(device_type)


class MetaGradScaler:
    """What ``torch.amp.GradScaler`` allocates, on the meta device: the scale and growth tracker (made at
    the first ``scale``), the scaled loss, ``1 / scale`` and a ``found_inf`` flag per step. Unscaling the
    gradients and checking them for inf or nan work in place; a meta step is never skipped."""

    def __init__(self, init_scale: float = 2.0**16):
        self.init_scale = init_scale
        self._scale = self._growth_tracker = None

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        if self._scale is None:
            self._scale = torch.full((), self.init_scale, dtype=torch.float32, device=loss.device)
            self._growth_tracker = torch.full((), 0, dtype=torch.int32, device=loss.device)
        return loss * self._scale

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        inv_scale = self._scale.double().reciprocal().float()
        found_inf = torch.full((), 0.0, dtype=torch.float32, device=self._scale.device)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        for grad in grads:  # GradScaler unscales (and checks) the gradients in place
            grad.mul_(inv_scale)
        del found_inf, inv_scale
        optimizer.step()

    def update(self) -> None:
        pass  # GradScaler updates its scale in place: no new memory

    def get_scale(self) -> float:
        return self.init_scale


# -- activation checkpointing -----------------------------------------------------------------------------


def checkpoint_blocks(model: nn.Module) -> list:
    """The names of the blocks of ``model`` that :func:`checkpointed` can checkpoint, in forward order.

    A block's output must be the next block's input: the children of an ``nn.Sequential``, the residual
    blocks of a torchvision ResNet (``layer1`` ... ``layer4``), the layers of an ``nn.TransformerEncoder``.
    """
    check_model(model)
    if isinstance(model, Checkpointed):
        return checkpoint_blocks(model.model)
    if isinstance(model, nn.Sequential):
        return [name for name, _ in model.named_children()]
    layers = [f"layer{i}" for i in range(1, 5)]
    if all(isinstance(getattr(model, name, None), nn.Sequential) for name in layers):
        return [f"{name}.{child}" for name in layers for child, _ in getattr(model, name).named_children()]
    encoders = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.TransformerEncoder)]
    if len(encoders) == 1:
        prefix = f"{encoders[0][0]}.layers" if encoders[0][0] else "layers"
        return [f"{prefix}.{i}" for i in range(len(encoders[0][1].layers))]
    return []


class Checkpointed(nn.Module):
    """``model`` with its blocks run under activation checkpointing; made by :func:`checkpointed`.

    It holds ``model`` itself (the same parameters: training the wrapper trains the model) and does not
    change it: during each forward call the first block of every segment is told to run the whole
    segment through ``torch.utils.checkpoint.checkpoint`` and the segment's other blocks to pass their
    input on; both are undone when the call returns, also when it fails. During the recomputation in
    backward, BatchNorm layers do not update their running statistics again (with ``use_reentrant=True``
    they do: PyTorch's reentrant checkpoint takes no recomputation context).
    """

    def __init__(self, model: nn.Module, segments: list, use_reentrant: bool):
        super().__init__()
        self.model = model
        self.segments = segments  # lists of block names
        self.use_reentrant = use_reentrant

    def forward(self, *args, **kwargs):
        patched = []  # (block, the forward its instance had of its own, if any)
        try:
            for names in self.segments:
                blocks = [self.model.get_submodule(name) for name in names]
                originals = [block.forward for block in blocks]
                patched += [(block, block.__dict__.get("forward")) for block in blocks]
                blocks[0].forward = functools.partial(self._run_segment, blocks, originals)
                for block in blocks[1:]:
                    block.forward = _pass_on
            return self.model(*args, **kwargs)
        finally:
            for block, own in reversed(patched):
                if own is None:
                    block.__dict__.pop("forward", None)
                else:
                    block.__dict__["forward"] = own

    def _run_segment(self, blocks, forwards, x, *args, **kwargs):
        def segment(x, *args, **kwargs):
            for forward in forwards:
                x = forward(x, *args, **kwargs)
            return x

        if self.use_reentrant:
            return checkpoint(segment, x, *args, use_reentrant=True, **kwargs)
        norms = [m for block in blocks for m in block.modules() if _tracks_running_stats(m)]
        return checkpoint(
            segment, x, *args, use_reentrant=False, context_fn=functools.partial(_contexts, norms), **kwargs
        )

    def extra_repr(self) -> str:
        return f"segments={len(self.segments)}, use_reentrant={self.use_reentrant}"


def _pass_on(x, *_args, **_kwargs):
    return x  # this block already ran inside the segment's checkpoint


def _tracks_running_stats(module) -> bool:
    return getattr(module, "track_running_stats", False) and getattr(module, "num_batches_tracked", None) is not None


def _contexts(norms):
    """Contexts for a checkpointed segment's forward and for its recomputation during backward.

    The recomputation runs in backward, outside the forward's autocast region: ``checkpoint`` restores a
    real ``torch.autocast`` itself; a simulated one (meta device) is restored here. BatchNorm layers
    normalise with the batch's statistics again but must not update their running statistics a second
    time. A memory tracker is told that what the recomputation makes is activations.
    """
    from .tracker import recomputation  # the tracker imports memory, which imports steps, which imports this module

    active = getattr(_simulated, "active", None)
    simulated = SimulatedAutocast(active.target, active.dtype) if active is not None else nullcontext()
    return nullcontext(), _recomputing(simulated, norms, recomputation())


@contextmanager
def _recomputing(simulated, norms, tracked):
    saved = [(norm.momentum, norm.num_batches_tracked.clone()) for norm in norms]
    for norm in norms:
        norm.momentum = 0.0  # running statistics times 1, plus the batch's times 0: left exactly as they are
    try:
        with simulated, tracked:
            yield
    finally:
        for norm, (momentum, count) in zip(norms, saved):
            norm.momentum = momentum
            norm.num_batches_tracked.copy_(count)  # the forward pass counted this batch already


def checkpointed(model: nn.Module, segments="blocks", *, use_reentrant: bool = False) -> Checkpointed:
    """``model`` with activation checkpointing: a wrapper whose forward checkpoints the model's blocks.

    ``segments="blocks"`` checkpoints every block (see :func:`checkpoint_blocks`); a number ``k`` cuts the
    ``n`` blocks into ``k`` contiguous segments of about ``n / k`` blocks, each checkpointed as a whole
    (backward then holds the ``k`` segment inputs plus one segment's activations: ``k = sqrt(n)`` keeps
    the least). ``use_reentrant=False`` (PyTorch's recommended implementation) is the default; the
    reentrant one silently computes no gradients when no input of a segment requires grad (chapter 8).
    The model is not changed; the wrapper shares its parameters.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_bool("use_reentrant", use_reentrant)
    if isinstance(model, Checkpointed):
        raise ValueError("model is already checkpointed: pass its .model to checkpoint it differently")
    names = checkpoint_blocks(model)
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no blocks batchlab knows how to checkpoint (the children of an "
            f"nn.Sequential, a ResNet's layer1..layer4, an nn.TransformerEncoder's layers). Put the layers to "
            f"checkpoint in an nn.Sequential, or call torch.utils.checkpoint.checkpoint(layer, x, "
            f"use_reentrant=False) in its forward yourself"
        )
    if segments == "blocks":
        segments = len(names)
    elif isinstance(segments, str) or segments is None:
        raise ValueError(f"segments must be 'blocks' or a number of segments from 1 to {len(names)}, got {segments!r}")
    check_int("segments", segments, minimum=1, maximum=len(names))
    bounds = [-(-i * len(names) // segments) for i in range(segments + 1)]  # earlier segments get any extra
    return Checkpointed(model, [names[a:b] for a, b in zip(bounds, bounds[1:])], use_reentrant)


def check_checkpointing(model: nn.Module, checkpointing):
    """Return ``checkpointing`` if :func:`apply_checkpointing` can use it on ``model``; else the error, naming it."""
    if checkpointing is None:
        return None
    try:
        checkpointed(model, checkpointing)
    except (TypeError, ValueError) as error:
        if "segments must be" not in str(error):
            raise  # no blocks, or already checkpointed: the message says what to do
        count = len(checkpoint_blocks(model))
        raise ValueError(
            f"checkpointing must be None, 'blocks' or a number of segments from 1 to {count} "
            f"(the blocks of {type(model).__name__}), got {checkpointing!r}"
        ) from None
    return checkpointing


def apply_checkpointing(model: nn.Module, checkpointing) -> nn.Module:
    """``model`` itself for ``checkpointing=None``, else :func:`checkpointed` (``"blocks"`` or a segment count)."""
    return model if checkpointing is None else checkpointed(model, checkpointing)


def tuning_label(precision: str, checkpointing) -> str:
    """The part of a report's label that names the levers: ``", bf16, checkpointed (blocks)"`` or ``""``."""
    parts = [precision] if precision != "fp32" else []
    if checkpointing is not None:
        parts.append(f"checkpointed ({checkpointing if checkpointing == 'blocks' else f'{checkpointing} segments'})")
    return "".join(f", {part}" for part in parts)
