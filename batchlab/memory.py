"""Where the memory of a training step goes, measured (chapter 4; chapter 5 builds its leak checks on it).

:func:`track_memory` watches every tensor storage that is created and freed inside a ``with`` block,
on any device (on a CPU too, where ``torch.cuda``'s counters do not exist and ``tracemalloc`` sees
nothing), and sorts its bytes into the categories of :data:`CATEGORIES`:

* ``parameters`` and ``buffers`` of the model (BatchNorm's running statistics are buffers),
* ``gradients`` (the ``.grad`` of each parameter),
* ``optimizer_state`` (momentum, Adam's two moments and step counters),
* ``activations``: tensors that autograd saved for the backward pass,
* ``inputs``: the batch given to the model (and, in :func:`profile_step`, its targets),
* ``temporaries``: everything else, e.g. the output of a layer that backward does not need.

How it sees (the machinery is in :mod:`batchlab.tracker`): a ``TorchDispatchMode`` is called in place of every
tensor operation; it runs the operation, then notes the storages that the operation's outputs did not share
with its inputs (new memory); a weak reference to each storage reports the moment it is freed. Saved-tensor
hooks tell which tensors autograd keeps for backward, and model / optimizer hooks mark the phases of a step
(forward, loss, backward, optimizer step). Each storage is counted once (views share their storage) by its
``nbytes``. Parameters, buffers, gradients and optimizer state that already exist when the block starts are
counted as live from the start, so a step's peak includes them.

What it does not see: scratch memory that a single operation allocates and frees inside itself (a
cuDNN workspace, for instance) and memory that is not a tensor (the CUDA context, the allocator's
cache). On CUDA the report therefore carries ``torch.cuda``'s own counters beside the tracked bytes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .checkpointing import apply_checkpointing, check_checkpointing, tuning_label
from .precision import check_autocast, check_precision, make_scaler
from .steps import check_optimizer, make_optimizer, train_step
from .validation import (
    MiB,
    check_batch,
    check_device,
    check_loss_fn,
    check_trainable,
    device_of,
)

CATEGORIES = ("parameters", "buffers", "gradients", "optimizer_state", "activations", "inputs", "temporaries")
# The phases the tracker's hooks mark, in the order of a training step ("start": before the forward pass).
PHASES = ("start", "forward", "loss", "backward", "optimizer step", "after step")


def tensors_in(obj, found: list) -> list:
    """Append every tensor inside nested tuples, lists and dicts of ``obj`` to ``found``."""
    if isinstance(obj, torch.Tensor):
        found.append(obj)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            tensors_in(item, found)
    elif isinstance(obj, dict):
        for item in obj.values():
            tensors_in(item, found)
    return found


def storage_of(tensor: torch.Tensor):
    """The untyped storage behind ``tensor``, or None for tensors without one (sparse, nested, ...)."""
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a tensor or nested lists / dicts of them).

    Views of one tensor share its storage and count once: the sum to compare a tracker's category with,
    e.g. ``storage_bytes(list(model.parameters()))``.
    """
    seen = {}  # id -> storage; holding the storages keeps their ids unique while we count
    for tensor in tensors_in(tensors, []):
        storage = storage_of(tensor)
        if storage is not None:
            seen[id(storage)] = storage
    return sum(storage.nbytes() for storage in seen.values())


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list:
    """Every tensor held in ``optimizer.state`` (momentum buffers, Adam's moments and step counts)."""
    return tensors_in([dict(state) for state in optimizer.state.values()], [])


@dataclass
class TimelineEvent:
    """Tracked bytes by category just after one event of a step: an allocation (``what`` names the
    operation), a free, or the start of a phase."""

    phase: str
    bytes: dict
    what: str = ""

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


@dataclass
class MemoryReport:
    """The memory of one training step: what :func:`profile_step` measures (and what an estimator predicts).

    * ``peak_bytes``: the most bytes alive at any moment of the step; ``breakdown``: those bytes by
      category; ``peak_phase``: the phase the peak happened in.
    * ``timeline``: a :class:`TimelineEvent` (bytes by category and phase) after each event.
    * ``category_peaks``: the most bytes each category held at any moment (e.g. all gradients exist
      only at the end of backward, after activations are freed, so they are not all in ``breakdown``).
    * ``device``: where the tensors lived. ``cuda_allocated`` / ``cuda_max_allocated`` /
      ``cuda_reserved``: ``torch.cuda``'s counters after the step (None off CUDA).
    * ``reserved_bytes``: the most bytes a CUDA caching allocator reserved during the step
      (``torch.cuda.max_memory_reserved`` when measured; an estimator's prediction otherwise; None on CPU).
    * ``margin_bytes``: the room :func:`batchlab.max_batch_size` wants free at the step's worst moment for
      it to count as fitting: on CUDA one more segment for its largest allocation
      (:func:`batchlab.estimate.margin_bytes`); 0 on the CPU and when measured.
    * ``warnings``: what an estimate did not model and so may have missed (an operation whose GPU library
      scratch memory is unknown, a custom autograd function, a fallback to measuring); empty when measured.
    """

    peak_bytes: int
    breakdown: dict
    peak_phase: str
    timeline: list = field(default_factory=list, repr=False)
    device: str = "cpu"
    category_peaks: dict = field(default_factory=dict)
    cuda_allocated: int | None = None
    cuda_max_allocated: int | None = None
    cuda_reserved: int | None = None
    label: str = ""
    reserved_bytes: int | None = None
    margin_bytes: int = 0
    warnings: list = field(default_factory=list)

    def __repr__(self) -> str:
        title = f"{self.label}: " if self.label else ""
        lines = [f"MemoryReport({title}peak {self.peak_bytes / MiB:.1f} MiB on {self.device}, during {self.peak_phase}"]
        width = max((len(c) for c in self.breakdown), default=0)
        for category in [c for c in CATEGORIES if c in self.breakdown] + [
            c for c in self.breakdown if c not in CATEGORIES
        ]:
            lines.append(f"  {category:<{width}} {self.breakdown[category] / MiB:8.1f} MiB")
        if self.reserved_bytes is not None:
            lines.append(f"  reserved by the caching allocator at most: {self.reserved_bytes / MiB:.1f} MiB")
        if self.cuda_max_allocated is not None:
            lines.append(
                f"  torch.cuda: allocated {self.cuda_allocated / MiB:.1f} MiB, max allocated "
                f"{self.cuda_max_allocated / MiB:.1f} MiB, reserved {self.cuda_reserved / MiB:.1f} MiB"
            )
        lines.extend(f"  warning: {text}" for text in self.warnings)
        return "\n".join(lines) + ")"


def track_memory(model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None):
    """Record every tensor storage created and freed inside the ``with`` block, by category.

    ``with batchlab.track_memory(model, optimizer) as tracker: ...`` then ``tracker.report()`` gives a
    :class:`MemoryReport`; ``tracker.current()`` gives the bytes alive now by category. ``model`` and
    ``optimizer`` (both optional) let the tracker name parameters, gradients and optimizer state and
    mark the forward pass and the optimizer step; their memory that exists already is counted from
    the start. Memory made before the block and not passed in (a data set, say) is not counted.

    The tracker always removes its hooks when the block ends, also when it ends with an error. Blocks
    nest (a :func:`profile_step` or a second ``track_memory`` inside one, or inside a
    :func:`batchlab.memory_budget` block): each tracker sees every operation of its own block, so the outer
    one counts what the inner block allocates. On CUDA it resets the peak counter of ``torch.cuda`` at the
    start, so ``report().cuda_max_allocated`` belongs to this block (an outer tracker keeps its own peak).
    """
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    from .tracker import track_storages  # the tracker imports this module's categories and reports

    # Meta tensors take no memory: with a model on a real device they are not counted (estimate_memory inside
    # the block); without a model every tensor is, so that the meta device can be watched too.
    count_meta = model is None or device_of(model).type == "meta"
    return track_storages(model, optimizer, record=True, count_meta=count_meta)


def profile_step(
    model: nn.Module, batch, *, optimizer="sgd", loss_fn=None, device=None, precision="fp32", checkpointing=None
) -> MemoryReport:
    """Measure one training step of ``model`` on ``batch`` = (inputs, targets): a :class:`MemoryReport`.

    The step is forward, loss, backward, ``optimizer.step()``, ``zero_grad(set_to_none=True)``, measured
    with :func:`track_memory` after one unmeasured warm-up step that creates the optimizer state (as
    in every step but the first of a real training run). ``optimizer`` is ``"sgd"`` (lr 0.01,
    momentum 0.9), ``"adam"`` (lr 0.001) or a function ``params -> Optimizer``; ``loss_fn`` defaults to
    cross-entropy. ``device`` (default: where the model is) is where the step runs. ``precision``
    (``"fp32"``, ``"bf16"``, ``"fp16"``) and ``checkpointing`` (None, ``"blocks"`` or a number of
    segments) are those of :func:`batchlab.train` (chapter 8).

    The step runs on a copy of the model, so ``model`` (its weights, buffers, gradients, device) and the
    global random state are left exactly as they were.
    """
    check_trainable(model)
    inputs, targets = check_batch(batch)
    check_optimizer(optimizer)
    loss_fn = check_loss_fn(loss_fn)
    if device is None:
        device = device_of(model)
        for name, tensor in (("inputs", inputs), ("targets", targets)):
            if tensor.device != device:
                raise ValueError(
                    f"batch {name} are on {tensor.device} but the model is on {device}: move both "
                    f"to one device, or pass device='{device.type}' to run the step there"
                )
    else:
        device = check_device(device)
    check_autocast(device.type, check_precision(precision))
    check_checkpointing(model, checkpointing)  # a model without blocks is refused before anything runs
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        work = copy.deepcopy(model).to(device).train()
        for p in work.parameters():
            p.grad = None
        # Own copies of the batch: a slice of a larger tensor would otherwise count the whole tensor.
        inputs, targets = inputs.to(device).clone(), targets.to(device).clone()
        opt = make_optimizer(optimizer, work.parameters())
        work = apply_checkpointing(work, checkpointing)
        step = dict(loss_fn=loss_fn, precision=precision, scaler=make_scaler(device.type, precision))
        train_step(work, opt, inputs, targets, **step)  # warm-up: creates the optimizer state
        with track_memory(work, opt) as tracker:
            tracker.adopt([inputs, targets], "inputs")
            train_step(work, opt, inputs, targets, **step)
    return tracker.report(
        label=f"{type(model).__name__}, batch {len(inputs)}, "
        f"{optimizer if isinstance(optimizer, str) else 'custom optimizer'}"
        f"{tuning_label(precision, checkpointing)}"
    )
