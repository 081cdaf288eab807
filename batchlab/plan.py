"""A plan that keeps the effective batch: micro-batches x accumulation x precision x checkpointing (chapter 9).

Batch-size finders shrink the batch until a step fits; :func:`plan_fit` keeps the *effective* batch
(the samples per optimizer step, which set the learning rate and the training curve) and changes how
the step is run instead. For every precision and checkpointing setting it asks
:func:`batchlab.max_batch_size` once for the largest micro-batch that fits the budget, takes the fewest
micro-batches of at most that size that add up to the effective batch exactly (as equal as possible:
sizes differ by at most one sample, each weighted by its share as chapter 6 teaches), checks the whole
accumulated step with :func:`batchlab.estimate_memory`, and ranks the plans by their predicted cost.

How the cost is predicted (:func:`micro_step_seconds`): one micro-step of ``n`` samples takes
``max(floor, fixed + n x per_sample x recompute x precision_factor)`` seconds. ``fixed``, ``per_sample``
and ``floor`` are fitted to measured step times of ResNet-18 at 224x224 (SGD, fp32) on an NVIDIA H100
(``batchlab/data/gpu_memory_h100.json``): the two largest batches (64, 256) give the line, batch 1 the
floor below which the GPU is not kept busy. A plan's cost is the sum over its micro-batches, divided
by the time of one fp32 step on the whole effective batch (1.00 = as fast as the large batch would be
if it fitted). What is assumed, not measured: the same ratios for every model; ``recompute = 4/3`` for
checkpointing (one extra forward pass, a forward costing about half a backward); ``precision_factor
= 1`` for bf16 and fp16 (batchlab has no measured low-precision step time, so a plan never counts on a
speed-up that tensor cores may or may not give).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .checkpointing import checkpoint_blocks
from .estimate import estimate_memory
from .max_batch import max_batch_size
from .precision import PRECISIONS, check_precision
from .progress import progress_bar
from .reference import gpu_reference
from .steps import check_optimizer
from .validation import (
    batch_length,
    check_batch,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_loss_fn,
    check_model,
    format_bytes,
    parse_bytes,
    shape_of,
)

RECOMPUTE = 4 / 3  # checkpointing: forward (1) + backward (about 2) + the forward again (1) = 4 / 3 of a step
PRECISION_FACTOR = dict.fromkeys(PRECISIONS, 1.0)  # assumed: no measured low-precision speed-up (see above)


@functools.cache
def reference_step_times() -> tuple:
    """(fixed, per_sample, floor) seconds fitted to the H100 ResNet-18 rows (see the module docstring).

    Read on first use, so that ``import batchlab`` does not open the reference file.
    """
    rows = sorted(gpu_reference()["throughput_resnet18_224_sgd_fp32"], key=lambda row: row["batch"])
    (n1, t1), (n2, t2) = [(row["batch"], row["step_s"]) for row in rows[-2:]]
    per_sample = (t2 - t1) / (n2 - n1)
    return t1 - per_sample * n1, per_sample, rows[0]["step_s"]


def micro_step_seconds(n: int, *, precision: str = "fp32", checkpointing: bool = False) -> float:
    """Predicted seconds of one micro-step of ``n`` samples, on the reference scale (ResNet-18, H100)."""
    fixed, per_sample, floor = reference_step_times()
    work = n * per_sample * (RECOMPUTE if checkpointing else 1.0) * PRECISION_FACTOR[precision]
    return max(floor, fixed + work)


def split_evenly(total: int, parts: int) -> tuple:
    """``total`` samples in ``parts`` micro-batches as equal as possible (the larger ones first)."""
    size, extra = divmod(total, parts)
    return (size + 1,) * extra + (size,) * (parts - extra)


def describe_micro_batches(sizes) -> str:
    """``"128 x 2"`` for equal micro-batches, ``"86 x 1 + 85 x 2"`` for uneven ones."""
    counts = {}
    for size in sizes:
        counts[size] = counts.get(size, 0) + 1
    return " + ".join(f"{size} x {count}" for size, count in counts.items())


@dataclass(frozen=True)
class PlanOption:
    """One way to run a step of ``sum(micro_batches)`` samples: sizes, levers, memory (bytes) and cost.

    ``cost`` is the predicted time of the step relative to one fp32 step on the whole batch (see
    :mod:`batchlab.plan`); ``max_micro_batch`` what :func:`batchlab.max_batch_size` allows for this
    precision and checkpointing.
    """

    micro_batches: tuple
    precision: str
    checkpointing: bool
    peak_bytes: int
    reserved_bytes: int | None
    cost: float
    max_micro_batch: int

    @property
    def micro_batch(self) -> int:
        """The largest micro-batch (samples): the one the memory must hold."""
        return max(self.micro_batches)

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step."""
        return len(self.micro_batches)

    @property
    def even(self) -> bool:
        """True when every micro-batch has the same size (``train``'s ``accumulation_steps`` is then a number)."""
        return len(set(self.micro_batches)) == 1


@dataclass
class FitPlan:
    """What :func:`plan_fit` found: every option, best first; the attributes are the best one's.

    ``print(plan)`` shows them as a table (the chosen one marked ``*``); ``plan.train_kwargs()`` is
    what :func:`batchlab.train` needs to run it: ``batchlab.train(model, data, **plan.train_kwargs())``.
    """

    effective_batch: int
    budget: int
    device: str
    optimizer: object
    options: list
    notes: list = field(default_factory=list)

    @property
    def chosen(self) -> PlanOption:
        return self.options[0]

    micro_batch = property(lambda self: self.chosen.micro_batch, doc="The largest micro-batch of the best plan.")
    micro_batches = property(lambda self: list(self.chosen.micro_batches), doc="Its micro-batch sizes.")
    accumulation_steps = property(lambda self: self.chosen.accumulation_steps, doc="Its micro-batches per step.")
    precision = property(lambda self: self.chosen.precision)
    checkpointing = property(lambda self: self.chosen.checkpointing)
    peak_bytes = property(lambda self: self.chosen.peak_bytes)
    reserved_bytes = property(lambda self: self.chosen.reserved_bytes)
    cost = property(lambda self: self.chosen.cost)

    def train_kwargs(self, option: PlanOption | None = None) -> dict:
        """``batchlab.train``'s arguments for the best plan (or ``option``): the effective batch is kept.

        ``accumulation_steps`` is a number for equal micro-batches and the list of sizes otherwise. The
        optimizer is included when it is a name ("sgd", "adam"); pass your own function to ``train`` again.
        """
        option = self.chosen if option is None else option
        kwargs = dict(
            batch_size=self.effective_batch,
            accumulation_steps=option.accumulation_steps if option.even else list(option.micro_batches),
            precision=option.precision,
            checkpointing="blocks" if option.checkpointing else None,
        )
        if isinstance(self.optimizer, str):
            kwargs["optimizer"] = self.optimizer
        return kwargs

    def learning_rate(self, base_lr: float, base_batch: int) -> float:
        """The learning rate for the effective batch by linear scaling (chapters 1 and 6).

        ``base_lr`` is a learning rate that worked at ``base_batch`` samples per step. Micro-batches do
        not change it: the step still averages the gradient over ``effective_batch`` samples.
        """
        check_float("base_lr", base_lr)
        check_int("base_batch", base_batch, minimum=1)
        return base_lr * self.effective_batch / base_batch

    def learning_rate_note(self) -> str:
        return (
            f"Learning rate: every step averages the gradient over {self.effective_batch} samples whatever the "
            f"micro-batches, so keep the learning rate of batch {self.effective_batch}; from one tuned at a "
            f"smaller batch, scale it linearly: plan.learning_rate(base_lr, base_batch) = base_lr x "
            f"{self.effective_batch} / base_batch (chapter 1's rule, with its warm-up and its limits)."
        )

    def __repr__(self) -> str:
        header = (
            "",
            "micro-batches",
            "steps",
            "largest fitting",
            "precision",
            "checkpointing",
            "peak",
            "reserved",
            "cost",
        )
        rows = [
            (
                "*" if i == 0 else "",
                describe_micro_batches(o.micro_batches),
                str(o.accumulation_steps),
                str(o.max_micro_batch),
                o.precision,
                "blocks" if o.checkpointing else "no",
                format_bytes(o.peak_bytes),
                format_bytes(o.reserved_bytes) if o.reserved_bytes is not None else "-",
                f"{o.cost:.2f}",
            )
            for i, o in enumerate(self.options)
        ]
        widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
        count = f"{len(self.options)} option{'s' if len(self.options) != 1 else ''}"
        lines = [
            f"FitPlan: effective batch {self.effective_batch} in {format_bytes(self.budget)} on {self.device} "
            f"({count}, best first; largest fitting = batchlab.max_batch_size; cost = predicted step time / "
            f"one fp32 step of the whole batch)"
        ]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
        lines += [f"note: {note}" for note in self.notes] + [self.learning_rate_note()]
        return "\n".join(lines)


def plan_fit(
    model: nn.Module,
    make_batch,
    *,
    budget,
    effective_batch: int,
    optimizer="sgd",
    loss_fn=None,
    device: str = "cuda",
    precisions=("fp32", "bf16"),
    checkpointing=(False, True),
    progress: bool = True,
) -> FitPlan:
    """The ways to train ``model`` with exactly ``effective_batch`` samples per optimizer step in ``budget``.

    ``make_batch(n)`` returns a batch (inputs, targets) of ``n`` samples (meta tensors cost nothing); it is
    called for batches of 1 up to ``effective_batch`` samples. ``budget``: bytes or a string ("4GiB") that
    PyTorch may use on ``device`` (a GPU's size minus the CUDA context, ``CUDA_CONSTANTS["cuda_context"]``).
    ``precisions`` and ``checkpointing``: the settings to try (a single one is accepted too); checkpointing
    means every block (:func:`batchlab.checkpointed`), and is skipped, with a note, for a model without blocks.

    For each setting: the largest micro-batch :func:`batchlab.max_batch_size` allows, the fewest micro-batches
    of at most that size (sizes as equal as possible, adding up to ``effective_batch``), and the accumulated
    step estimated by :func:`batchlab.estimate_memory` in ``budget``, which must fit too, with max_batch_size's
    margin (``keep_margin=True``; else one micro-batch more). ``peak_bytes``: its allocated peak;
    ``reserved_bytes``: what the caching allocator holds at most when it frees its cache at the budget, as a GPU
    that size would. Options are ranked by predicted cost (see :mod:`batchlab.plan`), then fewer micro-batches,
    fp32 before lower precision, no checkpointing first. Nothing fits: a ``ValueError`` with what a batch of one
    needs, by category, and the levers that would help. Estimates are cached (same micro-batch, precision and
    checkpointing); ``model`` is only read. ``progress`` draws a bar over the settings.
    """
    check_bool("progress", progress)
    budget, effective_batch, levers, notes = _check_plan_args(
        model, make_batch, budget, effective_batch, optimizer, loss_fn, device, precisions, checkpointing
    )
    common = dict(optimizer=optimizer, loss_fn=loss_fn, device=device)
    cache = {}
    smallest = _smallest_batch(model, make_batch, common, cache)
    if effective_batch < smallest:
        raise ValueError(
            f"effective_batch must be at least {smallest} for this model (BatchNorm needs two samples "
            f"per micro-batch in training), got {effective_batch}"
        )
    options = []
    with progress_bar(progress, total=len(levers), desc="plan_fit", unit="setting") as bar:
        for precision, checkpoint in levers:
            bar.set_postfix(precision=precision, checkpointing=checkpoint, refresh=False)
            option = _plan_for(
                model, make_batch, budget, effective_batch, smallest, precision, checkpoint, common, cache
            )
            if option is not None:
                options.append(option)
            bar.update()
    if not options:
        raise ValueError(_nothing_fits(model, make_batch, budget, effective_batch, smallest, levers, common, cache))
    options.sort(key=lambda o: (round(o.cost, 6), o.accumulation_steps, PRECISIONS.index(o.precision), o.checkpointing))
    return FitPlan(effective_batch, budget, device, optimizer, options, notes)


def _estimate(model, make_batch, n, accumulation, precision, checkpoint, common, cache, budget=None):
    """estimate_memory of ``n`` samples in ``accumulation`` micro-batches, cached; None if it exceeds ``budget``.

    With a budget the simulated caching allocator works inside it (it frees its cache before giving
    up) and keeps max_batch_size's margin free, as :func:`batchlab.max_batch_size` counts fitting, so
    ``reserved_bytes`` is at most the budget.
    """
    key = (n, accumulation, precision, checkpoint, budget)
    if key not in cache:
        try:
            cache[key] = estimate_memory(
                model,
                make_batch(n),
                accumulation_steps=accumulation,
                precision=precision,
                checkpointing="blocks" if checkpoint else None,
                budget=budget,
                keep_margin=budget is not None,
                **common,
            )
        except torch.OutOfMemoryError:
            cache[key] = None
    return cache[key]


def _plan_for(model, make_batch, budget, effective_batch, smallest, precision, checkpoint, common, cache):
    """The option for one precision and checkpointing setting, or None if not even ``smallest`` fits."""
    try:
        largest = max_batch_size(
            model,
            make_batch,
            budget=budget,
            limit=effective_batch,
            precision=precision,
            checkpointing="blocks" if checkpoint else None,
            progress=False,
            **common,
        )
    except ValueError as error:
        if "does not fit" not in str(error):
            raise
        return None
    parts = math.ceil(effective_batch / largest)
    while True:
        sizes = split_evenly(effective_batch, parts)
        if sizes[-1] < smallest:
            return None
        # The accumulated step as train runs it: the whole batch's inputs are alive all along, and the
        # gradients of the earlier micro-batches while the next one runs.
        n, accumulation = effective_batch, (1 if parts == 1 else tuple(sizes))
        report = _estimate(model, make_batch, n, accumulation, precision, checkpoint, common, cache, budget)
        if report is not None:
            break
        if sizes[0] <= smallest:
            return None
        parts = math.ceil(effective_batch / (sizes[0] - 1))  # a micro-batch one sample smaller
    seconds = sum(micro_step_seconds(size, precision=precision, checkpointing=checkpoint) for size in sizes)
    return PlanOption(
        sizes,
        precision,
        checkpoint,
        report.peak_bytes,
        report.reserved_bytes,
        seconds / micro_step_seconds(effective_batch),
        largest,
    )


def _smallest_batch(model, make_batch, common, cache) -> int:
    """1, or 2 for a model that cannot train on one sample (BatchNorm); checks that the model takes the batch."""
    for n in (1, 2):
        try:
            _estimate(model, make_batch, n, 1, "fp32", False, common, cache)
            return n
        except ValueError as error:
            if "more than 1 value per channel" not in str(error):
                raise
        except NotImplementedError:
            raise  # the meta device cannot run an operation: estimate_memory's own message says where
        except RuntimeError as error:
            inputs, _ = make_batch(n)
            raise ValueError(
                f"make_batch returned inputs of shape {shape_of(inputs)}, which the model cannot "
                f"take: {str(error).splitlines()[0]}. make_batch(n) must build n samples of the "
                f"shape the model expects"
            ) from error
    raise AssertionError("unreachable: a batch of two has two values per channel")


def _check_plan_args(model, make_batch, budget, effective_batch, optimizer, loss_fn, device, precisions, checkpointing):
    """Every argument of :func:`plan_fit`, checked before any estimate runs; returns what the search needs."""
    check_model(model)
    budget = parse_bytes("budget", budget)
    check_int("effective_batch", effective_batch, minimum=1)
    check_optimizer(optimizer)
    check_loss_fn(loss_fn)
    check_choice("device", device, ("cuda", "cpu"))
    precisions = _settings(
        "precisions", precisions, str, lambda p: check_precision(p, "precisions"), "'fp32', 'bf16', 'fp16'"
    )
    checkpoints = _settings(
        "checkpointing", checkpointing, bool, lambda c: check_bool("checkpointing", c), "False, True"
    )
    notes = []
    if True in checkpoints and not checkpoint_blocks(model):
        if checkpoints == (True,):
            raise ValueError(
                f"checkpointing=True needs a model with blocks to checkpoint, and {type(model).__name__} "
                f"has none (see batchlab.checkpoint_blocks): pass checkpointing=False"
            )
        checkpoints = tuple(c for c in checkpoints if not c)
        notes.append(f"{type(model).__name__} has no blocks batchlab can checkpoint: plans without checkpointing only")
    weights = 2 * sum(p.numel() * p.element_size() for p in model.parameters())
    if budget < weights:
        raise ValueError(
            f"budget {format_bytes(budget)} is smaller than the model's weights and gradients alone "
            f"({format_bytes(weights)}): no batch can fit; give a budget of at least that plus the "
            f"optimizer state and the activations"
        )
    _check_make_batch(make_batch, effective_batch)
    return budget, effective_batch, [(p, c) for p in precisions for c in checkpoints], notes


def _settings(name, value, kind, check, works) -> tuple:
    """A single setting or a non-empty tuple/list of them, each checked, duplicates dropped."""
    values = (value,) if isinstance(value, kind) else value
    if not isinstance(values, (tuple, list)) or not values:
        raise ValueError(f"{name} must be one setting or a non-empty tuple of them ({works}), got {value!r}")
    for item in values:
        check(item)
    return tuple(dict.fromkeys(values))


def _check_make_batch(make_batch, effective_batch: int) -> None:
    """make_batch(n) returns n samples of one shape for n = 1 and ``effective_batch`` (the sizes the plan asks for)."""
    if not callable(make_batch):
        raise TypeError(f"make_batch must be a function n -> (inputs, targets), got {make_batch!r}")
    shapes = {}
    for n in dict.fromkeys((1, effective_batch)):
        try:
            inputs, targets = check_batch(make_batch(n), f"make_batch({n})", keyword_inputs=True)
        except (IndexError, RuntimeError) as error:
            raise ValueError(
                f"effective_batch {effective_batch} is more than make_batch can make: make_batch({n}) "
                f"failed with {type(error).__name__}: {error}"
            ) from error
        made = batch_length(inputs)
        if made != n:
            if n == effective_batch > made:
                what = f"effective_batch {effective_batch} is larger than make_batch can make"
            else:
                what = f"make_batch({n}) must return {n} samples"
            raise ValueError(
                f"{what}: make_batch({n}) returned inputs of shape {shape_of(inputs)}; make_batch(n) "
                f"must build a batch with n as its first dimension"
            )
        shapes[n] = shape_of(inputs, per_sample=True)
    if len({str(shape) for shape in shapes.values()}) > 1:
        raise ValueError(f"make_batch must build samples of one shape, but it gave {shapes} (n: shape per sample)")


def _nothing_fits(model, make_batch, budget, effective_batch, smallest, levers, common, cache) -> str:
    """Why not even a micro-batch of ``smallest`` fits: what it needs by category, and the levers that help."""
    base = _estimate(model, make_batch, smallest, 1, "fp32", False, common, cache)
    parts = ", ".join(f"{c} {format_bytes(b)}" for c, b in sorted(base.breakdown.items(), key=lambda cb: -cb[1]) if b)
    needed = max(base.peak_bytes, base.reserved_bytes or 0)
    savings = {
        "bf16 autocast (precisions=('bf16',), chapter 8)": needed
        - _needed(_estimate(model, make_batch, smallest, 1, "bf16", False, common, cache))
    }
    if checkpoint_blocks(model):
        savings["activation checkpointing (checkpointing=True, chapter 8)"] = needed - _needed(
            _estimate(model, make_batch, smallest, 1, "fp32", True, common, cache)
        )
    state = base.breakdown.get("optimizer_state", 0)
    name = common["optimizer"] if isinstance(common["optimizer"], str) else "this optimizer"
    savings[f"an optimizer with less state than {name!r} (SGD without momentum keeps none, chapter 8)"] = state
    fixed = sum(base.breakdown.get(c, 0) for c in ("parameters", "gradients", "optimizer_state"))
    savings[
        "a smaller model (its weights, gradients and optimizer state: half the parameters, half of "
        f"{format_bytes(fixed)})"
    ] = fixed // 2
    scaled = sum(base.breakdown.get(c, 0) for c in ("activations", "inputs"))
    savings[f"a smaller input (activations and inputs scale with it: half of {format_bytes(scaled)})"] = scaled // 2
    over = needed - budget
    if over <= 0:  # one micro-batch fits alone: what does not is the step that holds the whole batch
        inputs = base.breakdown.get("inputs", 0) * effective_batch // smallest
        return (
            f"nothing fits: a micro-batch of {smallest} fits budget {format_bytes(budget)} on "
            f"{common['device']} alone (it needs {format_bytes(needed)}), but a step of {effective_batch} samples "
            f"keeps the whole batch's inputs alive while its micro-batches run (train loads the effective "
            f"batch at once): about {format_bytes(inputs)} of inputs beside the model's "
            f"{format_bytes(fixed)} of weights, gradients and optimizer state. Use a smaller effective_batch, "
            f"smaller inputs, a lighter optimizer or a larger budget (tried {', '.join(p for p, _ in levers)})."
        )
    ranked = sorted(savings.items(), key=lambda kv: -kv[1])
    advice = "; ".join(
        f"{lever}: saves about {format_bytes(max(s, 0))}{' (enough alone)' if s >= over else ''}" for lever, s in ranked
    )
    tried = ", ".join(f"{p}{' checkpointed' if c else ''}" for p, c in levers)
    return (
        f"nothing fits: plan_fit found no way to run {effective_batch} samples per step in budget "
        f"{format_bytes(budget)} on {common['device']}, not even micro-batches of {smallest} (tried {tried}). "
        f"A batch of {smallest} in fp32 needs {format_bytes(needed)} ({parts}), {format_bytes(over)} over the "
        f"budget. The lever that helps most comes first: {advice}. Or a larger budget."
    )


def _needed(report) -> int:
    return max(report.peak_bytes, report.reserved_bytes or 0)
