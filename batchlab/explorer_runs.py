"""What the batch-size explorer's convergence and speed panels compute (chapters 0, 1 and 4), as plain functions.

The memory panel's model is :mod:`batchlab.explorer`; this module holds the short training runs behind the
other two panels, so that they too can be computed and tested without a kernel:

* **the runs**: :func:`training_losses` trains the same architecture as the memory panel on the 8x8 digits
  (:func:`training_data`, :func:`training_model`; small enough to train in seconds on a laptop's CPU), step by
  step, so that a widget can draw the first points early and stop a run that is no longer wanted.
  :func:`run_length` sizes the short run from :data:`RUNS`; :class:`RunSetting` names one run;
* **recording and showing them**: :class:`Run` and :func:`record_run` keep a run's losses, samples and seconds
  as they come, :func:`run_state` is the panels' part of the explorer's ``state``, :func:`speed_points` the
  samples per second of the finished runs;
* **the cache** (:class:`RunCache`) keeps each run once, for the explorer's kernel thread and its background
  thread alike.

Speeds are in samples per second, times in seconds.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .datasets import digits
from .models import MODEL_NAMES, build_model
from .steps import make_optimizer, train_step
from .training import History
from .validation import check_choice

# One short convergence run per model: (epochs, at most this many optimizer steps), so that every run
# ends within a few seconds on one core of a busy laptop. Measured there (benchmarks/explorer.py): an
# epoch of resnet18 takes about 4 s at any batch from 16 up, the other models 1 s or less, and at
# batch 1 or 2 a step costs about 1 ms (mlp), 2 ms (cnns), 15 ms (transformer) or 60 ms (resnet18).
RUNS = {"mlp": (2, 300), "cnn": (2, 300), "cnn_bn": (2, 300), "resnet18": (1, 40), "transformer": (2, 150)}


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
        self.key = (self.model, self.batch_size, round(self.lr, 6), self.accumulation_steps, self.optimizer, self.seed)

    @property
    def label(self) -> str:
        micro = (
            f" ({self.accumulation_steps}x{self.batch_size // self.accumulation_steps})"
            if self.accumulation_steps > 1
            else ""
        )
        return f"{self.model}, batch {self.batch_size}{micro}, lr {self.lr:.3g}"


def training_losses(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int,
    lr: float,
    steps: int,
    accumulation_steps: int = 1,
    optimizer="sgd",
    seed: int = 0,
):
    """Train ``model`` in place and yield the loss after each of ``steps`` optimizer steps.

    The loop of :func:`batchlab.train` (same shuffling, same accumulation, so the same losses), one
    step at a time: a caller draws the losses as they come and stops iterating to stop the run. It
    reads no global random state (the shuffling has its own generator).
    """
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed)
    )
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


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` normalises with batch statistics (BatchNorm of any dimension)."""
    return any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) for m in model.modules())


class RunCache:
    """The convergence runs finished so far (the newest ``max_runs``) and the initial model each trains from.

    ``template(name)`` builds the data and initial model of a course model once, in the caller's thread:
    building seeds the model from torch's global random generator, which a background thread must not
    touch. ``shown_with(run)`` is the list the panel draws: the last ``keep`` - 1 finished runs, then ``run``.
    """

    def __init__(self, dataset: Dataset, *, keep: int = 4, max_runs: int = 64):
        self.dataset, self.keep, self.max_runs = dataset, keep, max_runs
        self.templates: dict = {}
        self.runs: collections.OrderedDict = collections.OrderedDict()
        self.kept: list = []  # keys of the finished runs drawn, oldest first
        self.lock = threading.RLock()

    def template(self, model_name: str) -> tuple:
        """``(training data, initial model)`` of ``model_name``, built on first use."""
        if model_name not in self.templates:
            data = training_data(model_name, self.dataset)
            self.templates[model_name] = (data, training_model(model_name, data))
        return self.templates[model_name]

    def get(self, key: tuple):
        """The finished run of the setting ``key``, or None; a run asked for counts as the newest."""
        with self.lock:
            run = self.runs.get(key)
            if run is not None:
                self.runs.move_to_end(key)
            return run

    def add(self, run: Run) -> None:
        with self.lock:
            self.runs[run.setting.key] = run
            while len(self.runs) > self.max_runs:
                self.runs.popitem(last=False)

    def finished(self) -> list:
        with self.lock:
            return list(self.runs.values())

    def shown_with(self, run: Run) -> list:
        """The runs to draw with ``run`` (finished or not): the last ``keep`` - 1 finished others, then it."""
        key = run.setting.key
        with self.lock:
            runs = dict(self.runs)
        if run.done:
            self.kept = [k for k in self.kept if k != key and k in runs] + [key]
        earlier = [runs[k] for k in self.kept if k != key and k in runs]
        return (earlier[-(self.keep - 1) :] if self.keep > 1 else []) + [run]

    def has_batch_norm(self, model_name: str) -> bool:
        return model_name in self.templates and has_batch_norm(self.templates[model_name][1])


@dataclass
class Run:
    """A convergence run as drawn: its setting, its History so far, the steps it will take, whether it ended."""

    setting: RunSetting
    steps: int
    history: History = field(init=False)
    done: bool = False

    def __post_init__(self):
        self.history = History(self.setting.label, self.setting.batch_size)


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
        "steps": len(history.loss) if history else 0,
        "steps_planned": run.steps if run else None,
        "loss": list(history.loss) if history else [],
        "samples": list(history.samples) if history else [],
        "samples_per_second": history.samples_per_second if run is not None and run.done else None,
        "runs": [r.history.label for r in shown],
    }


def speed_points(runs, setting: RunSetting) -> dict:
    """``{batch size: samples/s}`` of the finished ``runs`` of ``setting``'s model and accumulation."""
    same = (setting.model, setting.accumulation_steps)
    return {
        r.setting.batch_size: r.history.samples_per_second
        for r in runs
        if r.done and (r.setting.model, r.setting.accumulation_steps) == same
    }
