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

import math
from dataclasses import dataclass, field

import psutil
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .datasets import digits
from .estimate import CUDA_CONSTANTS, estimate_memory, max_batch_size
from .memory import CATEGORIES
from .memory_plots import COLORS
from .models import MODEL_NAMES, build_model
from .steps import make_optimizer, train_step
from .validation import check_choice, check_int

GiB = 2**30
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


def plot_memory(points: dict, *, title: str = "") -> Figure:
    """Horizontal bars stacked by category, one per ``{label: MemoryPoint}``, against the device's size.

    On a GPU the CUDA context comes first (it is there before any tensor), then the tensors at the
    step's peak, then the allocator's cache: where the tensors end, against the dashed line, is the
    comparison of the tensors with what PyTorch may use (the device's size minus the context).
    """
    fig = Figure(figsize=(8.4, 0.9 + 0.55 * len(points)), layout="constrained")
    ax = fig.subplots()
    labels = list(points)[::-1]  # the first point on top
    profile = next(iter(points.values())).profile
    left = [0.0] * len(labels)
    for category in _bar_categories(points.values()):
        widths = [_category_bytes(points[label], category) / GiB for label in labels]
        color = COLORS.get(category, EXTRA_COLORS.get(category, "#B0B0B0"))
        ax.barh(labels, widths, left=left, color=color, label=category.replace("_", " "))
        left = [a + b for a, b in zip(left, widths)]
    ax.axvline(profile.capacity / GiB, color="black", linestyle="--", linewidth=1)
    ax.text(profile.capacity / GiB, 1.0, f" {_short(profile)}", transform=ax.get_xaxis_transform(),
            va="bottom", fontsize="small")
    ax.set_xlim(0, max(left + [profile.capacity / GiB]) * 1.08)
    ax.set_xlabel("GiB at the step's peak" + (": CUDA context, tensors, allocator cache" if profile.reserved else ""))
    fig.legend(loc="outside right upper", fontsize="x-small")
    if title:
        fig.suptitle(title, fontsize="medium", color="#C44E52" if "out of memory" in title else "black")
    return fig


EXTRA_COLORS = {"workspaces": "#B07AA1", "allocator rounding": "#BAB0AC", "allocator cache": "#E5E5E5",
                "CUDA context": "#7F7F7F"}


def _bar_categories(points) -> list:
    used = {c for p in points for c, b in p.breakdown.items() if b}
    order = [c for c in CATEGORIES if c in used] + sorted(used - set(CATEGORIES))
    order += ["allocator cache"] if any(p.cached_bytes for p in points) else []
    return (["CUDA context"] if any(p.profile.reserved for p in points) else []) + order


def _category_bytes(point: MemoryPoint, category: str) -> int:
    if category == "CUDA context":
        return point.profile.reserved
    return point.cached_bytes if category == "allocator cache" else point.breakdown.get(category, 0)


def _short(profile: Profile) -> str:
    return f"{profile.capacity / GiB:.0f} GiB GPU" if profile.device == "cuda" else "free RAM"


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


def plot_speed(points: dict, current=None, *, title: str = "") -> Figure:
    """Samples per second against batch size: ``{batch size: samples/s}``, ``current`` highlighted."""
    fig = Figure(figsize=(4.2, 3.0), layout="constrained")
    ax = fig.subplots()
    sizes = sorted(points)
    ax.plot(sizes, [points[b] for b in sizes], "o-", color="#4C72B0")
    if current in points:
        ax.plot([current], [points[current]], "o", markersize=11, markerfacecolor="none", color="#C44E52")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:,.0f}")  # 20,000 rather than 2×10⁴
    ax.yaxis.set_minor_locator(LogLocator(subs=(2, 5)))
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("batch size")
    ax.set_ylabel("samples per second (this CPU)")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize="medium")
    return fig
