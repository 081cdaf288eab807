"""One training step, written once (chapter 1 introduces it, chapter 6 reads it line by line).

A *step* is one optimizer update on one effective batch: the batch is split into micro-batches, each
micro-batch's loss is weighted by its share of the samples and back-propagated (the gradients add up
in ``.grad``), then ``optimizer.step()`` and ``zero_grad(set_to_none=True)``. :func:`train_step` is the
only place batchlab writes it: :func:`batchlab.train`, the explorer's runs, the DDP loop, the
estimator's step on the meta device, :func:`batchlab.profile_step`, the batch-size finder's trials,
:func:`batchlab.step_times` and the accumulation tools all call it, so what a chapter measures is the
step that training runs.

:func:`make_optimizer` builds the optimizers the course names, from one table of defaults
(:data:`OPTIMIZERS`).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from .precision import autocast, check_precision
from .validation import check_batch, check_float, check_int, check_loss_fn, check_trainable, describe

# The optimizers the course names, with their default settings. A learner passes the name, or a
# function ``params -> torch.optim.Optimizer`` for anything else.
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {"lr": 1e-3}),
}


def check_optimizer(optimizer, name: str = "optimizer"):
    """Return ``optimizer`` if it is a name in :data:`OPTIMIZERS` or a function ``params -> Optimizer``."""
    if isinstance(optimizer, str) and optimizer in OPTIMIZERS:
        return optimizer
    if callable(optimizer) and not isinstance(optimizer, (str, torch.optim.Optimizer)):
        return optimizer
    names = ", ".join(repr(n) for n in OPTIMIZERS)
    raise ValueError(f"{name} must be {names} or a function params -> torch.optim.Optimizer, got {optimizer!r}")


def make_optimizer(optimizer, params, *, lr: float | None = None, foreach: bool | None = None) -> torch.optim.Optimizer:
    """The optimizer ``optimizer`` names (see :data:`OPTIMIZERS`) over ``params``.

    ``lr`` replaces the table's learning rate; ``foreach`` picks PyTorch's multi-tensor implementation
    (``True``, what PyTorch uses on a GPU), the one-tensor-at-a-time loop (``False``) or PyTorch's
    default (``None``). A function ``params -> Optimizer`` is called as it is.
    """
    check_optimizer(optimizer)
    if callable(optimizer):
        built = optimizer(params)
        if not isinstance(built, torch.optim.Optimizer):
            raise TypeError(f"optimizer(params) must return a torch.optim.Optimizer, got {type(built).__name__}")
        return built
    cls, defaults = OPTIMIZERS[optimizer]
    settings = dict(defaults)
    if lr is not None:
        settings["lr"] = check_float("lr", lr)
    if foreach is not None:
        settings["foreach"] = foreach
    return cls(params, **settings)


def micro_batches(inputs: torch.Tensor, targets: torch.Tensor, accumulation_steps) -> list:
    """``(inputs, targets)`` cut into micro-batches (views, no copy).

    ``accumulation_steps`` is a number of micro-batches (``tensor.chunk``: equal sizes when it divides
    the batch) or a list of their sizes, for uneven ones such as ``[16, 16, 16, 2]``. ``inputs`` may be a
    dict of keyword inputs: each micro-batch is then a dict of the same keys.
    """
    if isinstance(accumulation_steps, (list, tuple)):
        cut = lambda tensor: tensor.split(list(accumulation_steps))
    else:
        cut = lambda tensor: tensor.chunk(accumulation_steps)
    if isinstance(inputs, dict):  # keyword inputs: every tensor cut the same way
        pieces = {key: cut(value) for key, value in inputs.items()}
        parts = [dict(zip(pieces, values)) for values in zip(*pieces.values())]
        return list(zip(parts, cut(targets)))
    return list(zip(cut(inputs), cut(targets)))


def check_accumulation(accumulation_steps, batch_size: int):
    """``accumulation_steps`` as :func:`train_step` takes it for a batch of ``batch_size``: a number of
    micro-batches (at most one per sample) or a list of micro-batch sizes that add up to the batch."""
    if isinstance(accumulation_steps, (list, tuple)):
        sizes = [check_int(f"accumulation_steps[{i}]", size, minimum=1) for i, size in enumerate(accumulation_steps)]
        if not sizes or sum(sizes) != batch_size:
            raise ValueError(
                f"accumulation_steps as micro-batch sizes must add up to the batch ({batch_size}), "
                f"got {list(accumulation_steps)} (sum {sum(sizes)})"
            )
        return accumulation_steps
    return check_int("accumulation_steps", accumulation_steps, minimum=1, maximum=batch_size)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    loss_fn=None,
    accumulation_steps=1,
    no_sync=None,
    precision="fp32",
    scaler=None,
) -> float:
    """One optimizer step of ``model`` on the effective batch ``(inputs, targets)``; returns its mean loss.

    ``accumulation_steps``: how many micro-batches the batch is split into (or their sizes, see
    :func:`micro_batches`). Only one micro-batch's activations are alive at a time, so the step needs
    less memory; because each loss is weighted by its micro-batch's share of the samples, the summed
    gradients are exactly the gradient of the mean loss over the whole batch (chapter 6).
    ``loss_fn(output, targets)`` returns the *mean* loss of a micro-batch (default: cross-entropy on the
    output's logits, :class:`batchlab.losses.DefaultLoss`); ``inputs`` may be a dict, ``model(**inputs)``.
    ``no_sync``: DDP's ``model.no_sync``, entered for every micro-batch but the last so that gradients are all-reduced
    once per step (chapter 7). On the meta device (the memory estimator) losses have no value: the
    result is ``nan``.

    ``precision`` (chapter 8): ``"fp32"``, or ``"bf16"`` / ``"fp16"`` to run the forward pass and the loss
    under ``torch.autocast`` (weights, gradients and optimizer state stay float32). fp16 needs a
    ``scaler`` (``torch.amp.GradScaler``): the loss is multiplied by its scale before backward so that
    small gradients do not underflow, and ``scaler.step`` unscales them and skips the update when one
    is inf or nan (``scaler.get_scale()`` is then lowered: :func:`batchlab.train` reports such steps).

    A wrong argument (an optimizer built for another model, targets of another length, more micro-batches
    than samples) raises ``ValueError`` or ``TypeError`` naming it, before the model or optimizer change.
    """
    # Every argument is checked before anything changes (cheaply: nothing is read from the device).
    loss_fn = check_step_args(
        model, optimizer, inputs, targets, loss_fn, accumulation_steps, no_sync, precision, scaler
    )
    step_loss = 0.0
    parts = micro_batches(inputs, targets, accumulation_steps)
    for i, (micro_inputs, micro_targets) in enumerate(parts):
        keep_local = no_sync is not None and i < len(parts) - 1
        with no_sync() if keep_local else nullcontext():  # DDP: all-reduce only after the last micro-batch
            with autocast(micro_targets.device.type, precision):  # low precision for forward and loss only
                # The output reaches loss_fn as the model returns it (a tensor, tuple, dict or .logits object).
                outputs = model(**micro_inputs) if isinstance(micro_inputs, dict) else model(micro_inputs)
                loss = _scalar(loss_fn(outputs, micro_targets))
                del outputs  # the graph keeps what backward needs
            # Weight each micro-batch by its share of the batch: the summed gradients are then
            # exactly the gradient of the mean loss over the whole effective batch.
            share = len(micro_targets) / len(targets)
            weighted = loss * share if scaler is None else scaler.scale(loss * share)  # fp16: scaled up
            weighted.backward()  # adds to .grad; frees this micro-batch's graph
            del weighted  # the scaled loss too, before the next micro-batch
        step_loss += _value(loss) * share  # a number, not the graph
        del loss  # and not the loss tensor either, while the next micro-batch runs
    if scaler is None:
        optimizer.step()  # one update per effective batch
    else:
        scaler.step(optimizer)  # unscales the gradients; skips the update if one is inf or nan
        scaler.update()  # lowers the scale after a skipped step, raises it after many good ones
    optimizer.zero_grad(set_to_none=True)  # free the gradients until the next batch's first backward
    return step_loss


def check_step_args(model, optimizer, inputs, targets, loss_fn, accumulation_steps, no_sync, precision, scaler):
    """The arguments of :func:`train_step`, checked before the step changes anything; returns ``loss_fn``
    (cross-entropy when None). Cheap enough for every step: nothing is read from a device, and the
    optimizer is matched to the model by its first parameter (found among the model's by identity)."""
    check_trainable(model)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer over the model's parameters, e.g. "
            f"batchlab.make_optimizer('sgd', model.parameters()), got {_shown(optimizer)}"
        )
    first = next((p for group in optimizer.param_groups for p in group["params"]), None)
    if first is None or not any(p is first for p in model.parameters()):
        raise ValueError(
            f"optimizer does not update model ({type(model).__name__}): its parameters belong to another model "
            f"(or to a copy of this one). Build it over this model's: torch.optim.SGD(model.parameters(), lr=0.01)"
        )
    keyword = isinstance(inputs, dict) and inputs and all(isinstance(v, torch.Tensor) for v in inputs.values())
    if not (keyword or isinstance(inputs, torch.Tensor)):
        raise TypeError(
            f"inputs must be a tensor with the samples along dim 0, or a dict of such tensors (the keyword "
            f"inputs of model(**inputs)), got {describe(inputs)}"
        )
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor with one target per sample along dim 0, got {describe(targets)}")
    if targets.dim() == 0:
        raise ValueError("targets must have one target per sample along dim 0, got a 0-d tensor (a single value)")
    check_batch((inputs, targets), keyword_inputs=True)  # the same number of samples, and at least one
    check_accumulation(accumulation_steps, len(targets))
    if no_sync is not None and not callable(no_sync):
        raise TypeError(f"no_sync must be None or DDP's model.no_sync (a context manager), got {_shown(no_sync)}")
    check_precision(precision)
    if precision == "fp16" and scaler is None:
        raise ValueError(
            "precision='fp16' needs a scaler (torch.amp.GradScaler(device_type)): without loss "
            "scaling small gradients underflow to zero in float16; or use precision='bf16'"
        )
    if scaler is not None and not all(callable(getattr(scaler, name, None)) for name in ("scale", "step", "update")):
        raise TypeError(f"scaler must be None or a torch.amp.GradScaler, got {_shown(scaler)}")
    return check_loss_fn(loss_fn)


def _shown(value) -> str:
    """``value`` for a message: its repr, cut short (a model's repr would fill the screen)."""
    text = repr(value)
    return text if len(text) <= 60 else f"a {type(value).__name__}"


def _scalar(loss) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn must return a scalar tensor, the mean loss of a batch (use a 'mean' or "
            f"'sum' reduction), got {got}"
        )
    return loss


def _value(loss: torch.Tensor) -> float:
    return math.nan if loss.device.type == "meta" else loss.item()
