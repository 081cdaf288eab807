"""Interactive explorers for the chapter notebooks (ipywidgets).

Model / view split: the computation is an ordinary function elsewhere in batchlab (here
:func:`batchlab.train`); a widget only wires controls to it and draws. Figures are rendered to PNG
into a ``widgets.Image`` and text goes into ``widgets.HTML``, never into an ``Output`` widget, so the
notebooks stay stable under nbval and update live in JupyterLab.

Every widget has ``set(**values)`` (move the controls as a learner would and return when the panels
have updated) and ``state`` (what is shown now), which tests and notebooks use.
"""

from __future__ import annotations

import ipywidgets as widgets

from .datasets import digits
from .models import build_model
from .plots import figure_to_png, plot_histories
from .training import train
from .validation import check_choice, check_int

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ConvergenceWidget:
    """Chapter 1: batch size and learning rate -> loss curves and samples per second.

    Each setting trains ``model`` (from the same initial weights) for ``epochs`` passes over
    ``dataset`` (default: the digits training set), so every run sees the same number of samples.
    The last ``keep`` runs stay on the figure for comparison; a setting already run is reused.
    """

    def __init__(self, dataset=None, model: str = "mlp", *, epochs: int = 2, batch_size: int = 64,
                 lr: float = 0.05, keep: int = 4):
        self.dataset = dataset if dataset is not None else digits(train=True)
        self.model_name = model
        self.epochs = check_int("epochs", epochs, minimum=1)
        self.keep = check_int("keep", keep, minimum=1)
        sizes = [b for b in BATCH_SIZES if b <= len(self.dataset)]
        check_choice("batch_size", batch_size, sizes)
        self.in_shape = tuple(self.dataset[0][0].shape)
        build_model(model, in_shape=self.in_shape)  # fail now, with a clear message, on a bad name
        self.batch_size = widgets.SelectionSlider(options=sizes, value=batch_size, description="batch size",
                                                  continuous_update=False)
        self.lr = widgets.FloatLogSlider(value=lr, base=10, min=-3, max=0, step=0.25, description="learning rate",
                                         continuous_update=False, readout_format=".3g")
        self.image = widgets.Image(format="png")
        self.summary = widgets.HTML()
        self._cache: dict = {}
        self._shown: list = []
        for control in (self.batch_size, self.lr):
            control.observe(self._update, names="value")
        self.box = widgets.VBox([widgets.HBox([self.batch_size, self.lr]), self.image, self.summary])
        self._update()

    def _run(self, batch_size: int, lr: float):
        key = (batch_size, round(lr, 6))
        if key not in self._cache:
            model = build_model(self.model_name, in_shape=self.in_shape)
            self._cache[key] = train(model, self.dataset, batch_size=batch_size, epochs=self.epochs, lr=lr,
                                     progress=False, label=f"batch {batch_size}, lr {lr:.3g}")
        return self._cache[key]

    def _update(self, _change=None):
        history = self._run(self.batch_size.value, self.lr.value)
        self._shown = [h for h in self._shown if h is not history][-(self.keep - 1):] + [history]
        fig = plot_histories(self._shown, x=("steps", "samples", "seconds"))
        self.image.value = figure_to_png(fig)
        rows = "".join(
            f"<tr><td>{h.label}</td><td>{len(h.loss)}</td><td>{h.loss[-1]:.3f}</td>"
            f"<td>{h.samples_per_second:,.0f}</td></tr>" for h in self._shown
        )
        self.summary.value = (
            "<table><tr><th>run</th><th>steps</th><th>final loss</th><th>samples/s</th></tr>"
            f"{rows}</table>"
        )

    def set(self, **values) -> dict:
        """Move controls (``batch_size=``, ``lr=``) as a learner would; return :attr:`state`."""
        for name, value in values.items():
            if name not in ("batch_size", "lr"):
                raise ValueError(f"set() takes batch_size and lr, got {name!r}")
            control = getattr(self, name)
            if name == "batch_size":
                check_choice("batch_size", value, control.options)
            control.value = value
        return self.state

    @property
    def state(self) -> dict:
        """The runs on the figure now: label, final loss, steps and samples per second of each."""
        return {
            "runs": [
                {"label": h.label, "steps": len(h.loss), "final_loss": h.loss[-1],
                 "samples_per_second": h.samples_per_second}
                for h in self._shown
            ]
        }

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.box._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = f"ConvergenceWidget(model={self.model_name!r}, epochs={self.epochs})"
        return bundle


LOADER_BATCH_SIZES = (8, 16, 32, 64, 128)


class LoaderWidget:
    """Chapter 3: ``num_workers`` and batch size -> samples per second of a ``DataLoader``, on this machine.

    Each setting is measured once with :func:`batchlab.batching.loader_throughput` (``batches`` timed
    batches after ``warmup``) and kept: the figure shows every setting measured so far against
    ``num_workers``, one line per batch size, with the usable CPU cores marked. ``dataset`` defaults
    to the CPU-heavy image folder of :func:`batchlab.batching.shapes_image_folder`.
    """

    def __init__(self, dataset=None, *, num_workers: int = 0, batch_size: int = 32, batches: int = 10,
                 warmup: int = 2, max_workers: int | None = None):
        from .batching import shapes_image_folder, usable_cores

        self.dataset = dataset if dataset is not None else shapes_image_folder()
        self.batches = check_int("batches", batches, minimum=1)
        self.warmup = check_int("warmup", warmup, minimum=0)
        self.cores = usable_cores()
        max_workers = self.cores + 2 if max_workers is None else check_int("max_workers", max_workers, minimum=1)
        check_int("num_workers", num_workers, minimum=0, maximum=max_workers)
        sizes = [b for b in LOADER_BATCH_SIZES if (self.warmup + self.batches) * b <= len(self.dataset)]
        if not sizes:
            raise ValueError(f"dataset has {len(self.dataset)} samples: too few for {self.warmup + self.batches} "
                             f"batches of {LOADER_BATCH_SIZES[0]}")
        check_choice("batch_size", batch_size, sizes)
        self.num_workers = widgets.IntSlider(value=num_workers, min=0, max=max_workers, description="num_workers",
                                             continuous_update=False)
        self.batch_size = widgets.SelectionSlider(options=sizes, value=batch_size, description="batch size",
                                                  continuous_update=False)
        self.image = widgets.Image(format="png")
        self.summary = widgets.HTML()
        self._results: dict = {}
        for control in (self.num_workers, self.batch_size):
            control.observe(self._update, names="value")
        self.box = widgets.VBox([widgets.HBox([self.num_workers, self.batch_size]), self.image, self.summary])
        self._update()

    def _measure(self, batch_size: int, num_workers: int):
        from .batching import loader_throughput

        key = (batch_size, num_workers)
        if key not in self._results:
            self._results[key] = loader_throughput(self.dataset, batch_size=batch_size, num_workers=num_workers,
                                                   batches=self.batches, warmup=self.warmup, repeats=1)
        return self._results[key]

    def _update(self, _change=None):
        from .batching import LoaderSweep

        key = (self.batch_size.value, self.num_workers.value)
        stats = self._measure(*key)
        sweep = LoaderSweep(list(self._results.values()), self.cores)
        self.image.value = figure_to_png(sweep.figure(highlight=key))
        baseline = self._results.get((key[0], 0))
        speedup = (f", {stats.samples_per_second / baseline.samples_per_second:.2f}× the speed of num_workers=0"
                   if baseline is not None and key[1] > 0 else "")
        self.summary.value = (
            f"<b>This machine: {self.cores} usable CPU cores.</b> "
            f"batch size {key[0]}, num_workers {key[1]}: <b>{stats.samples_per_second:,.0f} samples/s</b>"
            f"{speedup}; main process busy {stats.busy_fraction:.0%}; first batch after "
            f"{stats.first_batch_seconds:.2f} s."
        )

    def set(self, **values) -> dict:
        """Move controls (``num_workers=``, ``batch_size=``) as a learner would; return :attr:`state`."""
        for name, value in values.items():
            if name not in ("num_workers", "batch_size"):
                raise ValueError(f"set() takes num_workers and batch_size, got {name!r}")
            control = getattr(self, name)
            if name == "batch_size":
                check_choice("batch_size", value, control.options)
            else:
                check_int("num_workers", value, minimum=0, maximum=control.max)
            control.value = value
        return self.state

    @property
    def state(self) -> dict:
        """The usable cores, the current setting and every (batch_size, num_workers) -> samples/s measured."""
        key = (self.batch_size.value, self.num_workers.value)
        return {
            "cores": self.cores,
            "batch_size": key[0],
            "num_workers": key[1],
            "samples_per_second": self._results[key].samples_per_second,
            "measured": {k: s.samples_per_second for k, s in sorted(self._results.items())},
        }

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.box._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = f"LoaderWidget(batches={self.batches}, warmup={self.warmup})"
        return bundle
