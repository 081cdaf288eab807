"""Chapter 1's explorer: batch size and learning rate -> loss curves and samples per second."""

from __future__ import annotations

import collections

import ipywidgets as widgets

from ..datasets import digits
from ..models import MODEL_NAMES, build_model
from ..plots import plot_histories
from ..training import train
from ..validation import check_choice, check_int
from .base import BATCH_SIZES, Explorer, Panel, html_table, lr_slider
from .jobs import Job


class ConvergenceExplorer(Explorer):
    """Chapter 1: batch size and learning rate -> loss curves and samples per second.

    Each setting trains ``model`` (from the same initial weights) for ``epochs`` passes over
    ``dataset`` (default: the digits training set), so every run sees the same number of samples.
    The last ``keep`` runs stay on the figure for comparison; a setting already run is reused (the
    newest ``MAX_RUNS`` are kept).
    Runs use :func:`batchlab.train` in the kernel's own thread (``set`` and the controls return
    when the run is drawn); :class:`BatchSizeExplorer` runs in the background instead.
    """

    settable = ("batch_size", "lr")
    MAX_RUNS = 64  # finished runs kept for reuse; a learner typing new learning rates cannot grow it further

    def __init__(
        self,
        dataset=None,
        model: str = "mlp",
        *,
        epochs: int = 2,
        batch_size: int = 64,
        lr: float = 0.05,
        keep: int = 4,
    ):
        self.dataset = dataset if dataset is not None else digits(train=True)
        self.model_name = model
        self.epochs = check_int("epochs", epochs, minimum=1)
        self.keep = check_int("keep", keep, minimum=1)
        sizes = [b for b in BATCH_SIZES if b <= len(self.dataset)]
        check_choice("batch_size", batch_size, sizes)
        self.in_shape = tuple(self.dataset[0][0].shape)
        images = [name for name in MODEL_NAMES if name != "transformer"]
        if model not in images:
            raise ValueError(
                f"model name must be one of {', '.join(map(repr, images))} (models of images, "
                f"like the digits), got {model!r}"
            )
        build_model(model, in_shape=self.in_shape)  # fail now, with a clear message, on an unusable shape
        self.batch_size = widgets.SelectionSlider(
            options=sizes, value=batch_size, description="batch size", continuous_update=False
        )
        self.lr = lr_slider(lr)
        self.panel = Panel()
        self.image, self.summary = self.panel.image, self.panel.text
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._shown: list = []
        super().__init__(
            {"batch_size": self.batch_size, "lr": self.lr},
            [widgets.HBox([self.batch_size, self.lr]), self.panel.box],
            background=False,
        )
        self._changed()

    def _run(self, batch_size: int, lr: float):
        key = (batch_size, round(lr, 6))
        if key not in self._cache:
            model = build_model(self.model_name, in_shape=self.in_shape)
            self._cache[key] = train(
                model,
                self.dataset,
                batch_size=batch_size,
                epochs=self.epochs,
                lr=lr,
                progress=False,
                label=f"batch {batch_size}, lr {lr:.3g}",
            )
            while len(self._cache) > self.MAX_RUNS:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def _changed(self, name=None):
        self.jobs.submit(self._work)

    def _work(self, job: Job):
        history = self._run(self.batch_size.value, self.lr.value)
        job.publish(lambda: self._show(history))

    def _show(self, history):
        self._shown = [h for h in self._shown if h is not history][-(self.keep - 1) :] + [history]
        self.panel.draw(plot_histories(self._shown, x=("steps", "samples", "seconds")))
        self.panel.say(
            html_table(
                ("run", "steps", "final loss", "samples/s"),
                [(h.label, len(h.loss), f"{h.loss[-1]:.3f}", f"{h.samples_per_second:,.0f}") for h in self._shown],
            )
        )

    def _check(self, name, value):
        if name == "batch_size":
            check_choice("batch_size", value, self.batch_size.options)

    @property
    def state(self) -> dict:
        """The runs on the figure now: label, final loss, steps and samples per second of each."""
        self.wait()
        return {
            "runs": [
                {
                    "label": h.label,
                    "steps": len(h.loss),
                    "final_loss": h.loss[-1],
                    "samples_per_second": h.samples_per_second,
                }
                for h in self._shown
            ]
        }

    def __repr__(self) -> str:
        return f"ConvergenceExplorer(model={self.model_name!r}, epochs={self.epochs})"
