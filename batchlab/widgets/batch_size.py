"""The batch-size explorer (chapters 0, 1 and 4): memory of a step, convergence and speed against batch size.

The view only: what it computes is in :mod:`batchlab.explorer` (the model), what it reads and says in
:mod:`batchlab.explorer_text`, what it draws in :mod:`batchlab.plots` and :mod:`batchlab.memory_plots`.
"""

from __future__ import annotations

import collections
import copy
import functools
import html

import ipywidgets as widgets
from torch import nn

from .. import explorer as ex
from .. import explorer_runs as er
from .. import explorer_text as say
from ..datasets import digits
from ..memory_plots import plot_memory
from ..models import MODEL_NAMES
from ..plots import plot_convergence, plot_speed
from ..precision import PRECISIONS
from ..validation import check_choice, check_int
from .base import Explorer, Panel, lr_slider
from .jobs import Job

LEVERS = ("precision", "checkpointing")  # chapter 8's controls, for the memory panel
DRAW_INTERVAL = 0.5  # seconds between two drawings of a run in progress; the first after that long too,
# so that a run that ends sooner is drawn once


class BatchSizeExplorer(Explorer):
    """Move the batch size; watch the memory of a step, the convergence and the speed respond.

    Controls: batch size (a log-scale slider from 1 to 4096 or the data set's size, and a box to type
    any size), learning rate, model (:data:`batchlab.MODEL_NAMES`), device profile (this machine's CPU,
    a simulated GPU of 4 to 80 GiB, or any size or card typed in), accumulation steps, and chapter 8's
    precision and checkpointing (they change the memory panel; the short runs train in float32). Panels:

    * ``"memory"``: the estimated peak of one training step by category, as a stacked bar against the
      device's size, the verdict and the largest batch that fits (:func:`batchlab.explorer.memory_point`,
      :func:`batchlab.explorer.largest_batch`), for 3x224x224 images (``image_shape``) or 512-token
      sequences (``sequence_length``): a GPU's memory runs out on real input sizes;
    * ``"convergence"``: loss against steps and samples for the current setting and the ``keep`` - 1
      before it, trained on ``dataset`` (default: the 8x8 digits) in a background thread; a newer change
      cancels an older run (:func:`batchlab.explorer_runs.training_losses`);
    * ``"speed"``: samples per second of the runs measured so far, against the batch size.

    Results are cached. Bad input is clamped or refused with a message under the controls, never
    raised. ``set(**values)`` applies values as a learner would and returns when every panel shows them;
    ``state`` is what the panels show. Your own model: ``model=<nn.Module>`` with ``make_batch`` (``n ->
    (inputs, targets)``, meta tensors are free) and ``loss_fn`` if cross-entropy does not suit its output
    (memory panel only: there is no data to train it on). ``gpu``: a card of
    :data:`batchlab.reference.GPUS` or a size ("12GiB"); ``set(profile=12)`` adds a 12 GiB GPU too.
    """

    settable = ("batch_size", "lr", "model", "profile", "accumulation_steps", "precision", "checkpointing")

    def __init__(
        self,
        dataset=None,
        *,
        model="cnn",
        batch_size: int = 64,
        lr: float = 0.05,
        profile="GPU 8 GiB (simulated)",
        accumulation_steps: int = 1,
        optimizer: str = "sgd",
        panels=say.PANELS,
        keep: int = 4,
        image_shape=ex.IMAGE_SHAPE,
        sequence_length: int = ex.SEQUENCE_LENGTH,
        make_batch=None,
        loss_fn=None,
        gpu=None,
        precision: str = "fp32",
        checkpointing: str = "off",
    ):
        own = ex.own_model(model, make_batch, loss_fn) if isinstance(model, nn.Module) else None
        if own is None and (make_batch is not None or loss_fn is not None):
            raise ValueError("make_batch and loss_fn are for your own model: pass model=<your nn.Module> with them")
        panels = ("memory",) if own is not None else panels  # a learner's model has no data here to train on
        self.dataset = dataset if dataset is not None else digits(train=True)
        self.panels = say.check_panels(panels)
        self.optimizer = check_choice("optimizer", optimizer, ("sgd", "adam"))
        self.keep = check_int("keep", keep, minimum=1)
        self.image_shape = say.check_image_shape(image_shape)
        self.sequence_length = check_int("sequence_length", sequence_length, minimum=1)
        self.limit = min(ex.MAX_BATCH, len(self.dataset))
        model = own.name if own is not None else check_choice("model", model, MODEL_NAMES)
        self.profiles = ex.device_profiles()
        profile_name = say.check_start(
            batch_size, self.limit, lr, profile, gpu, accumulation_steps, precision, checkpointing, self.profiles
        )
        self.models = ((own.name,) if own is not None else ()) + MODEL_NAMES
        self._build_controls(model, batch_size, lr, profile_name, accumulation_steps)
        self.precision.value, self.checkpointing.value = precision, checkpointing
        self._batch, self._notes, self.notes = batch_size, [], []  # notes: what the message line says now
        self.cache = ex.MemoryCache(
            optimizer=self.optimizer, image_shape=self.image_shape, sequence_length=self.sequence_length
        )
        if own is not None:
            self.cache.add_own(own)
        self.training = TrainingView(self.dataset, self.keep, self.panels)
        self.runs, self.convergence, self.speed = self.training.runs, self.training.convergence, self.training.speed
        self.memory_view = MemoryView(self.cache)
        self.memory, self._submitted = self.memory_view.panel, None
        super().__init__(self._controls, self._layout(), background=True, on_error=self._run_failed)
        self._changed()
        self.wait()  # the first panels are complete when the explorer appears; later changes run in the background

    # -- building ---------------------------------------------------------------------------------
    def _build_controls(self, model, batch_size, lr, profile_name, accumulation_steps):
        options = tuple(sorted(set(ex.batch_size_options(self.limit)) | {batch_size}))
        controls = _controls(
            options, batch_size, lr, (self.models, model), list(self.profiles), profile_name, accumulation_steps
        )
        for name, control in controls.items():
            setattr(self, name, control)
        self._controls = controls  # what Explorer observes: every control's change calls _changed(name)
        self.message = widgets.HTML()

    def _layout(self) -> list:
        trains = "convergence" in self.panels or "speed" in self.panels
        memory = [self.profile] + [self._controls[n] for n in LEVERS] if "memory" in self.panels else []
        second = [self.model] + memory + ([self.lr] if trains else []) + [self.accumulation_steps]
        rows = [
            widgets.HBox([self.batch_size, self.batch_text]),
            widgets.HBox(second, layout=widgets.Layout(flex_flow="row wrap")),
            self.message,
        ]
        if "memory" in self.panels:
            rows.append(self.memory.box)
        shown = [getattr(self, p).box for p in ("convergence", "speed") if p in self.panels]
        if shown:
            rows.append(widgets.HBox(shown, layout=widgets.Layout(flex_flow="row wrap")))
        return rows

    def _batch_options(self, batch_size: int) -> tuple:
        """The slider's stops: the log scale, the current size, and finer stops near the largest that fits."""
        near = (
            self.cache.known_largest(self.model.value, self.profiles[self.profile.value], self._levers())
            if "memory" in self.panels
            else None
        )
        return tuple(sorted(set(ex.batch_size_options(self.limit, near)) | {batch_size}))

    # -- reacting to a change ---------------------------------------------------------------------
    def _apply(self, name, value):
        with self.quietly():
            self._notes += self._put(name, value)

    def _put(self, name: str, value) -> list:
        """Put ``value`` into the control ``name`` as if typed there; return what had to be corrected."""
        if name == "batch_size":
            self.batch_text.value = str(value)
            return self._correct("batch_text")
        read = {
            "lr": lambda: say.read_lr(value, self.lr.value),
            "model": lambda: say.read_model(value, self.models),
            "profile": lambda: say.read_profile(value, self.profiles),
            "accumulation_steps": lambda: say.read_steps(value, self.accumulation_steps.value),
            "precision": lambda: say.read_choice("precision", value, PRECISIONS),
            "checkpointing": lambda: say.read_choice("checkpointing", value, tuple(ex.CHECKPOINTING)),
        }[name]
        used, notes = read()
        if used is None:
            return notes
        if name == "profile" and used not in self.profile.options:  # a GPU typed in: offer it from now on
            self.profile.options = list(self.profiles)
        self.controls[name].value = used
        return notes + (self._correct(name) if name == "accumulation_steps" else [])

    def _correct(self, name) -> list:
        """Bring the controls back in line after ``name`` changed; return the messages that explain how."""
        notes = []
        with self.quietly():
            if name == "batch_size":
                self._set_batch(self.batch_size.value)
            elif name == "batch_text":
                size, note = ex.read_batch_size(self.batch_text.value, self.limit)
                notes += [note] if note else []
                self._set_batch(size if size is not None else self._batch)
            steps = self.accumulation_steps.value
            if steps < 1:
                notes.append(f"accumulation steps must be at least 1, got {steps}; using 1.")
                steps = 1
            steps, note = ex.fit_accumulation(self._batch, steps)
            notes += [note] if note else []
            self.accumulation_steps.value = steps
        return notes

    def _set_batch(self, size: int) -> None:
        options = self._batch_options(size)
        if options != self.batch_size.options:
            self.batch_size.options = options
        self.batch_size.value = size
        self.batch_text.value = str(size)
        self._batch = size

    def _changed(self, name=None):
        """A control changed (in the browser or through ``set``): correct it, then update the panels."""
        notes, self._notes = self._notes, []
        try:
            if name is not None:
                notes += self._correct(name)
            setting, levers = self._setting(), self._levers()
            self.jobs.cancel()  # what an older job would still draw is out of date now
            if "memory" in self.panels:
                with self.jobs.drawing:
                    self.memory_view.update(setting, self.profiles[self.profile.value], levers)
                    self._sync_stops()
            self._start_background(setting, levers)
        except Exception as error:  # a control's callback must never raise into the notebook
            notes.append(f"could not update the explorer: {error}")
        self.notes = notes
        self.message.value = say.notes_html(notes)

    def _setting(self) -> er.RunSetting:
        return er.RunSetting(
            self.model.value, self._batch, float(self.lr.value), self.accumulation_steps.value, self.optimizer
        )

    def _levers(self) -> tuple:
        """Chapter 8's levers for the memory panel: (precision, checkpointing) as estimate_memory takes them."""
        return self.precision.value, ex.CHECKPOINTING[self.checkpointing.value]

    def _start_background(self, s: er.RunSetting, levers: tuple) -> None:
        """Start the slow part of a change in the background: the convergence run (unless cached), then
        the search for the largest batch that fits (unless cached)."""
        trains = "convergence" in self.panels or "speed" in self.panels
        profile = self.profiles[self.profile.value]
        searches = "memory" in self.panels and self.cache.known_largest(s.model, profile, levers) is None
        if not trains and not searches:
            self.jobs.cancel()  # nothing to do; an older job must not draw over this setting
            return
        run = self.runs.get(s.key) if trains else None
        template = self.runs.template(s.model) if trains and run is None else None
        self._submitted = s
        self.jobs.submit(functools.partial(self._background, s, profile, levers, trains, run, template))

    def _background(self, s: er.RunSetting, profile: ex.Profile, levers, trains: bool, run, template, job: Job):
        if trains:
            try:
                run = run if run is not None else self.training.train(s, template, job)
            except Exception as error:  # shown; the memory panel still gets its answer below
                job.publish(functools.partial(self._run_failed, say.explain_training_error(error, s)))
            else:
                if run is None:
                    return  # cancelled by a newer change
                job.publish(lambda: self.training.show(run))
        if "memory" in self.panels and not job.cancelled:
            point, largest = self.memory_view.compute(s, profile, levers)
            job.publish(lambda: (self.memory_view.draw(s, profile, point, largest, levers), self._sync_stops()))

    def _sync_stops(self) -> None:
        """Once the largest batch is known, the slider gets finer stops near it."""
        if self._batch_options(self._batch) != self.batch_size.options:
            with self.quietly():
                self._set_batch(self._batch)

    # -- what is shown ----------------------------------------------------------------------------
    @property
    def state(self) -> dict:
        """What the panels show now: the setting, the memory estimate, the run drawn and its speed, the notes."""
        with self.jobs.drawing:
            memory, run, error, notes = (
                self.memory_view.shown,
                self.training.run_shown,
                self.training.error,
                list(self.notes),
            )
            shown = list(self.training.shown_runs)
        point, largest = memory if memory is not None else (None, None)
        profile = self.profiles[self.profile.value]
        return {
            **{name: self._controls[name].value for name in ("lr", "model", "accumulation_steps") + LEVERS},
            "batch_size": self._batch,
            "profile": profile.name,
            "micro_batch": self._batch // self.accumulation_steps.value,
            **ex.memory_state(point, largest, profile),
            **er.run_state(run, shown),
            "error": error,
            "message": "\n".join(notes),
        }

    def _run_failed(self, error: Exception) -> None:
        self.training.failed(self._submitted.label if self._submitted else "this setting", error)

    def __repr__(self) -> str:
        return f"BatchSizeExplorer(panels={self.panels!r})"


class MemoryView:
    """The explorer's memory panel: one estimate drawn at once, the largest batch searched in the background.

    ``shown`` is ``(MemoryPoint, largest batch or None)`` as drawn now (None before the first drawing).
    """

    def __init__(self, cache: ex.MemoryCache):
        self.cache, self.panel, self.shown, self._key = cache, Panel(), None, None

    def update(self, s: er.RunSetting, profile: ex.Profile, levers: tuple) -> None:
        """Draw ``s`` from one estimate, with the largest batch if it is known already (once per setting)."""
        key = (s.model, profile.name, s.batch_size, s.accumulation_steps, levers)
        if key != self._key:
            point = self.cache.point(s.model, profile, s.batch_size, s.accumulation_steps, levers)
            self.draw(s, profile, point, self.cache.known_largest(s.model, profile, levers), levers)
            self._key = key

    def compute(self, s: er.RunSetting, profile: ex.Profile, levers: tuple) -> tuple:
        """The slow part, for the background job: ``(point, largest batch)``, with the largest batch's bar cached."""
        largest = self.cache.largest_batch(s.model, profile, levers)
        point = self.cache.point(s.model, profile, s.batch_size, s.accumulation_steps, levers)
        if largest:
            self.cache.point(s.model, profile, largest, levers=levers)  # the bar beside it
        return point, largest

    def draw(self, s: er.RunSetting, profile: ex.Profile, point, largest, levers: tuple) -> None:
        micro = say.micro_text(s) + say.levers_text(levers)
        bars = {f"batch {s.batch_size}{micro}": point}
        if largest and largest != s.batch_size // s.accumulation_steps:
            bars[f"batch {largest}\n(largest that fits)"] = self.cache.point(s.model, profile, largest, levers=levers)
        title = {"fits": "fits", "margin": "too close to the limit"}.get(point.verdict, "out of memory")
        self.panel.draw(plot_memory(bars, title=f"{s.model}, batch {s.batch_size}{micro}: {title}"))
        self.panel.say(say.memory_text(s, point, largest, self.cache.input_shape(s.model)))
        self.shown = (point, largest)


class TrainingView:
    """The explorer's convergence and speed panels: short runs trained in its background job, drawn as they go.

    ``runs`` caches the finished runs; ``run_shown`` / ``shown_runs`` are what the panels draw now,
    ``draws`` the labels of the runs drawn (newest last), ``error`` what the last failed run said.
    """

    def __init__(self, dataset, keep: int, panels: tuple):
        self.panels = panels
        self.runs = er.RunCache(dataset, keep=keep)
        self.convergence, self.speed = Panel(), Panel()
        self.run_shown, self.shown_runs, self.error = None, [], None
        self.draws = collections.deque(maxlen=100)

    def train(self, s: er.RunSetting, template, job: Job):
        """Train ``s`` step by step, drawing now and then; None if a newer change cancelled it."""
        data, initial = template
        run = er.Run(s, er.run_length(s.model, s.batch_size, len(data)))
        losses = er.training_losses(
            copy.deepcopy(initial),
            data,
            batch_size=s.batch_size,
            lr=s.lr,
            steps=run.steps,
            accumulation_steps=s.accumulation_steps,
            optimizer=s.optimizer,
            seed=s.seed,
        )
        if not er.record_run(
            run,
            losses,
            cancelled=lambda: job.cancelled,
            interval=DRAW_INTERVAL,
            draw=lambda: job.publish(lambda: self.show(run)),
        ):
            return None
        self.runs.add(run)
        return run

    def show(self, run: er.Run) -> None:
        """Draw ``run`` (finished or not) beside the last finished runs; called by the newest job only."""
        shown = self.runs.shown_with(run)
        if "convergence" in self.panels and run.history.loss:
            self.convergence.draw(
                plot_convergence(
                    [r.history for r in shown],
                    dashed={r.history.label for r in shown if r.setting.accumulation_steps > 1},
                )
            )
        self.convergence.say(say.run_text(run, shown, batch_norm=self.runs.has_batch_norm(run.setting.model)))
        if "speed" in self.panels and run.done:
            s = run.setting
            self.speed.draw(
                plot_speed(
                    er.speed_points(self.runs.finished(), s),
                    current=s.batch_size,
                    title=f"{s.model}: speed against batch size",
                )
            )
            self.speed.say(say.speed_text(run))
        self.run_shown, self.shown_runs, self.error = run, shown, None
        self.draws.append(run.setting.label)

    def failed(self, label: str, error: Exception) -> None:
        self.error = f"could not train {label}: {error}"
        self.convergence.say(
            f"<b style='color:#C44E52'>Could not train {html.escape(label)}:</b> {html.escape(str(error))}"
        )


def _controls(batch_options, batch_size, lr, model, profiles, profile, accumulation_steps) -> dict:
    """The explorer's controls, ``{attribute: widget}``, set to the given values (``model``: (names, chosen))."""
    wide = {"description_width": "initial"}
    return {
        "batch_size": widgets.SelectionSlider(
            options=batch_options,
            value=batch_size,
            description="batch size",
            continuous_update=False,
            style=wide,
            layout=widgets.Layout(width="420px"),
        ),
        "batch_text": widgets.Text(
            value=str(batch_size),
            description="or type",
            continuous_update=False,
            style=wide,
            layout=widgets.Layout(width="150px"),
        ),
        "lr": lr_slider(lr, style=wide),
        "model": widgets.Dropdown(
            options=model[0], value=model[1], description="model", style=wide, layout=widgets.Layout(width="200px")
        ),
        "profile": widgets.Dropdown(
            options=profiles, value=profile, description="device", style=wide, layout=widgets.Layout(width="300px")
        ),
        "accumulation_steps": widgets.IntText(
            value=accumulation_steps, description="accumulation steps", style=wide, layout=widgets.Layout(width="190px")
        ),
        "precision": widgets.Dropdown(
            options=PRECISIONS, value="fp32", description="precision", style=wide, layout=widgets.Layout(width="160px")
        ),
        "checkpointing": widgets.Dropdown(
            options=list(ex.CHECKPOINTING),
            value="off",
            description="checkpointing",
            style=wide,
            layout=widgets.Layout(width="220px"),
        ),
    }
