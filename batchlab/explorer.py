"""What the batch-size explorer's memory panel computes (chapters 0, 1 and 4), as plain functions.

:class:`batchlab.widgets.BatchSizeExplorer` only wires controls to these functions and shows their
figures, so everything it displays can be computed and tested without a kernel:

* **memory**: :func:`memory_point` estimates one training step of a course model on a device profile
  (:func:`device_profiles`: this machine's CPU, or a simulated GPU of 4 to 80 GiB; :func:`gpu_profile` adds
  any size or card) with
  :func:`batchlab.estimate_memory`, and :func:`largest_batch` asks :func:`batchlab.max_batch_size`
  for the largest batch that fits. The memory panel looks at realistic inputs (3x224x224 images,
  sequences of 512 tokens), because that is where memory runs out;
* **the batch-size options and levers**: the slider's stops (:func:`batch_size_options`), what a typed size
  reads as (:func:`read_batch_size`), and the precision and checkpointing levers (:func:`lever_kwargs`);
* **the cache** (:class:`MemoryCache`) keeps each estimate once, for the explorer's kernel thread and its
  background thread alike.

The convergence and speed panels' model (short training runs on the digits, their cache) is in
:mod:`batchlab.explorer_runs`; what the explorer reads from a learner and says back in
:mod:`batchlab.explorer_text`; what it draws in :mod:`batchlab.plots` and :mod:`batchlab.memory_plots`.
Sizes are in bytes.
"""

from __future__ import annotations

import collections
import math
import threading
from dataclasses import dataclass

import psutil
import torch
from torch import nn

from .estimate import CUDA_CONSTANTS, estimate_memory
from .max_batch import max_batch_size
from .models import MODEL_NAMES, build_model
from .reference import GPUS, gpu_memory
from .validation import GiB, check_choice, check_int, check_loss_fn, check_model

MAX_BATCH = 4096  # the batch-size slider's upper end (or the data set's size, if smaller)
GPU_SIZES_GIB = (4, 8, 16, 24, 80)
CPU_PROFILE = "this machine's CPU"
IMAGE_SHAPE = (3, 224, 224)  # what the memory panel feeds the image models: ImageNet-sized images
SEQUENCE_LENGTH = 512  # ... and the transformer: sequences of 512 tokens


# -- device profiles ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """A device to fit a training step into: ``capacity`` bytes, of which ``reserved`` are not PyTorch's."""

    name: str
    device: str  # "cuda" (simulated) or "cpu"
    capacity: int
    reserved: int = 0  # the CUDA context on a GPU: the driver's state and the libraries' code

    @property
    def budget(self) -> int:
        """Bytes that PyTorch's tensors may use at the step's peak."""
        return self.capacity - self.reserved


def device_profiles() -> dict:
    """``{name: Profile}``: this machine's CPU (its free RAM now) and simulated GPUs of 4 to 80 GiB."""
    profiles = {CPU_PROFILE: Profile(CPU_PROFILE, "cpu", psutil.virtual_memory().available)}
    context = CUDA_CONSTANTS["cuda_context"][0]
    for size in GPU_SIZES_GIB:
        name = f"GPU {size} GiB (simulated)"
        profiles[name] = Profile(name, "cuda", size * GiB, context)
    return profiles


def gpu_profile(gpu) -> Profile:
    """A simulated GPU for a card of :data:`batchlab.reference.GPUS` or a size ("12GiB", or 12 for 12 GiB),
    less the CUDA context (:func:`batchlab.reference.gpu_memory`)."""
    value = f"{gpu}GiB" if isinstance(gpu, (int, float)) and not isinstance(gpu, bool) else gpu
    found = gpu_memory(value, "gpu")
    label = found["gpu"] if found["gpu"] in GPUS else f"{found['total_bytes'] / GiB:.3g} GiB"
    return Profile(f"GPU {label} (simulated)", "cuda", found["total_bytes"], found["context_bytes"])


def profile_for(value, profiles: dict) -> str:
    """The name of the profile ``value`` means: one of ``profiles`` (a name, "cpu", a GPU of the same size
    within 1%) or a new :func:`gpu_profile`, added to ``profiles``. A ValueError or TypeError otherwise."""
    if isinstance(value, str) and value in profiles:
        return value
    if isinstance(value, str) and value.strip().lower() in ("cpu", "this machine", CPU_PROFILE):
        return CPU_PROFILE
    wanted = gpu_profile(value)
    for name, profile in profiles.items():
        if profile.device == "cuda" and abs(profile.capacity - wanted.capacity) <= 0.01 * wanted.capacity:
            return name
    profiles[wanted.name] = wanted
    return wanted.name


# -- your own model (issue 14) --------------------------------------------------------------------


@dataclass(frozen=True)
class OwnModel:
    """A learner's model for the memory panel: ``make_batch(n)`` -> (inputs, targets), and its loss."""

    name: str
    model: nn.Module
    make_batch: object
    loss_fn: object = None


def own_model(model: nn.Module, make_batch, loss_fn=None) -> OwnModel:
    """Check a learner's model, batch function and loss once (a batch of two through the estimator)."""
    check_model(model)
    if not callable(make_batch):
        raise TypeError(f"make_batch must be a function n -> (inputs, targets) for your model, got {make_batch!r}")
    check_loss_fn(loss_fn)
    estimate_memory(model, make_batch(2), loss_fn=loss_fn)  # refuses a batch or loss that does not suit the model
    return OwnModel(f"your {type(model).__name__}", model, make_batch, loss_fn)


def batch_from(source, n: int):
    """A batch of ``n`` samples: ``source(n)`` for a learner's ``make_batch``, else :func:`meta_batch` of a shape."""
    return source(n) if callable(source) else meta_batch(n, source)


# -- what a learner types -------------------------------------------------------------------------

NEAR_STOPS = (0.9, 0.95, 0.98, 1.0, 1.02, 1.04, 1.06, 1.1)  # the slider's stops around the largest batch that fits


def batch_size_options(limit: int, near: int | None = None) -> tuple:
    """The batch-size slider's stops on a log scale: 1, 2, 4, ... up to ``limit``, and ``limit`` itself.

    With ``near`` (the largest batch that fits, once known), finer stops around it as well: ``near``
    itself, 2, 5 and 10% below it and 2, 4, 6 and 10% above, so that a learner can walk across the limit with
    the slider, from the largest batch that fits to batches too close to the limit and to ones that do not fit.
    """
    check_int("limit", limit, minimum=1)
    powers = [2**i for i in range(limit.bit_length()) if 2**i <= limit]
    stops = {round(near * f) for f in NEAR_STOPS} if near else set()
    return tuple(sorted(set(powers) | {limit} | {n for n in stops if 1 <= n <= limit}))


def read_batch_size(value, limit: int) -> tuple:
    """``(batch size or None, message)`` for what a learner typed: clamped into 1..limit, or refused.

    A number outside the range is clamped (and the message says so); text that is not a whole number
    is refused (None). The message is empty when the value is used as it is.
    """
    text = str(value).strip().replace(",", "").replace("_", "")
    try:
        number = float(text)
    except ValueError:
        return None, f"batch size: {value!r} is not a number; type a whole number from 1 to {limit}."
    if not math.isfinite(number):
        return None, f"batch size: {value!r} is not a finite number; type a whole number from 1 to {limit}."
    size = min(max(round(number), 1), limit)
    if size != number:
        return size, f"batch size {value!r} is not a whole number from 1 to {limit}; using {size}."
    return size, ""


def fit_accumulation(batch_size: int, steps: int) -> tuple:
    """``(steps, message)``: the largest number of accumulation steps, at most ``steps``, that divides
    ``batch_size`` into equal micro-batches (as :func:`batchlab.train` requires)."""
    wanted = max(1, steps)
    usable = max(k for k in range(1, min(wanted, batch_size) + 1) if batch_size % k == 0)
    if usable == steps:
        return usable, ""
    return usable, (
        f"accumulation steps {steps} do not split batch {batch_size} into equal micro-batches; "
        f"using {usable} (micro-batches of {batch_size // usable})."
    )


# -- memory ---------------------------------------------------------------------------------------


def memory_input_shape(model_name: str, image_shape=IMAGE_SHAPE, sequence_length: int = SEQUENCE_LENGTH) -> tuple:
    """The shape of one sample the memory panel feeds ``model_name``: an image, or a token sequence."""
    check_choice("model", model_name, MODEL_NAMES)
    return (sequence_length,) if model_name == "transformer" else tuple(image_shape)


def meta_model(model_name: str, input_shape: tuple) -> nn.Module:
    """``build_model(model_name)`` on the meta device: the architecture without allocating its weights."""
    with torch.device("meta"):
        return build_model(model_name, in_shape=input_shape)


def meta_batch(n: int, input_shape: tuple):
    """A batch of ``n`` samples on the meta device (token ids for a sequence, floats for an image)."""
    dtype = torch.long if len(input_shape) == 1 else torch.float32
    return (torch.empty(n, *input_shape, dtype=dtype, device="meta"), torch.empty(n, dtype=torch.long, device="meta"))


# Why a step does or does not fit, in the order they are checked (:func:`memory_point`).
VERDICTS = {
    "fits": "the step fits, with room for one more block of its largest tensor (max_batch_size's margin)",
    "tensors": "the tensors alive at the step's peak alone are more than the budget",
    "allocator": "the tensors fit, but the caching allocator cannot place their blocks even after releasing its cache",
    "margin": "the step fits, but without room for one more block of its largest tensor: too close to the limit",
}


@dataclass
class MemoryPoint:
    """One step's estimated peak on a profile: ``breakdown`` by category, whether it ``fits`` and why (``verdict``)."""

    batch_size: int  # samples per optimizer step (split into micro-batches when accumulating)
    peak_bytes: int
    breakdown: dict
    profile: Profile
    fits: bool
    cached_bytes: int = 0  # held by the caching allocator beyond the tensors at the peak (GPU only)
    verdict: str = "fits"  # a key of VERDICTS: the number that decided ``fits``
    margin_bytes: int = 0  # the room that had to stay free at the worst moment (MemoryReport.margin_bytes)

    @property
    def device_bytes(self) -> int:
        """What the device holds at the peak: the tensors plus what is reserved outside PyTorch."""
        return self.peak_bytes + self.profile.reserved


# Chapter 8's levers as the memory panel offers them: (precision, checkpointing), checkpointing None or
# "blocks" (every block of the model, batchlab.checkpointed).
NO_LEVERS = ("fp32", None)
CHECKPOINTING = {"off": None, "every block": "blocks"}


def lever_kwargs(levers) -> dict:
    """``(precision, checkpointing)`` as the keyword arguments of :func:`batchlab.estimate_memory`."""
    precision, checkpointing = levers
    return {"precision": precision, "checkpointing": checkpointing}


def memory_point(
    model: nn.Module,
    input_shape,
    batch_size: int,
    profile: Profile,
    *,
    optimizer="sgd",
    accumulation_steps: int = 1,
    loss_fn=None,
    levers=NO_LEVERS,
) -> MemoryPoint:
    """The estimated peak of one training step of ``model`` on ``batch_size`` samples on ``profile``.

    With ``accumulation_steps`` > 1 the step runs as that many micro-batches whose gradients are accumulated, as
    :func:`batchlab.train` does (:func:`batchlab.estimate_memory` models it). The verdict follows chapter 4's
    rule, the one :func:`batchlab.max_batch_size` applies: short of memory the allocator releases its unused
    cache before it gives up, so what must fit the budget is the tensors and the blocks it cannot release (the
    simulated allocator decides); and a step counts as fitting only if one more segment for its largest tensor
    stays free as it runs (``keep_margin=True``). ``input_shape`` is one sample's shape, or a learner's
    ``make_batch`` (:func:`batch_from`), with its ``loss_fn``. ``levers``: the ``(precision, checkpointing)`` of
    chapter 8 (:data:`NO_LEVERS`: float32, no checkpointing).
    """
    batch = batch_from(input_shape, batch_size)
    report = estimate_memory(
        model,
        batch,
        optimizer=optimizer,
        device=profile.device,
        accumulation_steps=accumulation_steps,
        loss_fn=loss_fn,
        **lever_kwargs(levers),
    )
    verdict = _verdict(model, input_shape, batch_size, profile, optimizer, accumulation_steps, report, loss_fn, levers)
    reserved = report.reserved_bytes or report.peak_bytes
    # Short of memory, the allocator releases its unused cache before it gives up: the device never holds
    # more than the budget for PyTorch, whether the step then runs or not.
    cached = max(0, min(reserved, profile.budget) - report.peak_bytes)
    return MemoryPoint(
        batch_size,
        report.peak_bytes,
        dict(report.breakdown),
        profile,
        verdict == "fits",
        cached,
        verdict,
        report.margin_bytes,
    )


def _verdict(
    model, input_shape, batch_size, profile, optimizer, accumulation_steps, report, loss_fn=None, levers=NO_LEVERS
) -> str:
    """The key of :data:`VERDICTS` for one step: sure answers from the estimate, the simulated allocator between."""
    if report.peak_bytes > profile.budget:
        return "tensors"

    def runs(keep_margin: bool) -> bool:
        try:
            estimate_memory(
                model,
                batch_from(input_shape, batch_size),
                optimizer=optimizer,
                device=profile.device,
                budget=profile.budget,
                accumulation_steps=accumulation_steps,
                loss_fn=loss_fn,
                keep_margin=keep_margin,
                **lever_kwargs(levers),
            )
        except torch.OutOfMemoryError:
            return False
        return True

    if runs(keep_margin=True):
        return "fits"
    return "margin" if runs(keep_margin=False) else "allocator"


def largest_batch(
    model: nn.Module, input_shape, profile: Profile, *, optimizer="sgd", loss_fn=None, levers=NO_LEVERS
) -> int:
    """The largest batch whose step fits ``profile`` (:func:`batchlab.max_batch_size`); 0 if none does."""
    try:
        return max_batch_size(
            model,
            lambda n: batch_from(input_shape, n),
            budget=profile.budget,
            optimizer=optimizer,
            device=profile.device,
            loss_fn=loss_fn,
            progress=False,
            **lever_kwargs(levers),
        )
    except ValueError as error:
        if "does not fit" not in str(error):
            raise
        return 0


def largest_batch_for(model_name: str, profile_name: str, *, optimizer="sgd") -> int:
    """:func:`largest_batch` for a course model on a profile of :func:`device_profiles`, by name, as the
    explorer's memory panel shows it (the checks of chapter 0's exercise use it)."""
    profiles = device_profiles()
    check_choice("profile_name", profile_name, tuple(profiles))
    shape = memory_input_shape(model_name)
    return largest_batch(meta_model(model_name, shape), shape, profiles[profile_name], optimizer=optimizer)


class MemoryCache:
    """The memory panel's estimates, computed once each: meta models, :class:`MemoryPoint` s and largest batches.

    Shared by the explorer's kernel thread and its background thread (hence the lock); at most
    ``max_points`` points are kept, the oldest dropped first.
    """

    def __init__(
        self, *, optimizer="sgd", image_shape=IMAGE_SHAPE, sequence_length: int = SEQUENCE_LENGTH, max_points: int = 256
    ):
        self.optimizer, self.image_shape, self.sequence_length = optimizer, image_shape, sequence_length
        self.max_points = max_points
        self.meta: dict = {}
        self.points: collections.OrderedDict = collections.OrderedDict()
        self.largest: dict = {}
        self.own: dict = {}  # name -> OwnModel: a learner's models, beside the course's
        self.lock = threading.RLock()

    def add_own(self, own: OwnModel) -> None:
        self.own[own.name] = own

    def input_shape(self, model_name: str):
        """One sample's shape for a course model; a learner's ``make_batch`` for their own."""
        if model_name in self.own:
            return self.own[model_name].make_batch
        return memory_input_shape(model_name, self.image_shape, self.sequence_length)

    def loss_fn(self, model_name: str):
        return self.own[model_name].loss_fn if model_name in self.own else None

    def meta_model(self, model_name: str) -> nn.Module:
        if model_name in self.own:
            return self.own[model_name].model  # the estimator runs a meta copy; the model is only read
        with self.lock:
            if model_name not in self.meta:
                self.meta[model_name] = meta_model(model_name, self.input_shape(model_name))
            return self.meta[model_name]

    def point(
        self, model_name: str, profile: Profile, batch_size: int, steps: int = 1, levers=NO_LEVERS
    ) -> MemoryPoint:
        """:func:`memory_point` of ``model_name`` at ``batch_size`` in ``steps`` micro-batches on ``profile``."""
        key = (model_name, profile.name, batch_size, steps, self.optimizer, levers)
        with self.lock:
            point = self.points.get(key)
        if point is None:
            point = memory_point(
                self.meta_model(model_name),
                self.input_shape(model_name),
                batch_size,
                profile,
                optimizer=self.optimizer,
                accumulation_steps=steps,
                loss_fn=self.loss_fn(model_name),
                levers=levers,
            )
        with self.lock:
            self.points[key] = point
            self.points.move_to_end(key)
            while len(self.points) > self.max_points:
                self.points.popitem(last=False)
        return point

    def known_largest(self, model_name: str, profile: Profile, levers=NO_LEVERS) -> int | None:
        """The largest batch if it was searched already, else None (without searching)."""
        return self.largest.get((model_name, profile.name, self.optimizer, levers))

    def largest_batch(self, model_name: str, profile: Profile, levers=NO_LEVERS) -> int:
        """:func:`largest_batch`, once per model, profile, optimizer and levers (about ten estimates)."""
        key = (model_name, profile.name, self.optimizer, levers)
        if key not in self.largest:
            self.largest[key] = largest_batch(
                self.meta_model(model_name),
                self.input_shape(model_name),
                profile,
                optimizer=self.optimizer,
                loss_fn=self.loss_fn(model_name),
                levers=levers,
            )
        return self.largest[key]


def memory_state(point: MemoryPoint | None, largest: int | None, profile: Profile) -> dict:
    """The memory panel's part of the explorer's ``state``: the estimate shown and the largest batch."""
    return {
        "peak_bytes": point.peak_bytes if point else None,
        "breakdown": dict(point.breakdown) if point else None,
        "budget_bytes": profile.budget,
        "device_bytes": profile.capacity,
        "fits": point.fits if point else None,
        "verdict": point.verdict if point else None,
        "largest_batch": largest,
    }
