"""The batch-size explorer (chapters 0, 1 and 4): memory of a step, convergence and speed against batch size."""

from __future__ import annotations

import collections
import copy
import functools
import html
import threading
import time

import ipywidgets as widgets
from matplotlib.ticker import FuncFormatter
from torch import nn

from .. import explorer as ex
from ..datasets import digits
from ..models import MODEL_NAMES
from ..plots import plot_histories
from ..training import History
from ..validation import check_choice, check_float, check_int
from .base import Explorer, Panel
from .jobs import Job

DRAW_INTERVAL = 0.5  # seconds between two drawings of a run in progress; the first after that long too,
# so that a run that ends sooner is drawn once
PANELS = ("memory", "convergence", "speed")
LR_RANGE = (1e-3, 1.0)
MiB = 2**20


class _Run:
    """A convergence run as drawn: its setting, its History so far, the steps it will take."""

    def __init__(self, setting: ex.RunSetting, steps: int):
        self.setting, self.steps = setting, steps
        self.history = History(setting.label, setting.batch_size)
        self.done = False


class BatchSizeExplorer(Explorer):
    """Move the batch size; watch the memory of a step, the convergence and the speed respond.

    Controls: batch size (a log-scale slider from 1 to 4096 or the data set's size, and a box to type
    any size), learning rate, model (:data:`batchlab.MODEL_NAMES`), device profile (this machine's
    CPU, or a simulated GPU of 4 to 80 GiB) and accumulation steps. ``panels`` picks among:

    * ``"memory"``: the estimated peak of one training step by category, as a stacked bar against the
      device's size, with an out-of-memory state and the largest batch that fits
      (:func:`batchlab.explorer.memory_point`, :func:`batchlab.explorer.largest_batch`). It models
      3x224x224 images (``image_shape``) or 512-token sequences (``sequence_length``): a GPU's memory
      runs out on real input sizes. It updates before a change returns (a fraction of a second);
    * ``"convergence"``: loss against steps and samples for the current setting and the ``keep`` - 1
      settings before it. The same architecture trains on ``dataset`` (default: the 8x8 digits) in a
      background thread, so the controls stay responsive; a newer change cancels an older run;
    * ``"speed"``: samples per second of the runs measured so far, against the batch size.

    Results are cached: a setting seen before is shown again without computing. Bad input (a value out
    of range, text that is not a number, a model that does not exist) is clamped or refused with a
    message under the controls, never raised. ``set(**values)`` applies values as a learner would and
    returns when every panel shows them; ``state`` is what the panels show. The explorer itself is
    returned once its first panels are drawn.
    """

    settable = ("batch_size", "lr", "model", "profile", "accumulation_steps")

    def __init__(self, dataset=None, *, model: str = "cnn", batch_size: int = 64, lr: float = 0.05,
                 profile="GPU 8 GiB (simulated)", accumulation_steps: int = 1, optimizer: str = "sgd",
                 panels=PANELS, keep: int = 4, image_shape=ex.IMAGE_SHAPE,
                 sequence_length: int = ex.SEQUENCE_LENGTH):
        self.dataset = dataset if dataset is not None else digits(train=True)
        self.panels = self._check_panels(panels)
        self.optimizer = check_choice("optimizer", optimizer, ("sgd", "adam"))
        self.keep = check_int("keep", keep, minimum=1)
        self.image_shape = tuple(image_shape)
        self.sequence_length = check_int("sequence_length", sequence_length, minimum=1)
        self.limit = min(ex.MAX_BATCH, len(self.dataset))
        check_choice("model", model, MODEL_NAMES)
        check_int("batch_size", batch_size, minimum=1, maximum=self.limit)
        if not LR_RANGE[0] <= check_float("lr", lr) <= LR_RANGE[1]:
            raise ValueError(f"lr must be between {LR_RANGE[0]} and {LR_RANGE[1]}, got {lr}")
        self.profiles = ex.device_profiles()
        profile_name = self._profile_name(profile)
        if profile_name is None:
            raise ValueError(f"profile must be one of {', '.join(map(repr, self.profiles))}, got {profile!r}")
        if ex.fit_accumulation(batch_size, check_int("accumulation_steps", accumulation_steps, minimum=1))[1]:
            raise ValueError(f"accumulation_steps must divide batch_size into equal micro-batches, got "
                             f"{accumulation_steps} for batch {batch_size}")
        self._build_controls(model, batch_size, lr, profile_name, accumulation_steps)
        self._batch, self._notes = batch_size, []
        self._meta, self._largest, self._templates, self._data = {}, {}, {}, {}
        self._points: collections.OrderedDict = collections.OrderedDict()
        self._runs: collections.OrderedDict = collections.OrderedDict()
        self._kept: list = []
        self._memory = self._memory_key = self._run_shown = self._error = self._submitted = None
        self._draws = collections.deque(maxlen=100)  # labels of the runs drawn, newest last
        self._lock = threading.RLock()  # the caches, shared with the background thread
        super().__init__(self._control_dict(), self._layout(), background=True, on_error=self._run_failed)
        self._changed()
        self.wait()  # the first panels are complete when the explorer appears; later changes run in the background

    # -- building ---------------------------------------------------------------------------------
    @staticmethod
    def _check_panels(panels) -> tuple:
        panels = (panels,) if isinstance(panels, str) else tuple(panels)
        if not panels or any(p not in PANELS for p in panels):
            raise ValueError(f"panels must name some of {', '.join(PANELS)}, got {panels!r}")
        return panels

    def _build_controls(self, model, batch_size, lr, profile_name, accumulation_steps):
        wide = {"description_width": "initial"}
        self.batch_size = widgets.SelectionSlider(
            options=self._batch_options(batch_size), value=batch_size, description="batch size",
            continuous_update=False, style=wide, layout=widgets.Layout(width="420px"))
        self.batch_text = widgets.Text(value=str(batch_size), description="or type", continuous_update=False,
                                       style=wide, layout=widgets.Layout(width="150px"))
        self.lr = widgets.FloatLogSlider(value=lr, base=10, min=-3, max=0, step=0.25, description="learning rate",
                                         continuous_update=False, readout_format=".3g", style=wide)
        self.model = widgets.Dropdown(options=MODEL_NAMES, value=model, description="model", style=wide,
                                      layout=widgets.Layout(width="200px"))
        self.profile = widgets.Dropdown(options=list(self.profiles), value=profile_name, description="device",
                                        style=wide, layout=widgets.Layout(width="300px"))
        self.accumulation_steps = widgets.IntText(value=accumulation_steps, description="accumulation steps",
                                                  style=wide, layout=widgets.Layout(width="190px"))
        self.message = widgets.HTML()
        self.memory, self.convergence, self.speed = Panel(), Panel(), Panel()

    def _control_dict(self) -> dict:
        return {"batch_size": self.batch_size, "batch_text": self.batch_text, "lr": self.lr, "model": self.model,
                "profile": self.profile, "accumulation_steps": self.accumulation_steps}

    def _layout(self) -> list:
        trains = "convergence" in self.panels or "speed" in self.panels
        second = [self.model] + ([self.profile] if "memory" in self.panels else []) + \
            ([self.lr] if trains else []) + [self.accumulation_steps]
        rows = [widgets.HBox([self.batch_size, self.batch_text]),
                widgets.HBox(second, layout=widgets.Layout(flex_flow="row wrap")), self.message]
        if "memory" in self.panels:
            rows.append(self.memory.box)
        shown = [getattr(self, p).box for p in ("convergence", "speed") if p in self.panels]
        if shown:
            rows.append(widgets.HBox(shown, layout=widgets.Layout(flex_flow="row wrap")))
        return rows

    def _batch_options(self, batch_size: int) -> tuple:
        return tuple(sorted(set(ex.batch_size_options(self.limit)) | {batch_size}))

    def _profile_name(self, value) -> str | None:
        """The profile a learner means: its name, "cpu", or a GPU size (16, "16 GiB", "16GB")."""
        from ..validation import parse_bytes

        if value in self.profiles:
            return value
        if isinstance(value, str) and value.strip().lower() in ("cpu", "this machine", ex.CPU_PROFILE):
            return ex.CPU_PROFILE
        try:
            size = value * ex.GiB if isinstance(value, int) and not isinstance(value, bool) else \
                parse_bytes("profile", value)
        except (TypeError, ValueError):
            return None
        names = [name for name, p in self.profiles.items()
                 if p.device == "cuda" and abs(p.capacity - size) < 0.1 * size]
        return names[0] if names else None

    # -- reacting to a change ---------------------------------------------------------------------
    def _apply(self, name, value):
        with self.quietly():
            self._notes += self._put(name, value)

    def _put(self, name: str, value) -> list:
        """Put ``value`` into the control ``name`` as if typed there; return what had to be corrected."""
        if name == "batch_size":
            self.batch_text.value = str(value)
            return self._correct("batch_text")
        if name == "lr":
            return self._put_lr(value)
        if name == "model":
            if value not in MODEL_NAMES:
                return [f"model {value!r} does not exist; the models are {', '.join(MODEL_NAMES)}."]
            self.model.value = value
            return []
        if name == "profile":
            found = self._profile_name(value)
            if found is None:
                return [f"device {value!r} is not one of the profiles: {', '.join(self.profiles)}."]
            self.profile.value = found
            return []
        try:
            self.accumulation_steps.value = int(value)
        except (TypeError, ValueError):
            return [f"accumulation steps: {value!r} is not a whole number; kept {self.accumulation_steps.value}."]
        return self._correct("accumulation_steps")

    def _put_lr(self, value) -> list:
        try:
            lr = float(value)
        except (TypeError, ValueError):
            return [f"learning rate: {value!r} is not a number; kept {self.lr.value:.3g}."]
        if not lr == lr or lr in (float("inf"), float("-inf")):
            return [f"learning rate: {value!r} is not a finite number; kept {self.lr.value:.3g}."]
        used = min(max(lr, LR_RANGE[0]), LR_RANGE[1])
        self.lr.value = used
        return [] if used == lr else [f"learning rate {lr:g} is outside {LR_RANGE[0]:g} to {LR_RANGE[1]:g}; "
                                      f"using {used:g}."]

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
            setting = self._setting()
            self.jobs.cancel()  # what an older job would still draw is out of date now
            if "memory" in self.panels:
                with self.jobs.drawing:
                    self._update_memory(setting)
            self._start_background(setting)
        except Exception as error:  # a control's callback must never raise into the notebook
            notes.append(f"could not update the explorer: {error}")
        self.message.value = "".join(f"<div style='color:#C44E52'>⚠ {html.escape(n)}</div>" for n in notes)

    def _setting(self) -> ex.RunSetting:
        return ex.RunSetting(self.model.value, self._batch, float(self.lr.value), self.accumulation_steps.value,
                             self.optimizer)

    def _start_background(self, s: ex.RunSetting) -> None:
        """Start the slow part of a change in the background: the convergence run (unless cached), then
        the search for the largest batch that fits (unless cached)."""
        trains = "convergence" in self.panels or "speed" in self.panels
        profile = self.profiles[self.profile.value]
        searches = "memory" in self.panels and self._largest.get((s.model, profile.name, self.optimizer)) is None
        if not trains and not searches:
            self.jobs.cancel()  # nothing to do; an older job must not draw over this setting
            return
        with self._lock:
            run = self._runs.get(s.key) if trains else None
            if run is not None:
                self._runs.move_to_end(s.key)
        template = self._template(s.model) if trains and run is None else None
        self._submitted = s
        self.jobs.submit(functools.partial(self._background, s, profile, trains, run, template))

    def _background(self, s: ex.RunSetting, profile: ex.Profile, trains: bool, run, template, job: Job) -> None:
        if trains:
            run = run if run is not None else self._train(s, template, job)
            if run is None:
                return  # cancelled by a newer change
            job.publish(lambda: self._show_run(run))
        if "memory" in self.panels and not job.cancelled:
            largest = self._largest_batch(s.model, profile)
            point = self._point(s.model, profile, s.batch_size, s.accumulation_steps)
            if largest:
                self._point(s.model, profile, largest)  # the bar beside it
            job.publish(lambda: self._draw_memory(s, profile, point, largest))

    # -- memory -----------------------------------------------------------------------------------
    def _meta_model(self, name: str):
        with self._lock:
            if name not in self._meta:
                shape = ex.memory_input_shape(name, self.image_shape, self.sequence_length)
                self._meta[name] = (ex.meta_model(name, shape), shape)
            return self._meta[name]

    def _point(self, name: str, profile: ex.Profile, batch_size: int, steps: int = 1) -> ex.MemoryPoint:
        key = (name, profile.name, batch_size, steps, self.optimizer)
        with self._lock:
            point = self._points.get(key)
        if point is None:
            model, shape = self._meta_model(name)
            point = ex.memory_point(model, shape, batch_size, profile, optimizer=self.optimizer,
                                    accumulation_steps=steps)
        with self._lock:
            self._points[key] = point
            self._points.move_to_end(key)
            while len(self._points) > 256:
                self._points.popitem(last=False)
        return point

    def _largest_batch(self, name: str, profile: ex.Profile) -> int:
        """:func:`batchlab.explorer.largest_batch`, once per model, profile and optimizer (about ten estimates)."""
        key = (name, profile.name, self.optimizer)
        if key not in self._largest:
            model, shape = self._meta_model(name)
            self._largest[key] = ex.largest_batch(model, shape, profile, optimizer=self.optimizer)
        return self._largest[key]

    def _update_memory(self, s: ex.RunSetting) -> None:
        """Draw the memory panel from one estimate, with the largest batch if it is known already."""
        profile = self.profiles[self.profile.value]
        key = (s.model, profile.name, s.batch_size, s.accumulation_steps, self.optimizer)
        if key == self._memory_key:
            return
        point = self._point(s.model, profile, s.batch_size, s.accumulation_steps)
        self._draw_memory(s, profile, point, self._largest.get((s.model, profile.name, self.optimizer)))
        self._memory_key = key

    def _draw_memory(self, s, profile, point, largest) -> None:
        micro = _micro(s)
        bars = {f"batch {s.batch_size}{micro}": point}
        if largest and largest != s.batch_size // s.accumulation_steps:
            bars[f"batch {largest}\n(largest that fits)"] = self._point(s.model, profile, largest)
        title = "out of memory" if not point.fits else "fits"
        self.memory.draw(ex.plot_memory(bars, title=f"{s.model}, batch {s.batch_size}{micro}: {title}"))
        self.memory.say(self._memory_text(s, point, largest, profile))
        self._memory = (point, largest)

    def _memory_text(self, s, point, largest, profile) -> str:
        shape = "x".join(map(str, ex.memory_input_shape(s.model, self.image_shape, self.sequence_length)))
        what = f"{s.model} on {'sequences of ' + shape + ' tokens' if s.model == 'transformer' else shape + ' images'}"
        # What is compared with the budget: the tensors at the step's peak (and, on a GPU, the blocks the
        # caching allocator reserves for them); the CUDA context is taken off the device's size first.
        where = (f"the {_size(profile.capacity)} GPU, whose other {_size(profile.reserved)} are the CUDA context"
                 if profile.device == "cuda" else "this machine's free RAM")
        need = (f"One training step of {what} at batch {s.batch_size} needs {_size(point.peak_bytes)} of tensors "
                f"at its peak")
        if point.fits:
            cache = f" with the allocator's cache ({_size(point.cached_bytes)})" if profile.device == "cuda" else ""
            head = f"<b>Fits.</b> {need};{cache} that is within the {_size(profile.budget)} PyTorch can use of {where}."
        elif point.peak_bytes <= profile.budget:
            head = (f"<b style='color:#C44E52'>Out of memory.</b> {need}, within the {_size(profile.budget)} PyTorch "
                    f"can use of {where}, but the caching allocator cannot place its blocks there: it would reserve "
                    f"{_size(point.peak_bytes + point.cached_bytes)}.")
        else:
            head = (f"<b style='color:#C44E52'>Out of memory.</b> {need}: {_size(point.peak_bytes - profile.budget)} "
                    f"more than the {_size(profile.budget)} PyTorch can use of {where}.")
        if profile.device == "cuda":  # the bar: context, tensors, cache
            total = _size(point.device_bytes + point.cached_bytes)
            head += (f" The bar shows the context, the tensors and the cache: {total}." if point.fits else
                     f" The bar adds the context and the allocator's cache ({_size(point.cached_bytes)}): {total}.")
        if largest is None:
            return f"{head} Searching for the largest batch that fits…"
        if not largest:
            return f"{head} Not even the smallest batch fits this device."
        tail = f" The largest batch that fits in one step: <b>{largest:,}</b> (estimated, with a 5% margin)."
        if not point.fits:
            k = next((k for k in range(2, s.batch_size + 1) if s.batch_size % k == 0 and s.batch_size // k <= largest),
                     None)
            if k is not None:
                tail += (f" To keep the batch of {s.batch_size}, accumulate {k} micro-batches of "
                         f"{s.batch_size // k} (accumulation steps = {k}).")
        return head + tail

    # -- convergence and speed --------------------------------------------------------------------
    def _template(self, name: str):
        """The training data and initial model of ``name`` (built here, in the kernel's thread: building
        seeds the model from torch's global random generator, which a background thread must not touch)."""
        if name not in self._templates:
            data = ex.training_data(name, self.dataset)
            self._templates[name] = (data, ex.training_model(name, data))
        return self._templates[name]

    def _train(self, s: ex.RunSetting, template, job: Job):
        """Train ``s`` step by step, drawing now and then; None if a newer change cancelled it."""
        data, initial = template
        run = _Run(s, ex.run_length(s.model, s.batch_size, len(data)))
        losses = ex.training_losses(copy.deepcopy(initial), data, batch_size=s.batch_size, lr=s.lr, steps=run.steps,
                                    accumulation_steps=s.accumulation_steps, optimizer=s.optimizer, seed=s.seed)
        start, paused = time.perf_counter(), 0.0
        drawn = start
        for loss in losses:
            if job.cancelled:
                return None
            history = run.history
            history.loss.append(loss)
            history.samples.append(len(history.loss) * s.batch_size)
            history.seconds.append(time.perf_counter() - start - paused)
            if time.perf_counter() - drawn >= DRAW_INTERVAL:
                before = time.perf_counter()
                job.publish(lambda: self._show_run(run))
                drawn = time.perf_counter()
                paused += drawn - before  # drawing is not training: samples/s leaves it out
        run.done = True
        with self._lock:
            self._runs[s.key] = run
            while len(self._runs) > 64:
                self._runs.popitem(last=False)
        return run

    def _show_run(self, run: _Run) -> None:
        """Draw ``run`` (finished or not) beside the last finished runs; called by the newest job only."""
        key = run.setting.key
        with self._lock:
            runs = dict(self._runs)
        if run.done:
            self._kept = [k for k in self._kept if k != key and k in runs] + [key]
        earlier = [runs[k] for k in self._kept if k != key and k in runs][-(self.keep - 1):] if self.keep > 1 else []
        shown = earlier + [run]
        if "convergence" in self.panels and run.history.loss:
            self.convergence.draw(_convergence_figure(shown))
        self.convergence.say(self._run_text(run, shown))
        if "speed" in self.panels and run.done:
            self._show_speed(run)
        self._run_shown, self._shown_runs, self._error = run, shown, None
        self._draws.append(run.setting.label)

    def _run_text(self, run: _Run, shown: list) -> str:
        h = run.history
        if not run.done:
            return f"Training <b>{html.escape(h.label)}</b>: step {len(h.loss)} of {run.steps}…"
        epochs, max_steps = ex.RUNS[run.setting.model]
        return (f"<b>{html.escape(h.label)}</b>: {run.steps} steps, {h.samples[-1]:,} samples, final loss "
                f"{h.loss[-1]:.3f} (a short run: {epochs} epoch{'s' * (epochs > 1)}, at most {max_steps} steps)."
                + self._twin_text(run, shown))

    def _twin_text(self, run: _Run, shown: list) -> str:
        """An accumulated run beside the same batch taken whole (either one drawn now): do their curves coincide?"""
        s = run.setting
        twins = [r for r in shown if r is not run and r.done and r.setting.accumulation_steps != s.accumulation_steps
                 and 1 in (r.setting.accumulation_steps, s.accumulation_steps)
                 and (r.setting.model, r.setting.batch_size, r.setting.lr, r.setting.optimizer, r.setting.seed)
                 == (s.model, s.batch_size, s.lr, s.optimizer, s.seed)]
        if not twins:
            return ""
        twin = twins[-1]  # the most recent
        split = run if s.accumulation_steps > 1 else twin
        gap = max(abs(a - b) for a, b in zip(run.history.loss, twin.history.loss))
        curves = (f"Its curve (dashed) and the one of <b>{html.escape(twin.history.label)}</b>" if split is run else
                  f"The dashed curve of <b>{html.escape(twin.history.label)}</b> and this one")
        if gap < 1e-4:
            return (f" {curves} lie on each other: the losses differ by at most {gap:.1e}, because accumulating "
                    f"{split.setting.accumulation_steps} micro-batches gives the same updates as the whole batch "
                    f"(chapter 6).")
        batch_norm = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
        model = self._templates[s.model][1] if s.model in self._templates else None
        why = ("BatchNorm normalises each micro-batch with its own statistics"
               if model is not None and any(isinstance(m, batch_norm) for m in model.modules())
               else "the micro-batches' sums are rounded differently")
        return f" {curves} differ by up to {gap:.3f} in loss: {why} (chapter 6)."

    def _show_speed(self, run: _Run) -> None:
        s = run.setting
        with self._lock:
            runs = list(self._runs.values())
        points = {r.setting.batch_size: r.history.samples_per_second for r in runs
                  if r.done and r.setting.model == s.model and r.setting.accumulation_steps == s.accumulation_steps}
        self.speed.draw(ex.plot_speed(points, current=s.batch_size, title=f"{s.model}: speed against batch size"))
        per_step = 1000 * run.history.seconds[-1] / run.steps
        self.speed.say(f"<b>{run.history.samples_per_second:,.0f} samples/s</b> at batch {s.batch_size} "
                       f"({per_step:.1f} ms per step), measured on this machine's CPU.")

    def _run_failed(self, error: Exception) -> None:
        label = self._submitted.label if self._submitted else "this setting"
        self._error = f"could not train {label}: {error}"
        self.convergence.say(f"<b style='color:#C44E52'>Could not train {html.escape(label)}:</b> "
                             f"{html.escape(str(error))}")

    # -- what is shown ----------------------------------------------------------------------------
    @property
    def state(self) -> dict:
        """What the panels show now: the setting, the memory estimate, the run drawn and its speed."""
        with self.jobs.drawing:
            memory, run, error = self._memory, self._run_shown, self._error
            shown = list(getattr(self, "_shown_runs", []))
        point, largest = memory if memory is not None else (None, None)
        history = run.history if run is not None else None
        profile = self.profiles[self.profile.value]
        return {
            "batch_size": self._batch, "lr": self.lr.value, "model": self.model.value,
            "profile": profile.name, "accumulation_steps": self.accumulation_steps.value,
            "micro_batch": self._batch // self.accumulation_steps.value,
            "peak_bytes": point.peak_bytes if point else None,
            "breakdown": dict(point.breakdown) if point else None,
            "budget_bytes": profile.budget, "device_bytes": profile.capacity,
            "fits": point.fits if point else None, "largest_batch": largest,
            "run": history.label if history else None,
            "running": bool(run is not None and not run.done),
            "steps": len(history.loss) if history else 0, "steps_planned": run.steps if run else None,
            "loss": list(history.loss) if history else [], "samples": list(history.samples) if history else [],
            "samples_per_second": history.samples_per_second if run is not None and run.done else None,
            "runs": [r.history.label for r in shown],
            "error": error,
            "message": html.unescape(self.message.value.replace("</div>", "\n")).replace(
                "<div style='color:#C44E52'>⚠ ", "").strip(),
        }

    def __repr__(self) -> str:
        return f"BatchSizeExplorer(panels={self.panels!r})"


def _convergence_figure(runs: list):
    """The convergence panel: loss on a linear axis (the runs span a factor of a few, not decades), and
    accumulated runs dashed, so that one lying on its full-batch twin stays visible."""
    fig = plot_histories([r.history for r in runs], x=("steps", "samples"), log_loss=False,
                         title="loss on the digits, trained on this machine's CPU")
    fig.axes[0].xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 1, 10, 100, not 10⁰
    _dash(fig, {r.history.label for r in runs if r.setting.accumulation_steps > 1})
    return fig


def _dash(fig, labels: set) -> None:
    if not labels:
        return
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_label() in labels:
                line.set_linestyle((0, (4, 3)))
                line.set_linewidth(2.0)
                line.set_zorder(3)  # above a solid curve it may lie on
    if fig.axes and fig.axes[0].get_legend() is not None:
        fig.axes[0].legend(fontsize="small")  # again, so that the legend shows the dashes


def _micro(s: ex.RunSetting) -> str:
    k = s.accumulation_steps
    return f" ({k} x {s.batch_size // k})" if k > 1 else ""


def _size(nbytes: int) -> str:
    return f"{nbytes / ex.GiB:.2f} GiB" if nbytes >= ex.GiB else f"{nbytes / MiB:.0f} MiB"

