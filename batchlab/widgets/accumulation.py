"""Chapter 6's explorer: micro-batch size x accumulation steps at a fixed effective batch."""

from __future__ import annotations

import ipywidgets as widgets

from ..datasets import digits
from ..models import build_model
from ..validation import check_choice, check_float, check_int
from .base import BATCH_SIZES, Explorer, Panel
from .jobs import Job


class AccumulationExplorer(Explorer):
    """Chapter 6: micro-batch size x accumulation steps at a fixed effective batch -> peak memory and loss curve.

    Each micro-batch size trains ``model`` (same initial weights, same batches) for ``steps`` optimizer
    steps at ``effective_batch`` samples per step, with ``effective_batch / micro_batch`` accumulation
    steps, and measures the peak memory of one step (:func:`batchlab.accumulation.accumulation_run`). The
    figure shows its loss curve over the full batch's (no accumulation) and the peak memory of every
    micro-batch size tried so far; a setting already run is reused. Runs and measurements happen in the
    kernel's own thread (the memory tracker watches the thread it runs in), so ``set`` and the slider
    return when the figure is drawn.
    """

    settable = ("micro_batch",)

    def __init__(
        self,
        dataset=None,
        model: str = "mlp",
        *,
        effective_batch: int = 64,
        micro_batch: int = 16,
        steps: int = 60,
        lr: float = 0.05,
    ):
        self.dataset = dataset if dataset is not None else digits(train=True)
        self.model_name = model
        self.effective_batch = check_int("effective_batch", effective_batch, minimum=1, maximum=len(self.dataset))
        self.steps = check_int("steps", steps, minimum=1)
        self.lr = check_float("lr", lr)
        sizes = [b for b in BATCH_SIZES if b <= effective_batch and effective_batch % b == 0]
        check_choice("micro_batch", micro_batch, sizes)
        build_model(model, in_shape=tuple(self.dataset[0][0].shape))  # fail now, with a clear message, on a bad name
        self.micro_batch = widgets.SelectionSlider(
            options=sizes, value=micro_batch, description="micro-batch", continuous_update=False
        )
        self.steps_label = widgets.HTML()
        self.panel = Panel()
        self.image, self.summary = self.panel.image, self.panel.text
        self._runs: dict = {}
        super().__init__(
            {"micro_batch": self.micro_batch},
            [widgets.HBox([self.micro_batch, self.steps_label]), self.panel.box],
            background=False,
        )
        self._changed()

    def _run(self, micro_batch: int) -> dict:
        from ..accumulation import accumulation_run

        if micro_batch not in self._runs:
            self._runs[micro_batch] = accumulation_run(
                micro_batch,
                effective_batch=self.effective_batch,
                model=self.model_name,
                dataset=self.dataset,
                steps=self.steps,
                lr=self.lr,
            )
        return self._runs[micro_batch]

    def _figure(self, full: dict, run: dict):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(9, 3.4), layout="constrained")
        curves, bars = fig.subplots(1, 2)
        steps = range(1, len(full["loss"]) + 1)
        curves.plot(steps, full["loss"], color="0.7", linewidth=4, label=f"full batch {self.effective_batch}")
        curves.plot(
            steps,
            run["loss"],
            "--",
            color="tab:blue",
            label=f"{run['accumulation_steps']} x {run['micro_batch']} accumulated",
        )
        curves.set(xlabel="optimizer step", ylabel="training loss", yscale="log", title="Loss per step")
        curves.legend(fontsize="small")
        measured = sorted(self._runs.values(), key=lambda r: r["micro_batch"])
        colors = ["tab:blue" if r is run else "0.7" for r in measured]
        bars.bar([str(r["micro_batch"]) for r in measured], [r["peak_bytes"] / 2**20 for r in measured], color=colors)
        bars.set(
            xlabel=f"micro-batch (effective batch {self.effective_batch})",
            ylabel="peak memory of a step (MiB)",
            title="Measured on this machine",
        )
        return fig

    def _changed(self, name=None):
        self.jobs.submit(self._work)

    def _work(self, job: Job):
        full, run = self._run(self.effective_batch), self._run(self.micro_batch.value)
        job.publish(lambda: self._show(full, run))

    def _show(self, full: dict, run: dict):
        self.steps_label.value = (
            f"x <b>{run['accumulation_steps']}</b> accumulation steps = effective batch <b>{self.effective_batch}</b>"
        )
        self.panel.draw(self._figure(full, run))
        difference = max(abs(a - b) for a, b in zip(run["loss"], full["loss"]))
        self.panel.say(
            f"Peak memory of one step: <b>{run['peak_bytes'] / 2**20:.2f} MiB</b> "
            f"({run['peak_bytes'] / full['peak_bytes']:.0%} of the full batch's {full['peak_bytes'] / 2**20:.2f} MiB). "
            f"Loss after {self.steps} steps: {run['loss'][-1]:.4f} (full batch {full['loss'][-1]:.4f}); largest "
            f"difference along the curve {difference:.1e}. Training took {run['seconds']:.2f} s "
            f"(full batch {full['seconds']:.2f} s)."
        )

    def _check(self, name, value):
        check_choice("micro_batch", value, self.micro_batch.options)

    @property
    def state(self) -> dict:
        """The setting shown, its peak memory and losses beside the full batch's, and every peak measured so far."""
        self.wait()
        full, run = self._runs[self.effective_batch], self._runs[self.micro_batch.value]
        return {
            "micro_batch": run["micro_batch"],
            "accumulation_steps": run["accumulation_steps"],
            "effective_batch": self.effective_batch,
            "peak_bytes": run["peak_bytes"],
            "full_batch_peak_bytes": full["peak_bytes"],
            "final_loss": run["loss"][-1],
            "full_batch_final_loss": full["loss"][-1],
            "max_loss_difference": max(abs(a - b) for a, b in zip(run["loss"], full["loss"])),
            "measured": {m: r["peak_bytes"] for m, r in sorted(self._runs.items())},
        }

    def __repr__(self) -> str:
        return (
            f"AccumulationExplorer(model={self.model_name!r}, effective_batch={self.effective_batch}, "
            f"steps={self.steps})"
        )
