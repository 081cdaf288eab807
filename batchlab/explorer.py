"""What the batch-size explorer computes (chapters 0, 1 and 4), as plain functions.

:class:`batchlab.widgets.BatchSizeExplorer` only wires controls to these functions and shows their
figures, so everything it displays can be computed and tested without a kernel:

* **memory**: :func:`memory_point` estimates one training step of a course model on a device profile
  (:func:`device_profiles`: this machine's CPU, or a simulated GPU of 4 to 80 GiB) with
  :func:`batchlab.estimate_memory`, and :func:`largest_batch` asks :func:`batchlab.max_batch_size`
  for the largest batch that fits. The memory panel looks at realistic inputs (3x224x224 images,
  sequences of 512 tokens), because that is where memory runs out;
* **convergence and speed**: :func:`training_losses` trains the same architecture on the 8x8 digits
  (small enough to train in seconds on a laptop's CPU), step by step, so that a widget can draw the
  first points early and stop a run that is no longer wanted. :func:`run_length` sizes the short run.

Sizes are in bytes, speeds in samples per second.
"""

from __future__ import annotations

import collections
import html
import math
import threading
import time
from dataclasses import dataclass, field

import psutil
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .datasets import digits
from .estimate import CUDA_CONSTANTS, estimate_memory, max_batch_size
from .models import MODEL_NAMES, build_model
from .steps import make_optimizer, train_step
from .training import History
from .validation import GiB, MiB, check_choice, check_float, check_int, parse_bytes

MAX_BATCH = 4096  # the batch-size slider's upper end (or the data set's size, if smaller)
GPU_SIZES_GIB = (4, 8, 16, 24, 80)
CPU_PROFILE = "this machine's CPU"
IMAGE_SHAPE = (3, 224, 224)  # what the memory panel feeds the image models: ImageNet-sized images
SEQUENCE_LENGTH = 512  # ... and the transformer: sequences of 512 tokens
# One short convergence run per model: (epochs, at most this many optimizer steps), so that every run
# ends within a few seconds on one core of a busy laptop. Measured there (benchmarks/explorer.py): an
# epoch of resnet18 takes about 4 s at any batch from 16 up, the other models 1 s or less, and at
# batch 1 or 2 a step costs about 1 ms (mlp), 2 ms (cnns), 15 ms (transformer) or 60 ms (resnet18).
RUNS = {"mlp": (2, 300), "cnn": (2, 300), "cnn_bn": (2, 300), "resnet18": (1, 40), "transformer": (2, 150)}


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


# -- what a learner types -------------------------------------------------------------------------

def batch_size_options(limit: int) -> tuple:
    """The batch-size slider's stops on a log scale: 1, 2, 4, ... up to ``limit``, and ``limit`` itself."""
    check_int("limit", limit, minimum=1)
    powers = [2**i for i in range(limit.bit_length()) if 2**i <= limit]
    return tuple(sorted(set(powers) | {limit}))


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
    return usable, (f"accumulation steps {steps} do not split batch {batch_size} into equal micro-batches; "
                    f"using {usable} (micro-batches of {batch_size // usable}).")


PANELS = ("memory", "convergence", "speed")
LR_RANGE = (1e-3, 1.0)  # what the learning-rate slider offers


def check_panels(panels) -> tuple:
    """``panels`` as a tuple of names from :data:`PANELS` (one name may be given alone)."""
    panels = (panels,) if isinstance(panels, str) else tuple(panels)
    if not panels or any(p not in PANELS for p in panels):
        raise ValueError(f"panels must name some of {', '.join(PANELS)}, got {panels!r}")
    return panels


def check_image_shape(image_shape) -> tuple:
    """``image_shape`` as ``(channels, height, width)`` of positive whole numbers, or a clear ValueError.

    The memory panel feeds the image models batches of this shape; a shape they cannot take would
    make every update fail, so it is refused when the explorer is built.
    """
    try:
        shape = tuple(image_shape)
    except TypeError:
        shape = None
    if shape is None or len(shape) != 3 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                                                  for n in shape):
        raise ValueError(f"image_shape must be (channels, height, width), three positive whole numbers such as "
                         f"{IMAGE_SHAPE}, got {image_shape!r}")
    return shape


def profile_name(value, profiles: dict) -> str | None:
    """The profile of ``profiles`` a learner means: its name, "cpu", or a GPU size (16, "16 GiB", "16GB")."""
    if isinstance(value, str) and value in profiles:
        return value
    if isinstance(value, str) and value.strip().lower() in ("cpu", "this machine", CPU_PROFILE):
        return CPU_PROFILE
    try:
        size = value * GiB if isinstance(value, int) and not isinstance(value, bool) else parse_bytes("profile", value)
    except (TypeError, ValueError):
        return None
    names = [name for name, p in profiles.items() if p.device == "cuda" and abs(p.capacity - size) < 0.1 * size]
    return names[0] if names else None


def read_lr(value, current: float) -> tuple:
    """``(learning rate, notes)`` for what a learner typed: clamped into :data:`LR_RANGE`, or ``current`` kept."""
    try:
        lr = float(value)
    except (TypeError, ValueError):
        return current, [f"learning rate: {value!r} is not a number; kept {current:.3g}."]
    if not math.isfinite(lr):
        return current, [f"learning rate: {value!r} is not a finite number; kept {current:.3g}."]
    used = min(max(lr, LR_RANGE[0]), LR_RANGE[1])
    return used, [] if used == lr else [f"learning rate {lr:g} is outside {LR_RANGE[0]:g} to {LR_RANGE[1]:g}; "
                                        f"using {used:g}."]


def read_model(value) -> tuple:
    """``(model name or None, notes)`` for what a learner chose: a name of :data:`batchlab.MODEL_NAMES`, or refused."""
    if isinstance(value, str) and value in MODEL_NAMES:
        return value, []
    return None, [f"model {value!r} does not exist; the models are {', '.join(MODEL_NAMES)}."]


def read_profile(value, profiles: dict) -> tuple:
    """``(profile name or None, notes)``: the profile ``value`` means (:func:`profile_name`), or refused."""
    found = profile_name(value, profiles)
    return found, [] if found is not None else [f"device {value!r} is not one of the profiles: {', '.join(profiles)}."]


def read_steps(value, current: int) -> tuple:
    """``(accumulation steps or None, notes)``: ``value`` as a whole number, or refused (``current`` kept)."""
    try:
        return int(value), []
    except (TypeError, ValueError):
        return None, [f"accumulation steps: {value!r} is not a whole number; kept {current}."]

def check_lr(lr) -> float:
    """``lr`` if it is a number in :data:`LR_RANGE`, else a ValueError naming it."""
    if not LR_RANGE[0] <= check_float("lr", lr) <= LR_RANGE[1]:
        raise ValueError(f"lr must be between {LR_RANGE[0]} and {LR_RANGE[1]}, got {lr}")
    return lr


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
    return (torch.empty(n, *input_shape, dtype=dtype, device="meta"),
            torch.empty(n, dtype=torch.long, device="meta"))


@dataclass
class MemoryPoint:
    """One step's estimated peak on a profile: ``breakdown`` by category, and whether it ``fits``."""

    batch_size: int  # samples per optimizer step (split into micro-batches when accumulating)
    peak_bytes: int
    breakdown: dict
    profile: Profile
    fits: bool
    cached_bytes: int = 0  # held by the caching allocator beyond the tensors at the peak (GPU only)

    @property
    def device_bytes(self) -> int:
        """What the device holds at the peak: the tensors plus what is reserved outside PyTorch."""
        return self.peak_bytes + self.profile.reserved


def memory_point(model: nn.Module, input_shape: tuple, batch_size: int, profile: Profile, *,
                 optimizer="sgd", accumulation_steps: int = 1) -> MemoryPoint:
    """The estimated peak of one training step of ``model`` on ``batch_size`` samples on ``profile``.

    With ``accumulation_steps`` > 1 the step runs as that many micro-batches whose gradients are
    accumulated, as :func:`batchlab.train` does (:func:`batchlab.estimate_memory` models it). It
    ``fits`` when the simulated device never needs more than its budget.
    """
    batch = meta_batch(batch_size, input_shape)
    report = estimate_memory(model, batch, optimizer=optimizer, device=profile.device,
                             accumulation_steps=accumulation_steps)
    fits = _fits(model, batch, profile, optimizer, accumulation_steps, report)
    reserved = report.reserved_bytes or report.peak_bytes
    # Short of memory, the allocator releases its unused cache before it gives up, so a step that
    # fits never holds more than the budget.
    cached = max(0, (reserved if not fits else min(reserved, profile.budget)) - report.peak_bytes)
    return MemoryPoint(batch_size, report.peak_bytes, dict(report.breakdown), profile, fits, cached)


def _fits(model, batch, profile, optimizer, accumulation_steps, report) -> bool:
    """Sure answers from one estimate; in between (cache over the budget), ask the simulated allocator."""
    if report.peak_bytes > profile.budget:
        return False
    if profile.device == "cpu" or (report.reserved_bytes or 0) <= profile.budget:
        return True
    try:
        estimate_memory(model, batch, optimizer=optimizer, device="cuda", budget=profile.budget,
                        accumulation_steps=accumulation_steps)
    except torch.OutOfMemoryError:
        return False
    return True


def largest_batch(model: nn.Module, input_shape: tuple, profile: Profile, *, optimizer="sgd") -> int:
    """The largest batch whose step fits ``profile`` (:func:`batchlab.max_batch_size`); 0 if none does."""
    try:
        return max_batch_size(model, lambda n: meta_batch(n, input_shape), budget=profile.budget,
                              optimizer=optimizer, device=profile.device)
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


def check_largest_batch(answer, *, model: str = "cnn_bn", profile: str = "GPU 8 GiB (simulated)",
                        optimizer: str = "sgd") -> None:
    """Chapter 0's exercise: the largest batch of ``model`` that fits ``profile``, as the memory panel names it.

    ``None`` (the placeholder in the notebook) prints what to do; a wrong answer raises ``AssertionError``
    with a hint that does not give the answer away; a right one prints why it is right.
    """
    if answer is None:
        print(f"Your turn: choose the model {model} and the device '{profile}' in the explorer, and read the "
              f"largest batch that fits.")
        return
    expected = largest_batch_for(model, profile, optimizer=optimizer)
    assert isinstance(answer, int) and not isinstance(answer, bool), (
        f"the answer is a number of samples: a whole number (an int), got {answer!r}")
    assert answer == expected, (
        f"{answer} is not right. Set the model to {model} and the device to '{profile}', then read the number "
        f"the memory panel names under the bars ('The largest batch that fits in one step'), once its search "
        f"has finished.")
    print(f"Correct: {expected} images of {'x'.join(map(str, memory_input_shape(model)))} per step, the largest "
          f"batch whose estimated step fits with a 5% margin.")


# -- convergence and speed ------------------------------------------------------------------------

class TokenDigits(Dataset):
    """The digits as sequences of 8 tokens for the transformer: each row of 8 pixels, read as ink (a
    pixel above one half) or not, is one of 256 token ids."""

    def __init__(self, images: Dataset):
        self.images = images
        self.weights = 2 ** torch.arange(8)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image, label = self.images[index]
        return ((image[0] > 0.5).long() * self.weights).sum(dim=1), label


def training_data(model_name: str, dataset: Dataset | None = None) -> Dataset:
    """What the convergence panel trains ``model_name`` on: ``dataset`` (default: the digits training
    set), as token rows for the transformer."""
    check_choice("model", model_name, MODEL_NAMES)
    dataset = dataset if dataset is not None else digits(train=True)
    return TokenDigits(dataset) if model_name == "transformer" else dataset


def training_model(model_name: str, dataset: Dataset, seed: int = 0) -> nn.Module:
    """``build_model(model_name)`` for ``dataset``'s samples, with dropout off.

    The explorer trains in a background thread, and dropout would draw from torch's global random
    generator, which the notebook's own cells use: without it, a run touches no global random state
    and gives the same losses every time.
    """
    sample = dataset[0][0]
    in_shape = tuple(sample.shape)
    model = build_model(model_name, in_shape=in_shape, seed=seed)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(module, nn.MultiheadAttention):
            module.dropout = 0.0
    return model


def run_length(model_name: str, batch_size: int, dataset_size: int) -> int:
    """Optimizer steps of one short run of ``model_name``: the epochs and at most the steps of :data:`RUNS`."""
    epochs, max_steps = RUNS[model_name]
    return max(1, min(epochs * (dataset_size // batch_size), max_steps))


@dataclass
class RunSetting:
    """One convergence run: the model, the (effective) batch, the learning rate and the accumulation."""

    model: str
    batch_size: int
    lr: float
    accumulation_steps: int = 1
    optimizer: str = "sgd"
    seed: int = 0
    key: tuple = field(init=False)

    def __post_init__(self):
        self.key = (self.model, self.batch_size, round(self.lr, 6), self.accumulation_steps, self.optimizer,
                    self.seed)

    @property
    def label(self) -> str:
        micro = f" ({self.accumulation_steps}x{self.batch_size // self.accumulation_steps})" \
            if self.accumulation_steps > 1 else ""
        return f"{self.model}, batch {self.batch_size}{micro}, lr {self.lr:.3g}"


def training_losses(model: nn.Module, dataset: Dataset, *, batch_size: int, lr: float, steps: int,
                    accumulation_steps: int = 1, optimizer="sgd", seed: int = 0):
    """Train ``model`` in place and yield the loss after each of ``steps`` optimizer steps.

    The loop of :func:`batchlab.train` (same shuffling, same accumulation, so the same losses), one
    step at a time: a caller draws the losses as they come and stops iterating to stop the run. It
    reads no global random state (the shuffling has its own generator).
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    opt = make_optimizer(optimizer, model.parameters(), lr=lr)
    model.train()
    step = 0
    while True:  # one pass of this loop is one epoch
        for inputs, targets in loader:
            loss = train_step(model, opt, inputs, targets, accumulation_steps=accumulation_steps)
            step += 1
            yield loss
            if step == steps:
                return


class MemoryCache:
    """The memory panel's estimates, computed once each: meta models, :class:`MemoryPoint` s and largest batches.

    Shared by the explorer's kernel thread and its background thread (hence the lock); at most
    ``max_points`` points are kept, the oldest dropped first.
    """

    def __init__(self, *, optimizer="sgd", image_shape=IMAGE_SHAPE, sequence_length: int = SEQUENCE_LENGTH,
                 max_points: int = 256):
        self.optimizer, self.image_shape, self.sequence_length = optimizer, image_shape, sequence_length
        self.max_points = max_points
        self.meta: dict = {}
        self.points: collections.OrderedDict = collections.OrderedDict()
        self.largest: dict = {}
        self.lock = threading.RLock()

    def input_shape(self, model_name: str) -> tuple:
        return memory_input_shape(model_name, self.image_shape, self.sequence_length)

    def meta_model(self, model_name: str) -> nn.Module:
        with self.lock:
            if model_name not in self.meta:
                self.meta[model_name] = meta_model(model_name, self.input_shape(model_name))
            return self.meta[model_name]

    def point(self, model_name: str, profile: Profile, batch_size: int, steps: int = 1) -> MemoryPoint:
        """:func:`memory_point` of ``model_name`` at ``batch_size`` in ``steps`` micro-batches on ``profile``."""
        key = (model_name, profile.name, batch_size, steps, self.optimizer)
        with self.lock:
            point = self.points.get(key)
        if point is None:
            point = memory_point(self.meta_model(model_name), self.input_shape(model_name), batch_size, profile,
                                 optimizer=self.optimizer, accumulation_steps=steps)
        with self.lock:
            self.points[key] = point
            self.points.move_to_end(key)
            while len(self.points) > self.max_points:
                self.points.popitem(last=False)
        return point

    def known_largest(self, model_name: str, profile: Profile) -> int | None:
        """The largest batch if it was searched already, else None (without searching)."""
        return self.largest.get((model_name, profile.name, self.optimizer))

    def largest_batch(self, model_name: str, profile: Profile) -> int:
        """:func:`largest_batch`, once per model, profile and optimizer (about ten estimates)."""
        key = (model_name, profile.name, self.optimizer)
        if key not in self.largest:
            self.largest[key] = largest_batch(self.meta_model(model_name), self.input_shape(model_name), profile,
                                              optimizer=self.optimizer)
        return self.largest[key]


# -- what the panels say --------------------------------------------------------------------------

def size_text(nbytes: int) -> str:
    """``nbytes`` as the panels write it: GiB with two decimals from 1 GiB up, else whole MiB."""
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB else f"{nbytes / MiB:.0f} MiB"


def micro_text(s: RunSetting) -> str:
    """" (4 x 16)" for a batch of 64 in 4 micro-batches, "" without accumulation."""
    k = s.accumulation_steps
    return f" ({k} x {s.batch_size // k})" if k > 1 else ""


def describe_input(model_name: str, input_shape: tuple) -> str:
    """"cnn on 3x224x224 images" or "transformer on sequences of 512 tokens"."""
    shape = "x".join(map(str, input_shape))
    return f"{model_name} on " + (f"sequences of {shape} tokens" if model_name == "transformer" else f"{shape} images")


def memory_text(s: RunSetting, point: MemoryPoint, largest: int | None, input_shape: tuple) -> str:
    """The memory panel's HTML under the bars: the verdict, the numbers behind it and the largest batch.

    What is compared with the budget is the tensors at the step's peak (and, on a GPU, the blocks the
    caching allocator reserves for them); the CUDA context is taken off the device's size first.
    ``largest`` None means the search for the largest batch is still running, 0 that none fits.
    """
    profile = point.profile
    where = (f"the {size_text(profile.capacity)} GPU, whose other {size_text(profile.reserved)} are the CUDA context"
             if profile.device == "cuda" else "this machine's free RAM")
    need = (f"One training step of {describe_input(s.model, input_shape)} at batch {s.batch_size} needs "
            f"{size_text(point.peak_bytes)} of tensors at its peak")
    budget = size_text(profile.budget)
    if point.fits:
        cache = f" with the allocator's cache ({size_text(point.cached_bytes)})" if profile.device == "cuda" else ""
        head = f"<b>Fits.</b> {need};{cache} that is within the {budget} PyTorch can use of {where}."
    elif point.peak_bytes <= profile.budget:
        head = (f"<b style='color:#C44E52'>Out of memory.</b> {need}, within the {budget} PyTorch can use of "
                f"{where}, but the caching allocator cannot place its blocks there: it would reserve "
                f"{size_text(point.peak_bytes + point.cached_bytes)}.")
    else:
        head = (f"<b style='color:#C44E52'>Out of memory.</b> {need}: {size_text(point.peak_bytes - profile.budget)} "
                f"more than the {budget} PyTorch can use of {where}.")
    if profile.device == "cuda":  # the bar: context, tensors, cache
        total = size_text(point.device_bytes + point.cached_bytes)
        head += (f" The bar shows the context, the tensors and the cache: {total}." if point.fits else
                 f" The bar adds the context and the allocator's cache ({size_text(point.cached_bytes)}): {total}.")
    return head + " " + largest_text(s, point, largest)


def largest_text(s: RunSetting, point: MemoryPoint, largest: int | None) -> str:
    """The sentence about the largest batch that fits, and how to keep a batch that does not by accumulating."""
    if largest is None:
        return "Searching for the largest batch that fits…"
    if not largest:
        return "Not even the smallest batch fits this device."
    text = f"The largest batch that fits in one step: <b>{largest:,}</b> (estimated, with a 5% margin)."
    if not point.fits:
        k = next((k for k in range(2, s.batch_size + 1) if s.batch_size % k == 0 and s.batch_size // k <= largest),
                 None)
        if k is not None:
            text += (f" To keep the batch of {s.batch_size}, accumulate {k} micro-batches of {s.batch_size // k} "
                     f"(accumulation steps = {k}).")
    return text


@dataclass
class Run:
    """A convergence run as drawn: its setting, its History so far, the steps it will take, whether it ended."""

    setting: RunSetting
    steps: int
    history: History = field(init=False)
    done: bool = False

    def __post_init__(self):
        self.history = History(self.setting.label, self.setting.batch_size)


def explain_training_error(error: Exception, s: RunSetting) -> Exception:
    """The error to show for a run of ``s`` that failed: BatchNorm's raw error on a one-sample batch becomes
    a sentence that says why and what to do; any other error is returned as it is."""
    if isinstance(error, ValueError) and "Expected more than 1 value per channel when training" in str(error):
        micro = s.batch_size // s.accumulation_steps
        return ValueError(f"{s.model} cannot train on batches of {micro} sample: its BatchNorm layers need 2 or more "
                          f"samples per (micro-)batch in training, to compute a mean and a variance over the batch. "
                          f"Choose a batch of 2 or more (or fewer accumulation steps).")
    return error

def record_run(run: Run, losses, *, cancelled, draw, interval: float = 0.5) -> bool:
    """Append each loss of ``losses`` to ``run.history`` with its samples and seconds; False if cancelled.

    ``draw()`` is called every ``interval`` seconds (the first time after that long too, so a run that
    ends sooner is drawn once, at the end, by the caller); the time it takes is left out of the run's
    seconds, so that samples per second measure training only. ``cancelled()`` is asked before each step.
    """
    history, batch_size = run.history, run.setting.batch_size
    start = drawn = time.perf_counter()
    paused = 0.0
    for loss in losses:
        if cancelled():
            return False
        history.loss.append(loss)
        history.samples.append(len(history.loss) * batch_size)
        history.seconds.append(time.perf_counter() - start - paused)
        if time.perf_counter() - drawn >= interval:
            before = time.perf_counter()
            draw()
            drawn = time.perf_counter()
            paused += drawn - before
    run.done = True
    return True


def run_state(run: Run | None, shown: list) -> dict:
    """The convergence and speed panels' part of the explorer's ``state``: the run drawn and those beside it."""
    history = run.history if run is not None else None
    return {
        "run": history.label if history else None,
        "running": bool(run is not None and not run.done),
        "steps": len(history.loss) if history else 0, "steps_planned": run.steps if run else None,
        "loss": list(history.loss) if history else [], "samples": list(history.samples) if history else [],
        "samples_per_second": history.samples_per_second if run is not None and run.done else None,
        "runs": [r.history.label for r in shown],
    }


def memory_state(point: MemoryPoint | None, largest: int | None, profile: Profile) -> dict:
    """The memory panel's part of the explorer's ``state``: the estimate shown and the largest batch."""
    return {
        "peak_bytes": point.peak_bytes if point else None,
        "breakdown": dict(point.breakdown) if point else None,
        "budget_bytes": profile.budget, "device_bytes": profile.capacity,
        "fits": point.fits if point else None, "largest_batch": largest,
    }

def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` normalises with batch statistics (BatchNorm of any dimension)."""
    return any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) for m in model.modules())


def run_text(run: Run, shown: list, *, batch_norm: bool = False) -> str:
    """The convergence panel's HTML: progress of a run in flight, or its result and how it compares."""
    h = run.history
    if not run.done:
        return f"Training <b>{html.escape(h.label)}</b>: step {len(h.loss)} of {run.steps}…"
    epochs, max_steps = RUNS[run.setting.model]
    return (f"<b>{html.escape(h.label)}</b>: {run.steps} steps, {h.samples[-1]:,} samples, final loss "
            f"{h.loss[-1]:.3f} (a short run: {epochs} epoch{'s' * (epochs > 1)}, at most {max_steps} steps)."
            + twin_text(run, shown, batch_norm=batch_norm))


def twin_text(run: Run, shown: list, *, batch_norm: bool = False) -> str:
    """An accumulated run beside the same batch taken whole (either one drawn now): do their curves coincide?

    ``batch_norm`` says whether the model has BatchNorm, which explains curves that differ.
    """
    s = run.setting
    twins = [r for r in shown if r is not run and r.done and r.setting.accumulation_steps != s.accumulation_steps
             and 1 in (r.setting.accumulation_steps, s.accumulation_steps)
             and (r.setting.model, r.setting.batch_size, r.setting.lr, r.setting.optimizer, r.setting.seed)
             == (s.model, s.batch_size, s.lr, s.optimizer, s.seed)]
    if not twins:
        return ""
    twin = twins[-1]  # the most recent
    split = run if s.accumulation_steps > 1 else twin
    gap = max(abs(a - b) for a, b in zip(run.history.loss, twin.history.loss))
    curves = (f"Its curve (dashed) and the one of <b>{html.escape(twin.history.label)}</b>" if split is run else
              f"The dashed curve of <b>{html.escape(twin.history.label)}</b> and this one")
    if gap < 1e-4:
        return (f" {curves} lie on each other: the losses differ by at most {gap:.1e}, because accumulating "
                f"{split.setting.accumulation_steps} micro-batches gives the same updates as the whole batch "
                f"(chapter 6).")
    why = ("BatchNorm normalises each micro-batch with its own statistics" if batch_norm
           else "the micro-batches' sums are rounded differently")
    return f" {curves} differ by up to {gap:.3f} in loss: {why} (chapter 6)."


def speed_text(run: Run) -> str:
    """The speed panel's HTML: samples per second of a finished run and its time per step."""
    per_step = 1000 * run.history.seconds[-1] / run.steps
    return (f"<b>{run.history.samples_per_second:,.0f} samples/s</b> at batch {run.setting.batch_size} "
            f"({per_step:.1f} ms per step), measured on this machine's CPU.")


def speed_points(runs, setting: RunSetting) -> dict:
    """``{batch size: samples/s}`` of the finished ``runs`` of ``setting``'s model and accumulation."""
    same = (setting.model, setting.accumulation_steps)
    return {r.setting.batch_size: r.history.samples_per_second for r in runs
            if r.done and (r.setting.model, r.setting.accumulation_steps) == same}


def notes_html(notes: list) -> str:
    """The explorer's notes (what it corrected or refused) as the HTML lines under its controls."""
    return "".join(f"<div style='color:#C44E52'>⚠ {html.escape(n)}</div>" for n in notes)
