"""What the batch-size explorer reads from a learner and says back, as pure functions.

**Reading**: the checks of the explorer's arguments and the readers of what a learner types or picks
(a learning rate, a model, a device profile, accumulation steps): each returns the value to use and
the notes that explain a correction, never raising for what a control may hold.

**Saying**, from the results of :mod:`batchlab.explorer` and :mod:`batchlab.explorer_runs`: each returns
the HTML of one panel's line of text (``widgets.HTML``): the memory verdict and the numbers behind it,
the progress and result of a convergence run (and whether an accumulated run lies on its whole-batch
twin), the speed measured, the notes under the controls. Sizes are in bytes.
"""

from __future__ import annotations

import html
import math

from .explorer import (
    CHECKPOINTING,
    CPU_PROFILE,
    IMAGE_SHAPE,
    MemoryPoint,
    fit_accumulation,
    profile_for,
)
from .explorer_runs import RUNS, Run, RunSetting
from .models import MODEL_NAMES
from .precision import PRECISIONS
from .validation import GiB, MiB, check_choice, check_float, check_int, parse_bytes

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
    if (
        shape is None
        or len(shape) != 3
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
    ):
        raise ValueError(
            f"image_shape must be (channels, height, width), three positive whole numbers such as "
            f"{IMAGE_SHAPE}, got {image_shape!r}"
        )
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
    return used, [] if used == lr else [
        f"learning rate {lr:g} is outside {LR_RANGE[0]:g} to {LR_RANGE[1]:g}; using {used:g}."
    ]


def read_model(value, models=MODEL_NAMES) -> tuple:
    """``(model name or None, notes)`` for what a learner chose: a name of ``models``, or refused."""
    if isinstance(value, str) and value in models:
        return value, []
    return None, [f"model {value!r} does not exist; the models are {', '.join(models)}."]


def read_profile(value, profiles: dict) -> tuple:
    """``(profile name or None, notes)``: the profile ``value`` means, a new simulated GPU added to ``profiles``
    for a card or a size typed in (:func:`batchlab.explorer.profile_for`), or refused."""
    try:
        return profile_for(value, profiles), []
    except (TypeError, ValueError) as error:
        return None, [
            f"device {value!r} is not one of the profiles ({', '.join(profiles)}), a card or a GPU "
            f"size such as '12GiB': {error}"
        ]


def read_steps(value, current: int) -> tuple:
    """``(accumulation steps or None, notes)``: ``value`` as a whole number, or refused (``current`` kept)."""
    try:
        return int(value), []
    except (TypeError, ValueError):
        return None, [f"accumulation steps: {value!r} is not a whole number; kept {current}."]


def read_choice(name: str, value, choices) -> tuple:
    """``(value or None, notes)``: ``value`` if it is one of ``choices``, else refused with the choices."""
    if isinstance(value, str) and value in choices:
        return value, []
    return None, [f"{name} {value!r} is not one of {', '.join(map(repr, choices))}; kept as it was."]


def levers_text(levers) -> str:
    """ ", bf16, checkpointed" for chapter 8's levers (precision, checkpointing); "" for float32 without."""
    precision, checkpointing = levers
    return (f", {precision}" if precision != "fp32" else "") + (", checkpointed" if checkpointing else "")


def check_start(
    batch_size, limit, lr, profile, gpu, accumulation_steps, precision, checkpointing, profiles: dict
) -> str:
    """Check the batch-size explorer's starting values (a ValueError or TypeError naming the bad one);
    return the name of the profile that ``profile`` (or ``gpu``, a card or size) means."""
    check_int("batch_size", batch_size, minimum=1, maximum=limit)
    check_lr(lr)
    profile_name, refused = read_profile(profile if gpu is None else gpu, profiles)
    if profile_name is None:
        raise ValueError(f"{'profile' if gpu is None else 'gpu'}: {refused[0]}")
    if fit_accumulation(batch_size, check_int("accumulation_steps", accumulation_steps, minimum=1))[1]:
        raise ValueError(
            f"accumulation_steps must divide batch_size into equal micro-batches, got "
            f"{accumulation_steps} for batch {batch_size}"
        )
    check_choice("precision", precision, PRECISIONS)
    check_choice("checkpointing", checkpointing, tuple(CHECKPOINTING))
    return profile_name


def check_lr(lr) -> float:
    """``lr`` if it is a number in :data:`LR_RANGE`, else a ValueError naming it."""
    if not LR_RANGE[0] <= check_float("lr", lr) <= LR_RANGE[1]:
        raise ValueError(f"lr must be between {LR_RANGE[0]} and {LR_RANGE[1]}, got {lr}")
    return lr


# -- what the panels say ---------------------------------------------------------------------------


def size_text(nbytes: int) -> str:
    """``nbytes`` as the panels write it: GiB with two decimals from 1 GiB up, else whole MiB."""
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB else f"{nbytes / MiB:.0f} MiB"


def micro_text(s: RunSetting) -> str:
    """ " (4 x 16)" for a batch of 64 in 4 micro-batches, "" without accumulation."""
    k = s.accumulation_steps
    return f" ({k} x {s.batch_size // k})" if k > 1 else ""


def describe_input(model_name: str, input_shape) -> str:
    """ "cnn on 3x224x224 images" or "transformer on sequences of 512 tokens" (a learner's model: its batches)."""
    if callable(input_shape):
        return f"{model_name} on the batches of {getattr(input_shape, '__name__', 'make_batch')}"
    shape = "x".join(map(str, input_shape))
    return f"{model_name} on " + (f"sequences of {shape} tokens" if model_name == "transformer" else f"{shape} images")


def memory_text(s: RunSetting, point: MemoryPoint, largest: int | None, input_shape: tuple) -> str:
    """The memory panel's HTML under the bars: the verdict, the numbers behind it and the largest batch.

    What is compared with the budget is the tensors at the step's peak (and, on a GPU, the blocks the
    caching allocator reserves for them); the CUDA context is taken off the device's size first.
    ``largest`` None means the search for the largest batch is still running, 0 that none fits.
    """
    profile = point.profile
    where = (
        f"the {size_text(profile.capacity)} GPU, whose other {size_text(profile.reserved)} are the CUDA context"
        if profile.device == "cuda"
        else "this machine's free RAM"
    )
    need = (
        f"One training step of {describe_input(s.model, input_shape)} at batch {s.batch_size} needs "
        f"{size_text(point.peak_bytes)} of tensors at its peak"
    )
    budget = size_text(profile.budget)
    within = f"within the {budget} PyTorch can use of {where}"
    cache = f" with the allocator's cache ({size_text(point.cached_bytes)})" if profile.device == "cuda" else ""
    margin = f"room for one more block of its largest tensor ({size_text(point.margin_bytes)})"
    if point.verdict == "fits":
        head = (
            f"<b>Fits.</b> {need};{cache} that is {within}, with {margin} to spare: the margin chapter 4 asks for "
            f"decided it."
        )
    elif point.verdict == "margin":
        head = (
            f"<b style='color:#C44E52'>Too close to the limit.</b> {need};{cache} that is {within}, but without "
            f"{margin}: aim below the limit (chapter 4). The margin decided it."
        )
    elif point.verdict == "allocator":
        head = (
            f"<b style='color:#C44E52'>Out of memory.</b> {need}, {within}, but even after releasing its cache "
            f"the caching allocator cannot place the step's blocks there (fragmentation). The simulated "
            f"allocator decided it, not the tensors."
        )
    else:
        head = (
            f"<b style='color:#C44E52'>Out of memory.</b> {need}: {size_text(point.peak_bytes - profile.budget)} "
            f"more than the {budget} PyTorch can use of {where}. The tensors alone decided it."
        )
    if profile.device == "cuda":  # the bar: context, tensors, cache
        total = size_text(point.device_bytes + point.cached_bytes)
        head += (
            f" The bar shows the context, the tensors and the cache: {total}."
            if point.cached_bytes
            else f" The bar shows the context and the tensors: {total}."
        )
    return head + " " + largest_text(s, point, largest)


def largest_text(s: RunSetting, point: MemoryPoint, largest: int | None) -> str:
    """The sentence about the largest batch that fits, and how to keep a batch that does not by accumulating."""
    if largest is None:
        return "Searching for the largest batch that fits…"
    if not largest:
        return "Not even the smallest batch fits this device."
    text = f"The largest batch that fits in one step: <b>{largest:,}</b> (estimated, with max_batch_size's margin)."
    if not point.fits:
        k = next(
            (k for k in range(2, s.batch_size + 1) if s.batch_size % k == 0 and s.batch_size // k <= largest), None
        )
        if k is not None:
            text += (
                f" To keep the batch of {s.batch_size}, accumulate {k} micro-batches of {s.batch_size // k} "
                f"(accumulation steps = {k})."
            )
    return text


def explain_training_error(error: Exception, s: RunSetting) -> Exception:
    """The error to show for a run of ``s`` that failed: BatchNorm's raw error on a one-sample batch becomes
    a sentence that says why and what to do; any other error is returned as it is."""
    if isinstance(error, ValueError) and "Expected more than 1 value per channel when training" in str(error):
        micro = s.batch_size // s.accumulation_steps
        return ValueError(
            f"{s.model} cannot train on batches of {micro} sample: its BatchNorm layers need 2 or more "
            f"samples per (micro-)batch in training, to compute a mean and a variance over the batch. "
            f"Choose a batch of 2 or more (or fewer accumulation steps)."
        )
    return error


def run_text(run: Run, shown: list, *, batch_norm: bool = False) -> str:
    """The convergence panel's HTML: progress of a run in flight, or its result and how it compares."""
    h = run.history
    if not run.done:
        return f"Training <b>{html.escape(h.label)}</b>: step {len(h.loss)} of {run.steps}…"
    epochs, max_steps = RUNS[run.setting.model]
    return (
        f"<b>{html.escape(h.label)}</b>: {run.steps} steps, {h.samples[-1]:,} samples, final loss "
        f"{h.loss[-1]:.3f} (a short run: {epochs} epoch{'s' * (epochs > 1)}, at most {max_steps} steps)."
        + twin_text(run, shown, batch_norm=batch_norm)
    )


def twin_text(run: Run, shown: list, *, batch_norm: bool = False) -> str:
    """An accumulated run beside the same batch taken whole (either one drawn now): do their curves coincide?

    ``batch_norm`` says whether the model has BatchNorm, which explains curves that differ.
    """
    s = run.setting
    twins = [
        r
        for r in shown
        if r is not run
        and r.done
        and r.setting.accumulation_steps != s.accumulation_steps
        and 1 in (r.setting.accumulation_steps, s.accumulation_steps)
        and (r.setting.model, r.setting.batch_size, r.setting.lr, r.setting.optimizer, r.setting.seed)
        == (s.model, s.batch_size, s.lr, s.optimizer, s.seed)
    ]
    if not twins:
        return ""
    twin = twins[-1]  # the most recent
    split = run if s.accumulation_steps > 1 else twin
    gap = max(abs(a - b) for a, b in zip(run.history.loss, twin.history.loss))
    curves = (
        f"Its curve (dashed) and the one of <b>{html.escape(twin.history.label)}</b>"
        if split is run
        else f"The dashed curve of <b>{html.escape(twin.history.label)}</b> and this one"
    )
    if gap < 1e-4:
        return (
            f" {curves} lie on each other: the losses differ by at most {gap:.1e}, because accumulating "
            f"{split.setting.accumulation_steps} micro-batches gives the same updates as the whole batch "
            f"(chapter 6)."
        )
    why = (
        "BatchNorm normalises each micro-batch with its own statistics"
        if batch_norm
        else "the micro-batches' sums are rounded differently"
    )
    return f" {curves} differ by up to {gap:.3f} in loss: {why} (chapter 6)."


def speed_text(run: Run) -> str:
    """The speed panel's HTML: samples per second of a finished run and its time per step."""
    per_step = 1000 * run.history.seconds[-1] / run.steps
    return (
        f"<b>{run.history.samples_per_second:,.0f} samples/s</b> at batch {run.setting.batch_size} "
        f"({per_step:.1f} ms per step), measured on this machine's CPU."
    )


def notes_html(notes: list) -> str:
    """The explorer's notes (what it corrected or refused) as the HTML lines under its controls."""
    return "".join(f"<div style='color:#C44E52'>⚠ {html.escape(n)}</div>" for n in notes)
