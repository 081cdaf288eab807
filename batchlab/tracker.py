"""The machinery behind :func:`batchlab.track_memory` (chapter 4; chapter 5's leak checks and the budgets and
estimates of chapters 4 and 9 use it too).

It holds :class:`MemoryTracker`, the live state of one tracking block (the storages alive now, their categories
and the events of the step), the hooks it puts on a model, its parameters and an optimizer to name the phases,
the ``TorchDispatchMode`` that sees every tensor operation, :func:`track_storages` (the block itself, for
batchlab's own tools), :func:`recomputation` (for activation checkpointing) and :func:`replay_events`, which turns
a tracker's events into a timeline and its peaks. What is measured and how is described in :mod:`batchlab.memory`.
"""

from __future__ import annotations

import collections
import threading
import weakref
from contextlib import contextmanager, nullcontext
from functools import partial

import torch
from torch import nn

from .memory import CATEGORIES, MemoryReport, TimelineEvent, optimizer_state_tensors, storage_of, tensors_in
from .torch_internals import LIFT_FRESH, dispatch_mode_base
from .validation import MiB, check_choice

# When a storage is seen in several roles, the role that explains it best wins: a parameter saved for
# backward is still a parameter, an input saved for backward is still an input.
_PRIORITY = {
    "temporaries": 0,
    "activations": 1,
    "inputs": 2,
    "gradients": 3,
    "optimizer_state": 3,
    "buffers": 4,
    "parameters": 5,
}


_active = threading.local()  # .trackers: this thread's active trackers, outermost first


def active_trackers() -> list:
    """The trackers whose blocks this thread is in, outermost first (a copy: changing it changes nothing).

    Blocks nest: a :func:`batchlab.profile_step` inside a :func:`batchlab.memory_budget` block runs a tracker
    of its own, and every operation is seen by both, so the budget counts what the nested step allocates.
    """
    return list(_stack())


def _stack() -> list:
    if not hasattr(_active, "trackers"):
        _active.trackers = []
    return _active.trackers


def _reset_cuda_peak(tracker, device: str) -> None:
    """Reset ``torch.cuda``'s peak counters of ``device`` for ``tracker``; the outer trackers remember the
    peaks so far, so that their own reports still cover their whole block."""
    torch.cuda.synchronize(device)
    peaks = (torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device))
    for outer in _stack():
        if outer is not tracker and outer.active and outer.device == device:
            outer._cuda_peaks = tuple(map(max, outer._cuda_peaks, peaks))
    tracker._cuda_peaks = (0, 0)
    torch.cuda.reset_peak_memory_stats(device)


class _StorageRef(weakref.ref):
    """A weak reference to a tracked storage that remembers what the tracker needs when it is freed."""

    __slots__ = ("key", "serial", "nbytes")

    def __new__(cls, storage, callback, key, serial, nbytes):
        ref = super().__new__(cls, storage, callback)
        ref.key, ref.serial, ref.nbytes = key, serial, nbytes
        return ref

    def __init__(self, storage, callback, *_args):
        super().__init__(storage, callback)


class MemoryTracker:
    """The live state of a :func:`track_memory` block; ask it for :meth:`current`, :meth:`report`."""

    def __init__(
        self,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        record: bool = True,
        observer=None,
        count_meta: bool = True,
    ):
        self.model, self.optimizer = model, optimizer
        params = list(model.parameters()) if model is not None else []
        if optimizer is not None:
            params += [p for group in optimizer.param_groups for p in group["params"]]
        self._params = list({id(p): p for p in params}.values())
        self.device = str(self._params[0].device) if self._params else "cpu"
        self.phase = "start"
        self._record = record  # False: keep only what is alive now (leak_check, memory_budget), no timeline
        # Something that wants every event as it happens (the GPU estimator replays them through a model
        # of CUDA's allocator): its allocated(serial, nbytes), freed(serial) and after_op(func, args, out).
        # A free is told when the tracker books it: before its next allocation, or when it is asked.
        self._observer = observer
        self._lock = threading.RLock()
        self._live: dict = {}  # id(storage) -> _StorageRef (serial, nbytes), until its free is booked
        # The weak references' callback is this deque's own append, a C function: no Python code runs when a
        # storage is freed, so a Ctrl-C cannot land half-way through the bookkeeping, which _drain does later.
        self._pending = collections.deque()
        self._category: dict = {}  # serial -> category
        self._events: list = []  # (serial, +nbytes or -nbytes, phase, what); serial 0 marks a new phase
        self._serial = 0
        self._device_bytes: dict = {}  # device -> bytes allocated there (names the device without a model)
        self._handles: list = []
        self._cuda = None
        self._cuda_peaks = (0, 0)  # peaks before a nested tracker reset torch.cuda's counters (allocated, reserved)
        # Tensors on the meta device have shapes but no memory: a budget does not count them (the estimator's
        # meta step inside a memory_budget block costs nothing); track_memory counts them when asked to.
        self._count_meta = count_meta
        self.active = False
        self.new_category = "temporaries"  # what new memory is until a hook says otherwise (see recomputation)

    # -- what the hooks call -------------------------------------------------------------------
    def _add(self, storage, category: str, what: str) -> int | None:
        """Start tracking ``storage`` (new memory, or memory that existed before the block)."""
        if not self._count_meta and storage.device.type == "meta":
            return None
        nbytes = storage.nbytes()
        key = id(storage)
        with self._lock:
            self._drain()  # a storage freed just now may have had this id
            if key in self._live:
                self._classify(self._live[key].serial, category)
                return None
            self._serial += 1
            serial = self._serial
            self._live[key] = _StorageRef(storage, self._pending.append, key, serial, nbytes)
            self._category[serial] = category
            device = str(storage.device)
            self._device_bytes[device] = self._device_bytes.get(device, 0) + nbytes
            if self._record:
                self._events.append((serial, nbytes, self.phase, what))
            if self._observer is not None:
                self._observer.allocated(serial, nbytes)
            return serial

    def _drain(self) -> None:
        """Book the storages freed since the last call. Each step can be repeated without harm, and a freed
        reference leaves the queue only once all are done: an interrupt here is raised, and the next call
        finishes the bookkeeping, so the counts stay right."""
        with self._lock:
            while self._pending:
                ref = self._pending[0]
                if self._live.get(ref.key) is ref:
                    if self._record:
                        last = self._events[-1] if self._events else None
                        if last is None or last[0] != ref.serial or last[1] >= 0:
                            self._events.append((ref.serial, -ref.nbytes, self.phase, "free"))
                    else:
                        self._category.pop(ref.serial, None)
                    if self._observer is not None:
                        self._observer.freed(ref.serial)  # observers forget a serial once (dict.pop)
                    del self._live[ref.key]
                self._pending.popleft()

    def _classify(self, serial: int, category: str) -> None:
        if _PRIORITY[category] > _PRIORITY[self._category[serial]]:
            self._category[serial] = category

    def adopt(self, tensors, category: str = "inputs") -> None:
        """Count ``tensors`` (created before the block) as live from now on, in ``category``."""
        check_choice("category", category, CATEGORIES)
        for tensor in tensors_in(tensors, []):
            storage = storage_of(tensor)
            if storage is not None and storage.nbytes() > 0:
                self._add(storage, category, f"existing {category}")

    def _reclassify(self, tensors, category: str) -> None:
        with self._lock:
            self._drain()
            for tensor in tensors_in(tensors, []):
                storage = storage_of(tensor)
                ref = self._live.get(id(storage)) if storage is not None else None
                if ref is not None:
                    self._classify(ref.serial, category)

    def _on_op(self, func, args, kwargs, out) -> None:
        self._drain()
        for storage in new_storages(func, args, kwargs, out, self._live):
            self._add(storage, self.new_category, str(func.overloadpacket.__name__))
        if self._observer is not None:
            self._observer.after_op(func, args, out)

    def _sweep(self) -> None:
        """Put the current gradients and optimizer state into their categories (and count any that
        were made without an operation the tracker sees)."""
        self._collect([p.grad for p in self._params if p.grad is not None], "gradients")
        if self.optimizer is not None:
            self._collect(optimizer_state_tensors(self.optimizer), "optimizer_state")

    def _collect(self, tensors, category: str) -> None:
        for tensor in tensors:
            storage = storage_of(tensor)
            if storage is not None and storage.nbytes() > 0:
                self._add(storage, category, f"found {category}")

    def begin_measurement(self) -> None:
        """Forget the events so far: the timeline restarts here, from what is alive now.

        For a warm-up inside the block (as :func:`profile_step` does before its block): memory alive now
        becomes the timeline's starting point, and peaks count from here. On CUDA the peak counter of
        ``torch.cuda`` is reset too.
        """
        with self._lock:
            self._drain()
            self._events = [(ref.serial, ref.nbytes, "start", "existing") for ref in self._live.values()]
            self.phase = "start"
        if self.active and self.device.startswith("cuda"):
            _reset_cuda_peak(self, self.device)

    def category_of(self, serial: int) -> str:
        """The category of the storage numbered ``serial`` (the numbers an observer is given)."""
        return self._category[serial]

    def mark(self, phase: str) -> None:
        """Name the phase that the next events belong to (for steps the hooks cannot see)."""
        if not isinstance(phase, str) or not phase:
            raise ValueError(f"phase must be a non-empty string, got {phase!r}")
        self._set_phase(phase)

    def _set_phase(self, phase: str) -> None:
        """Enter ``phase``; the timeline gets a marker even if the phase allocates nothing."""
        if phase != self.phase:
            self.phase = phase
            if self._record:
                with self._lock:
                    self._events.append((0, 0, phase, "phase"))

    # -- installing and removing ---------------------------------------------------------------
    def _install(self) -> None:
        self.active = True
        if self.device.startswith("cuda"):
            _reset_cuda_peak(self, self.device)
        if self.model is not None:
            self.adopt(list(self.model.parameters()), "parameters")
            self.adopt(list(self.model.buffers()), "buffers")
        self.adopt(self._params, "parameters")
        self.adopt([p.grad for p in self._params if p.grad is not None], "gradients")
        if self.optimizer is not None:
            self.adopt(optimizer_state_tensors(self.optimizer), "optimizer_state")
        self._handles.extend(install_hooks(self))

    def _uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._sweep()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            self._cuda = (
                torch.cuda.memory_allocated(self.device),
                max(torch.cuda.max_memory_allocated(self.device), self._cuda_peaks[0]),
                torch.cuda.memory_reserved(self.device),
                max(torch.cuda.max_memory_reserved(self.device), self._cuda_peaks[1]),
            )
        with self._lock:
            self._final = self.current()
            self._live.clear()  # dropping the weak references also drops their callbacks
            self._pending.clear()
        self.active = False

    # -- what a learner asks -------------------------------------------------------------------
    def current(self) -> dict:
        """Bytes alive now (or at the end of the block, once it is over), by category."""
        if not self.active:
            return dict(getattr(self, "_final", dict.fromkeys(CATEGORIES, 0)))
        with self._lock:
            self._drain()
            totals = dict.fromkeys(CATEGORIES, 0)
            for ref in self._live.values():
                totals[self._category[ref.serial]] += ref.nbytes
            return totals

    @property
    def current_bytes(self) -> int:
        """Total tracked bytes alive now."""
        return sum(self.current().values())

    def report(self, label: str = "") -> MemoryReport:
        """The :class:`MemoryReport` of everything seen so far (categories as known now)."""
        if not self._record:
            raise RuntimeError(
                "this tracker keeps no timeline (it was started by leak_check or memory_budget); use current()"
            )
        if self.active:
            self._sweep()
        with self._lock:
            self._drain()
            events = list(self._events)
            categories = dict(self._category)
        timeline, peak, at_peak, category_peaks = replay_events(events, categories, self.phase)
        cuda = self._cuda or (None, None, None, None)
        device = (
            self.device
            if self._params or not self._device_bytes
            else max(self._device_bytes, key=self._device_bytes.get)
        )
        return MemoryReport(
            peak_bytes=peak,
            breakdown=dict(at_peak.bytes),
            peak_phase=at_peak.phase,
            timeline=timeline,
            device=device,
            category_peaks=category_peaks,
            cuda_allocated=cuda[0],
            cuda_max_allocated=cuda[1],
            cuda_reserved=cuda[2],
            reserved_bytes=cuda[3],
            label=label,
        )

    @property
    def peak_bytes(self) -> int:
        """The most tracked bytes alive at any moment so far."""
        return self.report().peak_bytes

    def __repr__(self) -> str:
        state = "active" if self.active else "finished"
        return f"MemoryTracker({state}, {self.current_bytes / MiB:.1f} MiB live, {len(self._events)} events)"


# -- the hooks a tracker puts on the model and the optimizer ----------------------------------------


class TrackerHook:
    """A hook that calls ``fn(tracker, *args)`` while the tracker's block is active.

    It holds the tracker by a weak reference and copies to itself: ``copy.deepcopy(model)`` inside a
    block (profile_step, compare_gradients, a learner's own copy) then neither copies the tracker, whose
    lock cannot be copied, nor keeps it alive; a copy's hook does nothing once the block is over.
    """

    def __init__(self, tracker: MemoryTracker, fn):
        self.tracker, self.fn = weakref.ref(tracker), fn

    def __call__(self, *args):
        tracker = self.tracker()
        if tracker is not None and tracker.active:
            self.fn(tracker, *args)

    def __deepcopy__(self, memo):
        return self


def forward_pre_hook(tracker: MemoryTracker, _module, args) -> None:
    tracker._set_phase("forward")
    tracker._drain()
    for tensor in tensors_in(args, []):
        storage = storage_of(tensor)
        if storage is None:
            continue
        if id(storage) in tracker._live:
            tracker._reclassify(tensor, "inputs")
        elif storage.nbytes() <= tensor.numel() * tensor.element_size():
            # An input made before the block: count it, unless it is a slice of a larger tensor
            # (a data set), which costs the step no memory of its own.
            tracker._add(storage, "inputs", "existing inputs")


def forward_hook(tracker: MemoryTracker, _module, _args, _output) -> None:
    tracker._set_phase("loss")


def grad_hook(tracker: MemoryTracker, param) -> None:
    tracker._set_phase("backward")
    tracker._reclassify(param.grad, "gradients")


def step_pre_hook(tracker: MemoryTracker, _optimizer, _args, _kwargs) -> None:
    tracker._sweep()
    tracker._set_phase("optimizer step")


def step_post_hook(tracker: MemoryTracker, _optimizer, _args, _kwargs) -> None:
    tracker._sweep()
    tracker._set_phase("after step")


def pack_hook(tracker: MemoryTracker, tensor):
    """Autograd saves ``tensor`` for backward: it is an activation."""
    if tracker.phase in ("start", "after step"):
        tracker._set_phase("forward")  # without a model, the first saved tensor marks the forward pass
    for each in _stack():  # only the innermost block's hooks are called: tell the outer trackers too
        if each.active:
            each._reclassify(tensor, "activations")
    # Keep a detached alias, not the tensor itself: an output saved with its own grad_fn would
    # make a reference cycle that the garbage collector cannot see (and so never frees).
    return tensor.detach()


def unpack_hook(tracker: MemoryTracker, tensor):
    tracker._set_phase("backward")  # backward is the only reader of saved tensors
    return tensor


def install_hooks(tracker: MemoryTracker) -> list:
    """Put the tracker's hooks on its model, its parameters and its optimizer: their removable handles."""
    handles = []
    if tracker.model is not None:
        handles.append(tracker.model.register_forward_pre_hook(TrackerHook(tracker, forward_pre_hook)))
        handles.append(tracker.model.register_forward_hook(TrackerHook(tracker, forward_hook)))
    for p in tracker._params:
        if p.requires_grad:
            handles.append(p.register_post_accumulate_grad_hook(TrackerHook(tracker, grad_hook)))
    if tracker.optimizer is not None:
        handles.append(tracker.optimizer.register_step_pre_hook(TrackerHook(tracker, step_pre_hook)))
        handles.append(tracker.optimizer.register_step_post_hook(TrackerHook(tracker, step_post_hook)))
    return handles


def new_storages(func, args, kwargs, out, live: dict) -> list:
    """The storages behind ``out`` (the result of ``func(*args, **kwargs)``) that are new memory: not in
    ``live`` (tracked already), not empty, and not shared with an input."""
    inputs = set() if func.overloadpacket is LIFT_FRESH else None
    new = []
    for tensor in tensors_in(out, []):
        storage = storage_of(tensor)
        if storage is None or id(storage) in live or storage.nbytes() == 0:
            continue
        if inputs is None:  # views, in-place and out= results share an input's storage: no new memory
            inputs = {id(s) for s in map(storage_of, tensors_in((args, kwargs), [])) if s is not None}
        if id(storage) not in inputs and all(storage is not s for s in new):
            new.append(storage)
    return new


def replay_events(events, categories: dict, phase: str = "start"):
    """Replay a tracker's events (serial, +/- bytes, phase, what): ``(timeline, peak bytes, event at the
    peak, each category's peak)``. The memory that existed at the start is one point of the timeline."""
    live = dict.fromkeys(CATEGORIES, 0)
    category_peaks = dict.fromkeys(CATEGORIES, 0)
    timeline, peak, peak_index = [], -1, 0
    for serial, delta, event_phase, what in events:
        if serial:  # serial 0 marks the start of a phase
            category = categories[serial]
            live[category] += delta
            category_peaks[category] = max(category_peaks[category], live[category])
        existing = what.startswith("existing") and event_phase == "start"
        if existing and timeline and timeline[-1].what == "existing":
            timeline[-1] = TimelineEvent(event_phase, dict(live), "existing")
        else:
            timeline.append(TimelineEvent(event_phase, dict(live), "existing" if existing else what))
        if sum(live.values()) > peak:
            peak, peak_index = sum(live.values()), len(timeline) - 1
    if not timeline:
        timeline, peak = [TimelineEvent(phase, dict(live), "nothing tracked")], 0
    return timeline, peak, timeline[peak_index], category_peaks


class _StorageWatcher(dispatch_mode_base()):
    """The dispatch mode of one tracker: called in place of every tensor operation, it runs the operation and
    tells the tracker. One class for all trackers (a class made per block would be a reference cycle, and
    would keep the tracker, its model and its optimizer alive until the garbage collector ran)."""

    def __init__(self, tracker: MemoryTracker):
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))  # called in place of the operation, the mode runs it
        try:
            self.tracker._on_op(func, args, kwargs, out)
        except torch.OutOfMemoryError as error:
            refused = error
        else:
            return out
        # An observer refused the new memory (memory_budget, or the estimator's simulated GPU). A GPU
        # would never have made it: drop the result before the error travels, so that it is not held
        # (the traceback's frames would keep it) and no longer counted.
        refused = refused.with_traceback(None)
        del out
        try:
            raise refused
        finally:
            del refused  # else this frame and the error's traceback would hold each other in a cycle


@contextmanager
def track_storages(
    model, optimizer, *, record: bool, observer=None, saved_tensors: bool | None = None, count_meta: bool = True
):
    """:func:`track_memory` without its argument checks, for batchlab's own tools: ``record=False`` keeps
    no timeline (leak_check, memory_budget); ``observer`` is told of every event as it happens (the GPU
    estimator, memory_budget); ``saved_tensors`` installs the saved-tensor hooks that name activations
    (default: when recording; memory_budget asks for them without a timeline); ``count_meta=False``
    ignores tensors on the meta device (memory_budget: they take no memory).

    Blocks nest: an inner tracker's dispatch mode runs each operation through the outer ones, so every
    tracker sees every operation of its block, and an outer observer (a budget) can refuse one made
    inside the inner block. The inner tracker's report is its own block's.
    """
    tracker = MemoryTracker(model, optimizer, record=record, observer=observer, count_meta=count_meta)
    stack = _stack()
    stack.append(tracker)
    try:
        tracker._install()
        # Saved-tensor hooks name the activations; leak_check does without them, because the aliases they
        # keep would add Python objects that the check counts.
        if saved_tensors is None:
            saved_tensors = record
        hooks = (
            torch.autograd.graph.saved_tensors_hooks(partial(pack_hook, tracker), partial(unpack_hook, tracker))
            if saved_tensors
            else nullcontext()
        )
        with _StorageWatcher(tracker), hooks:
            yield tracker
    finally:
        try:
            tracker._uninstall()
        finally:
            stack.remove(tracker)


@contextmanager
def recomputation():
    """Inside this block the active trackers (if any) count new memory as ``activations``.

    Activation checkpointing (:func:`batchlab.checkpointed`) recomputes a segment's forward pass during
    backward under hooks of its own, which the tracker's saved-tensor hooks do not see: what the
    recomputation makes is the segment's activations, made again.
    """
    trackers = list(_stack())
    outer = [tracker.new_category for tracker in trackers]
    for tracker in trackers:
        tracker.new_category = "activations"
    try:
        yield
    finally:
        for tracker, category in zip(trackers, outer):
            tracker.new_category = category
