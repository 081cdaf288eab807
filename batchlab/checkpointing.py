"""Activation checkpointing, chapter 8's second lever: trade recomputation in backward for activation memory.

This module holds :func:`checkpointed` and the :class:`Checkpointed` wrapper it makes, :func:`checkpoint_blocks`
(which blocks a model has), :func:`check_checkpointing` and :func:`apply_checkpointing` (how ``train``,
``profile_step`` and the estimator take a ``checkpointing=`` argument), the recomputation helpers, and
:func:`tuning_label`, the part of a report's label that names both levers (precision and checkpointing).

:func:`checkpointed` wraps a model so that its blocks run under
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: a checkpointed block keeps only its
input for backward, and runs its forward a second time during backward to get the rest back.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext

from torch import nn
from torch.utils.checkpoint import checkpoint

from .precision import SimulatedAutocast, active_simulated_autocast
from .validation import check_bool, check_int, check_model


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
    from .tracker import recomputation  # tracker imports memory, which imports this module

    active = active_simulated_autocast()
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
