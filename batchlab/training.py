"""A readable training loop (chapter 1; chapter 6 walks through its accumulation part line by line).

:func:`train` is the loop every chapter uses: batches from a shuffled ``DataLoader``, one optimizer step
per *effective* batch, optionally split into micro-batches whose gradients are accumulated. It returns
a :class:`History` of the loss, the samples seen and the wall-clock time after every step.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from .checkpointing import apply_checkpointing, check_checkpointing
from .precision import check_autocast, check_precision, make_scaler
from .progress import progress_bar
from .state import forked_rng, restore_grads, restore_modes, saved_modes, stash_grads, train_mode
from .steps import check_optimizer, make_optimizer, train_step
from .validation import (
    check_bool,
    check_dataset,
    check_device,
    check_float,
    check_int,
    check_loss_fn,
    check_model,
    check_seed,
    check_trainable,
    describe,
    device_of,
)


@dataclass
class History:
    """What happened during :func:`train`, one entry per optimizer step.

    ``loss`` is the mean loss over the step's effective batch, ``samples`` the number of samples seen
    after the step, ``seconds`` the wall-clock training time since the start (evaluation excluded). ``eval_steps`` and
    ``eval_accuracy`` hold the accuracy on ``eval_dataset`` (0 to 1) after the given steps; ``notes``
    what training changed on its own (``on_oom="halve"``); ``skipped_steps`` the steps whose update
    ``torch.amp.GradScaler`` skipped because a gradient was inf or nan (``precision="fp16"``; the
    loss of such a step is still recorded). Two histories compare equal when everything but the
    wall-clock times is equal.
    """

    label: str
    batch_size: int
    loss: list = field(default_factory=list)
    samples: list = field(default_factory=list)
    seconds: list = field(default_factory=list, compare=False)
    eval_steps: list = field(default_factory=list)
    eval_accuracy: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    skipped_steps: list = field(default_factory=list)

    @property
    def steps(self) -> list:
        """Optimizer step numbers, 1, 2, ... (the x axis of a loss-per-step plot)."""
        return list(range(1, len(self.loss) + 1))

    @property
    def samples_per_second(self) -> float:
        """Training throughput over the whole run (samples / second)."""
        return self.samples[-1] / self.seconds[-1] if self.seconds and self.seconds[-1] > 0 else float("nan")

    def __repr__(self) -> str:
        last = f", final loss {self.loss[-1]:.4f}" if self.loss else ""
        accuracy = f", accuracy {self.eval_accuracy[-1]:.3f}" if self.eval_accuracy else ""
        skipped = f", {len(self.skipped_steps)} skipped by GradScaler" if self.skipped_steps else ""
        return f"History({self.label!r}: {len(self.loss)} steps{last}{accuracy}{skipped})"


def train(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int | None = None,
    epochs: int | None = None,
    steps: int | None = None,
    optimizer="sgd",
    lr: float = 0.05,
    accumulation_steps: int = 1,
    loss_fn=None,
    device="cpu",
    seed: int = 0,
    progress: bool = True,
    eval_dataset: Dataset | None = None,
    label: str | None = None,
    shuffle: bool = True,
    on_oom: str | None = None,
    precision: str = "fp32",
    checkpointing=None,
    plan=None,
) -> History:
    """Train ``model`` on ``dataset`` and return its :class:`History`.

    * ``batch_size``: samples per optimizer step (the *effective* batch). Batches are drawn from a
      shuffled ``DataLoader`` with ``drop_last=True``, so every step sees exactly ``batch_size`` samples.
    * ``epochs`` or ``steps`` (exactly one): how long to train.
    * ``optimizer``: ``"sgd"`` (momentum 0.9), ``"adam"``, or a function ``params -> Optimizer``.
    * ``accumulation_steps``: split every batch into this many equal micro-batches and accumulate their
      gradients before the step: same result, less activation memory (chapter 6). A list of sizes that add
      up to ``batch_size`` gives uneven micro-batches, each weighted by its share (``batchlab.plan_fit``).
    * ``loss_fn``: defaults to cross-entropy (mean over the batch).
    * ``seed``: fixes the shuffling and any randomness in the model, so the same seed gives the same
      History; the global random state is left as it was.
    * ``eval_dataset``: if given, accuracy is measured after each epoch and after the last step.
    * ``progress``: a ``tqdm.auto`` bar over the steps, with the last loss (:mod:`batchlab.progress`).
    * ``shuffle=False`` takes the samples in the data set's order (chapter 7 uses it to replay the
      exact global batches that distributed training saw).
    * ``on_oom="halve"``: when a step runs out of memory, free it, halve the micro-batch (double the
      accumulation steps, so the effective batch stays the same), and redo the step; the change is
      printed and kept in ``History.notes`` (chapter 4).
    * ``precision`` (chapter 8): ``"fp32"``, ``"bf16"`` (autocast) or ``"fp16"`` (autocast with a
      ``torch.amp.GradScaler``; steps it skips are listed in ``History.skipped_steps``).
    * ``checkpointing`` (chapter 8): None, ``"blocks"`` (checkpoint every block) or a number of
      segments: the model runs through :func:`batchlab.checkpointed` (the model itself is not changed).
    * ``plan``: a :class:`batchlab.FitPlan` from :func:`batchlab.plan_fit` (chapter 9), which gives
      ``batch_size``, ``accumulation_steps``, ``precision``, ``checkpointing`` and a named optimizer;
      ``train(model, data, plan=plan, steps=...)`` is ``train(model, data, **plan.train_kwargs(), steps=...)``.

    The model is moved to ``device`` and trained in place. Arguments are checked before anything is
    touched; if training fails or is interrupted, the model's weights, device and mode are restored.
    """
    if plan is not None:
        given = dict(
            batch_size=batch_size,
            accumulation_steps=accumulation_steps,
            precision=precision,
            checkpointing=checkpointing,
            optimizer=optimizer,
        )
        batch_size, accumulation_steps, precision, checkpointing, optimizer = _from_plan(plan, given).values()
    total_steps = _check_train_args(
        model,
        dataset,
        batch_size,
        epochs,
        steps,
        optimizer,
        lr,
        accumulation_steps,
        loss_fn,
        device,
        seed,
        eval_dataset,
    )
    check_bool("shuffle", shuffle)
    check_bool("progress", progress)
    if on_oom not in (None, "halve"):
        raise ValueError(f"on_oom must be None (let the error through) or 'halve', got {on_oom!r}")
    if label is not None and not isinstance(label, str):
        raise TypeError(f"label must be a string or None, got {label!r}")
    loss_fn = checked_loss(check_loss_fn(loss_fn))
    device = check_device(device)
    check_autocast(device.type, check_precision(precision))
    check_checkpointing(model, checkpointing)  # a model without blocks is refused before anything runs
    history = History(label or f"batch {batch_size}, lr {lr:g}", batch_size)
    saved_state = copy.deepcopy(model.state_dict())
    saved_device, modes, grads = device_of(model), saved_modes(model), stash_grads(model)
    try:
        with forked_rng(device):
            torch.manual_seed(seed)
            train_mode(model.to(device))
            opt = make_optimizer(optimizer, model.parameters(), lr=lr)
            step = dict(loss_fn=loss_fn, precision=precision, scaler=make_scaler(device.type, precision))
            _run(
                apply_checkpointing(model, checkpointing),
                dataset,
                opt,
                step,
                device,
                seed,
                batch_size,
                accumulation_steps,
                total_steps,
                eval_dataset,
                progress,
                history,
                shuffle,
                on_oom,
            )
    except BaseException:
        # Each step of the restore only copies into tensors that exist: it cannot fail halfway.
        model.to(saved_device)
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                tensor.copy_(saved_state[name])
        restore_grads(grads)
        raise
    finally:
        restore_modes(modes)
    _warn_if_diverged(history, lr)
    return history


def checked_loss(loss_fn):
    """``loss_fn`` with readable errors: labels outside the model's classes and outputs of the wrong shape
    name ``dataset`` (torch's own messages do not say which argument is wrong)."""
    if not isinstance(loss_fn, nn.CrossEntropyLoss):
        return loss_fn

    def loss(outputs, targets):
        if isinstance(outputs, torch.Tensor) and outputs.dim() == 2 and not targets.is_floating_point():
            if targets.dim() != 1 or len(targets) != len(outputs):
                raise ValueError(
                    f"dataset labels must be one class number per sample: the model gave outputs of "
                    f"shape {tuple(outputs.shape)}, the labels have shape {tuple(targets.shape)}"
                )
            if (
                targets.device.type != "meta"
                and len(targets)
                and (int(targets.min()) < 0 or int(targets.max()) >= outputs.shape[1])
            ):
                bad = int(targets.max()) if int(targets.max()) >= outputs.shape[1] else int(targets.min())
                raise ValueError(
                    f"dataset has label {bad}, but the model has {outputs.shape[1]} outputs: labels "
                    f"must be 0 to {outputs.shape[1] - 1} (build the model with num_classes=...)"
                )
        return loss_fn(outputs, targets)

    return loss


def _warn_if_diverged(history: History, lr: float) -> None:
    bad = next((i for i, value in enumerate(history.loss, 1) if not math.isfinite(value)), None)
    if bad is not None:
        warnings.warn(
            f"the loss became {history.loss[bad - 1]} at step {bad}: training diverged (lr={lr:g} "
            "is probably too large; try a smaller lr)",
            RuntimeWarning,
            stacklevel=3,
        )


def _run(
    model,
    dataset,
    opt,
    step_args,
    device,
    seed,
    batch_size,
    accumulation_steps,
    total_steps,
    eval_dataset,
    progress,
    history,
    shuffle=True,
    on_oom=None,
):
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=collate_naming(dataset),
    )
    start = time.perf_counter()
    bar = progress_bar(progress, total=total_steps, desc=history.label, unit="step")
    step = 0
    while step < total_steps:  # one pass of this loop is one epoch
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            scaler = step_args["scaler"]
            scale = scaler.get_scale() if scaler is not None else None
            try:
                if on_oom is None:
                    step_loss = train_step(
                        model, opt, inputs, targets, accumulation_steps=accumulation_steps, **step_args
                    )
                else:
                    step_loss, accumulation_steps = _step_or_halve(
                        model, opt, step_args, inputs, targets, accumulation_steps, history, step + 1
                    )
            except RuntimeError as error:
                if step > 0 or isinstance(error, torch.OutOfMemoryError) or "shape" not in str(error):
                    raise
                raise ValueError(
                    f"dataset inputs of shape {tuple(inputs.shape[1:])} do not fit the model "
                    f"{type(model).__name__}: {error}"
                ) from error
            step += 1
            if scaler is not None and scaler.get_scale() < scale:  # GradScaler lowers its scale only on a skip
                history.skipped_steps.append(step)
            history.loss.append(step_loss)
            history.samples.append(step * batch_size)
            history.seconds.append(time.perf_counter() - start)
            bar.update()
            bar.set_postfix(loss=f"{step_loss:.3f}", refresh=False)  # redrawn at tqdm's own pace, not every step
            if step == total_steps:
                break
        if eval_dataset is not None:
            paused = time.perf_counter()
            history.eval_steps.append(step)
            history.eval_accuracy.append(evaluate(model, eval_dataset, device=device))
            start += time.perf_counter() - paused  # ``seconds`` counts training time only
    bar.close()


def collate_naming(dataset: Dataset):
    """``default_collate``, but a batch it cannot stack names the data set item that differs from item 0."""

    def collate(items):
        try:
            return default_collate(items)
        except (RuntimeError, TypeError) as error:
            first = dataset[0]
            for index in range(len(dataset)):
                if _kind(dataset[index]) != _kind(first):
                    raise TypeError(
                        f"dataset item {index} is {describe(dataset[index])} "
                        f"{_kind(dataset[index])[1]}, but item 0 is {describe(first)} "
                        f"{_kind(first)[1]}: every item must have the same types and shapes"
                    ) from error
            raise

    return collate


def _kind(item):
    parts = item if isinstance(item, (tuple, list)) else (item,)
    shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else () for x in parts]
    return describe(item), f"with shapes {shapes}"


def _step_or_halve(model, opt, step_args, inputs, targets, accumulation_steps, history, step):
    """:func:`train_step`, retried with micro-batches half as large after each out-of-memory error."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # BatchNorm statistics to undo
    while True:
        try:
            loss = train_step(model, opt, inputs, targets, accumulation_steps=accumulation_steps, **step_args)
            return loss, accumulation_steps
        except torch.OutOfMemoryError:
            parts = len(accumulation_steps) if isinstance(accumulation_steps, (list, tuple)) else accumulation_steps
            if parts >= len(targets):
                raise  # micro-batches of one sample: nothing left to halve
        # Outside the except block the failed step's tensors are free. Undo what it did, then retry.
        opt.zero_grad(set_to_none=True)
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
        accumulation_steps = min(2 * parts, len(targets))  # twice as many micro-batches, at most one per sample
        note = (
            f"step {step}: out of memory; now {accumulation_steps} micro-batches of about "
            f"{-(-len(targets) // accumulation_steps)} samples (the effective batch is still {len(targets)})"
        )
        history.notes.append(note)
        tqdm.write(note)


def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int = 256, device=None) -> float:
    """The fraction of ``dataset`` that ``model`` classifies correctly (0 to 1).

    Runs under ``torch.no_grad()`` in eval mode and puts the model back in the mode it was in.
    """
    check_model(model)
    check_dataset(dataset)
    check_int("batch_size", batch_size, minimum=1)
    device = check_device(device) if device is not None else device_of(model)
    if device != device_of(model) and not (device.type == device_of(model).type == "cuda"):
        raise ValueError(
            f"device {str(device)!r} is not where the model is ({device_of(model)}): move the model "
            f"there first (model.to({str(device)!r})), or leave device=None"
        )
    modes = saved_modes(model)
    model.eval()
    correct = 0
    try:
        with torch.no_grad(), forked_rng(device):  # a DataLoader iterator draws a seed: keep the global one
            for inputs, targets in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_naming(dataset)):
                outputs = model(inputs.to(device))
                if not isinstance(outputs, torch.Tensor) or outputs.dim() != 2 or len(outputs) != len(inputs):
                    got = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
                    raise ValueError(
                        f"model must return one row of class scores per sample, shape "
                        f"({len(inputs)}, classes), got {got}"
                    )
                predictions = outputs.argmax(dim=1)
                correct += (predictions == targets.to(device)).sum().item()
    finally:
        restore_modes(modes)
    return correct / len(dataset)


_TRAIN_DEFAULTS = dict(batch_size=None, accumulation_steps=1, precision="fp32", checkpointing=None, optimizer="sgd")


def _from_plan(plan, given: dict) -> dict:
    """``given`` (train's arguments) with what ``plan`` says; an argument given as well must agree with it."""
    from .plan import FitPlan

    if not isinstance(plan, FitPlan):
        raise TypeError(f"plan must be a batchlab.FitPlan (from batchlab.plan_fit), got {type(plan).__name__}")
    wanted = plan.train_kwargs()
    for name, value in wanted.items():
        if given[name] != _TRAIN_DEFAULTS[name] and given[name] != value:
            raise ValueError(
                f"train got plan= and {name}={given[name]!r}, but the plan says {name}={value!r}: pass one of them"
            )
    return {name: wanted.get(name, given[name]) for name in given}


def _check_train_args(
    model, dataset, batch_size, epochs, steps, optimizer, lr, accumulation_steps, loss_fn, device, seed, eval_dataset
):
    """Check every argument of :func:`train`; return the number of steps."""
    check_model(model)
    check_dataset(dataset)
    if batch_size is None:
        raise TypeError("train needs batch_size= (samples per optimizer step) or plan= (from batchlab.plan_fit)")
    check_int("batch_size", batch_size, minimum=1)
    if batch_size > len(dataset):
        raise ValueError(f"batch_size must be at most the data set size ({len(dataset)}), got {batch_size}")
    if isinstance(accumulation_steps, (list, tuple)):  # uneven micro-batch sizes, e.g. from batchlab.plan_fit
        sizes = [check_int("accumulation_steps[i]", size, minimum=1) for size in accumulation_steps]
        if sum(sizes) != batch_size:
            raise ValueError(
                f"accumulation_steps as micro-batch sizes must add up to batch_size ({batch_size}), "
                f"got {list(accumulation_steps)} (sum {sum(sizes)})"
            )
    elif check_int("accumulation_steps", accumulation_steps, minimum=1) and batch_size % accumulation_steps:
        raise ValueError(
            f"accumulation_steps must divide batch_size into equal micro-batches: {batch_size} is not "
            f"divisible by {accumulation_steps}; try accumulation_steps in "
            f"{[k for k in range(1, min(batch_size, 64) + 1) if batch_size % k == 0]}"
        )
    if (epochs is None) == (steps is None):
        raise ValueError(f"give exactly one of epochs or steps, got epochs={epochs!r}, steps={steps!r}")
    steps_per_epoch = len(dataset) // batch_size
    total = (
        check_int("steps", steps, minimum=1)
        if steps is not None
        else check_int("epochs", epochs, minimum=1) * steps_per_epoch
    )
    check_float("lr", lr)
    if lr > 10:
        warnings.warn(
            f"lr={lr:g} is far larger than any the course uses (0.001 to 1): the loss will likely diverge",
            RuntimeWarning,
            stacklevel=3,
        )
    check_optimizer(optimizer)
    check_loss_fn(loss_fn)
    check_device(device)
    check_seed("seed", seed)
    check_trainable(model)
    if eval_dataset is not None:
        check_dataset(eval_dataset, "eval_dataset")
    return total
