"""Chapter 3's explorer: ``num_workers`` and batch size -> samples per second of a ``DataLoader``."""

from __future__ import annotations

import ipywidgets as widgets

from ..validation import check_choice, check_int
from .base import Explorer, Panel
from .jobs import Job

LOADER_BATCH_SIZES = (8, 16, 32, 64, 128)


class LoaderExplorer(Explorer):
    """Chapter 3: ``num_workers`` and batch size -> samples per second of a ``DataLoader``, on this machine.

    Each setting is measured once with :func:`batchlab.loaders.loader_throughput` (``batches`` timed
    batches after ``warmup``) and kept: the figure shows every setting measured so far against
    ``num_workers``, one line per batch size, with the usable CPU cores marked. ``dataset`` defaults
    to the CPU-heavy image folder of :func:`batchlab.datasets.shapes_image_folder`. Measurements run
    in the kernel's own thread: they start worker processes, which must not be forked from a
    background thread.
    """

    settable = ("num_workers", "batch_size")

    def __init__(
        self,
        dataset=None,
        *,
        num_workers: int = 0,
        batch_size: int = 32,
        batches: int = 10,
        warmup: int = 2,
        max_workers: int | None = None,
    ):
        from ..datasets import shapes_image_folder
        from ..loaders import usable_cores

        self.dataset = dataset if dataset is not None else shapes_image_folder()
        self.batches = check_int("batches", batches, minimum=1)
        self.warmup = check_int("warmup", warmup, minimum=0)
        self.cores = usable_cores()
        max_workers = self.cores + 2 if max_workers is None else check_int("max_workers", max_workers, minimum=1)
        check_int("num_workers", num_workers, minimum=0, maximum=max_workers)
        sizes = [b for b in LOADER_BATCH_SIZES if (self.warmup + self.batches) * b <= len(self.dataset)]
        if not sizes:
            raise ValueError(
                f"dataset has {len(self.dataset)} samples: too few for {self.warmup + self.batches} "
                f"batches of {LOADER_BATCH_SIZES[0]}"
            )
        check_choice("batch_size", batch_size, sizes)
        self.num_workers = widgets.IntSlider(
            value=num_workers, min=0, max=max_workers, description="num_workers", continuous_update=False
        )
        self.batch_size = widgets.SelectionSlider(
            options=sizes, value=batch_size, description="batch size", continuous_update=False
        )
        self.panel = Panel()
        self.image, self.summary = self.panel.image, self.panel.text
        self._results: dict = {}
        super().__init__(
            {"num_workers": self.num_workers, "batch_size": self.batch_size},
            [widgets.HBox([self.num_workers, self.batch_size]), self.panel.box],
            background=False,
        )
        self._changed()

    def _measure(self, batch_size: int, num_workers: int):
        from ..loaders import loader_throughput

        key = (batch_size, num_workers)
        if key not in self._results:
            self._results[key] = loader_throughput(
                self.dataset,
                batch_size=batch_size,
                num_workers=num_workers,
                batches=self.batches,
                warmup=self.warmup,
                repeats=1,
            )
        return self._results[key]

    def _changed(self, name=None):
        self.jobs.submit(self._work)

    def _work(self, job: Job):
        key = (self.batch_size.value, self.num_workers.value)
        stats = self._measure(*key)
        job.publish(lambda: self._show(key, stats))

    def _show(self, key, stats):
        from ..loaders import LoaderSweep

        sweep = LoaderSweep(list(self._results.values()), self.cores)
        self.panel.draw(sweep.figure(highlight=key))
        baseline = self._results.get((key[0], 0))
        speedup = (
            f", {stats.samples_per_second / baseline.samples_per_second:.2f}× the speed of num_workers=0"
            if baseline is not None and key[1] > 0
            else ""
        )
        self.panel.say(
            f"<b>This machine: {self.cores} usable CPU cores.</b> "
            f"batch size {key[0]}, num_workers {key[1]}: <b>{stats.samples_per_second:,.0f} samples/s</b>"
            f"{speedup}; main process busy {stats.busy_fraction:.0%}; first batch after "
            f"{stats.first_batch_seconds:.2f} s."
        )

    def _check(self, name, value):
        if name == "batch_size":
            check_choice("batch_size", value, self.batch_size.options)
        else:
            check_int("num_workers", value, minimum=0, maximum=self.num_workers.max)

    @property
    def state(self) -> dict:
        """The usable cores, the current setting and every (batch_size, num_workers) -> samples/s measured."""
        self.wait()
        key = (self.batch_size.value, self.num_workers.value)
        return {
            "cores": self.cores,
            "batch_size": key[0],
            "num_workers": key[1],
            "samples_per_second": self._results[key].samples_per_second,
            "measured": {k: s.samples_per_second for k, s in sorted(self._results.items())},
        }

    def __repr__(self) -> str:
        return f"LoaderExplorer(batches={self.batches}, warmup={self.warmup})"
