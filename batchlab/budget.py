"""Out of memory on purpose: a simulated GPU budget, and the batch-size search that probes it (chapter 4).

* :func:`memory_budget` makes tensor memory behave like a GPU of a given size, on any device: when the
  tracked tensors would need more, the operation raises a real ``torch.OutOfMemoryError`` with a
  message in the style of CUDA's. Learners without a GPU meet, catch and recover from it.
* :func:`probe_batch_size` is the probing search that Lightning's and Accelerate's batch-size finders
  run: train a step, catch the out-of-memory error, clean up, try another size. It restores the model
  and optimizer bitwise afterwards.
"""

from __future__ import annotations

import gc
import io
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .memory import CATEGORIES
from .progress import progress_bar
from .state import forked_rng, restore_grads, restore_modes, saved_modes, stash_grads, train_mode
from .steps import check_optimizer, make_optimizer, train_step
from .tracker import track_storages
from .validation import (
    MiB,
    check_batch,
    check_bool,
    check_choice,
    check_device,
    check_int,
    check_loss_fn,
    check_model,
    check_trainable,
    device_of,
    parse_bytes,
)


class _BudgetGuard:
    """A tracker observer that raises ``torch.OutOfMemoryError`` when live tensors pass the budget.

    It hears of an allocation only after the operation made it, so the tracker drops the operation's
    result before the error travels: once raised, the refused block is no longer held nor counted, as
    on a GPU, which would never have allocated it.
    """

    def __init__(self, budget: int):
        self.budget, self.live, self.sizes, self.tracker = budget, 0, {}, None

    def allocated(self, serial: int, nbytes: int) -> None:
        self.sizes[serial] = nbytes
        self.live += nbytes
        if self.live > self.budget and self.tracker is not None and self.tracker.active:
            raise torch.OutOfMemoryError(self._message(serial, nbytes))

    def freed(self, serial: int) -> None:
        self.live -= self.sizes.pop(serial, 0)

    def after_op(self, func, args, out) -> None:
        pass

    def _message(self, serial: int, nbytes: int) -> str:
        in_use = self.live - nbytes
        by_category = self.tracker.current()
        by_category[self.tracker.category_of(serial)] -= nbytes  # what was in use before this allocation
        parts = ", ".join(f"{c} {by_category[c] / MiB:.2f} MiB" for c in CATEGORIES if by_category.get(c))
        # It opens with CUDA's own words, so that the tools that recognise an out-of-memory error by its text
        # (Accelerate's find_executable_batch_size, Lightning's is_oom_error) treat it as one; the next
        # sentence says that no GPU ran out.
        return (
            f"CUDA out of memory. Tried to allocate {nbytes / MiB:.2f} MiB. (Simulated by "
            f"batchlab.memory_budget: the tensors would pass its budget; no GPU ran out of memory.) "
            f"Of the {self.budget / MiB:.2f} MiB budget, {in_use / MiB:.2f} MiB is in use by tensors "
            f"({parts}) and {(self.budget - in_use) / MiB:.2f} MiB is free. The {nbytes / MiB:.2f} MiB were "
            f"not allocated. Free memory outside the except block, then try a smaller batch or gradient "
            f"accumulation (chapter 6)."
        )


@contextmanager
def memory_budget(budget, model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None):
    """Inside the block, tensors may use at most ``budget`` ("512MiB", "4 GiB" or bytes) in total.

    Counted: every tensor created in the block, plus the existing parameters, buffers, gradients and
    optimizer state of ``model`` and ``optimizer`` when given (pass them: on a GPU they take memory
    too). The operation that would exceed the budget raises ``torch.OutOfMemoryError``, and the memory
    it asked for is not kept, as on a GPU; catch it, let the ``except`` block end, free what you can, and
    carry on. ``with memory_budget(...) as tracker`` gives the :class:`~batchlab.tracker.MemoryTracker`
    that counts: ``tracker.current()`` by category, with what autograd saved for backward as activations.

    Batchlab's tools work inside the block and what they allocate counts: :func:`batchlab.profile_step`
    measures its step with a tracker of its own while the budget counts the step (and the model copy it
    runs on), and raises the budget's ``OutOfMemoryError`` if they do not fit. Budgets do not nest.
    """
    budget = parse_bytes("budget", budget)
    if model is not None:
        check_model(model)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer or None (the one you train with, e.g. "
            f"torch.optim.SGD(model.parameters(), lr=0.1)), got {optimizer!r}"
        )
    if getattr(_current, "guard", None) is not None:
        raise RuntimeError(
            "memory_budget is already active: budgets cannot be nested. Leave the outer block "
            "first, or give the outer block the budget you want"
        )
    guard = _BudgetGuard(budget)
    # No timeline (only what is alive now counts), but the saved-tensor hooks, so that what the forward
    # pass keeps for backward is counted as activations; meta tensors (estimate_memory's step) take no memory.
    tracking = track_storages(model, optimizer, record=False, observer=guard, saved_tensors=True, count_meta=False)
    with tracking as tracker:
        guard.tracker = tracker
        if guard.live > budget:
            raise ValueError(
                f"budget {budget / MiB:.2f} MiB is smaller than what exists already: {guard.live / MiB:.2f} MiB "
                f"({', '.join(f'{c} {b / MiB:.2f} MiB' for c, b in tracker.current().items() if b)}); "
                f"even batch 1 cannot fit"
            )
        _current.guard = guard
        try:
            yield tracker
        finally:
            _current.guard = None


_current = threading.local()  # the budget of the memory_budget block this thread is in (probe_batch_size asks)


@dataclass
class BatchSizeSearch:
    """What :func:`probe_batch_size` found: the batch size, and every trial (size, fitted, seconds)."""

    batch_size: int
    mode: str
    trials: list = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(t[2] for t in self.trials)

    def __repr__(self) -> str:
        tried = ", ".join(f"{n}{'' if ok else ' (OOM)'}" for n, ok, _ in self.trials)
        return f"BatchSizeSearch({self.mode}: batch size {self.batch_size} after {len(self.trials)} trials: {tried})"


def _snapshot(model: nn.Module, optimizer) -> bytes:
    """The model's and optimizer's state as bytes (not tensors, so it costs no tracked memory)."""
    buffer = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if isinstance(optimizer, torch.optim.Optimizer) else None,
        },
        buffer,
    )
    return buffer.getvalue()


def _restore(model: nn.Module, optimizer, snapshot: bytes) -> None:
    state = torch.load(io.BytesIO(snapshot), weights_only=True)
    model.load_state_dict(state["model"])
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer.load_state_dict(state["optimizer"])


def _trial(model, make_batch, n, optimizer, loss_fn, device) -> bool:
    """Two training steps at batch size ``n``: True if they fitted, False on out-of-memory."""
    inputs, targets = check_batch(make_batch(n))
    if len(inputs) != n:
        raise ValueError(f"make_batch({n}) must return {n} samples, got inputs of shape {tuple(inputs.shape)}")
    opt = optimizer if isinstance(optimizer, torch.optim.Optimizer) else make_optimizer(optimizer, model.parameters())
    fitted = True
    try:
        inputs, targets = inputs.to(device), targets.to(device)
        for _ in range(2):  # the second step is the one that counts: the optimizer state exists by then
            train_step(model, opt, inputs, targets, loss_fn=loss_fn)
    except torch.OutOfMemoryError:
        fitted = False
    except RuntimeError as error:  # the CPU's allocator has no OutOfMemoryError of its own
        if "DefaultCPUAllocator" not in str(error):
            raise
        fitted = False
    # Clean up *after* the except block: while it runs, the traceback keeps the failed step's tensors
    # (activations in the frames of forward) alive, and nothing could be freed.
    inputs = targets = None
    opt.zero_grad(set_to_none=True)
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return fitted


def probe_batch_size(
    model: nn.Module,
    make_batch,
    *,
    mode: str = "power",
    start: int = 2,
    max_trials: int = 25,
    optimizer="sgd",
    loss_fn=None,
    device=None,
    progress: bool = True,
) -> BatchSizeSearch:
    """Search for the largest batch that trains without running out of memory, by trying it.

    ``mode="power"`` doubles the batch from ``start`` until a step runs out of memory and keeps the last
    size that worked (Lightning's default); ``"binsearch"`` then bisects between that size and the one
    that failed. Out-of-memory errors come from a real GPU, or from :func:`memory_budget` on any device.
    ``optimizer`` is "sgd", "adam", a function ``params -> Optimizer`` or an existing optimizer.

    Each trial is two real steps (forward, backward, optimizer step), so the search changes the weights;
    they are saved first (as bytes, outside the budget) and restored afterwards, so ``model`` and an
    optimizer you pass are bitwise as they were, whatever happens. ``progress`` draws a bar over the trials.
    """
    check_model(model)
    if not callable(make_batch):
        raise TypeError(f"make_batch must be a function n -> (inputs, targets), got {make_batch!r}")
    check_choice("mode", mode, ("power", "binsearch"))
    check_int("start", start, minimum=1)
    check_int("max_trials", max_trials, minimum=1)
    if not isinstance(optimizer, torch.optim.Optimizer):
        check_optimizer(optimizer)
    loss_fn = check_loss_fn(loss_fn)
    check_bool("progress", progress)
    check_trainable(model)
    device = check_device(device) if device is not None else device_of(model)
    if device.type == "cpu" and getattr(_current, "guard", None) is None:
        raise ValueError(
            "probe_batch_size on the CPU needs a memory_budget block: without a budget the batch "
            "grows until the machine runs out of memory (minutes, then a crash). Write "
            "`with batchlab.memory_budget('512MiB', model): batchlab.probe_batch_size(...)`"
        )
    snapshot, modes, grads = _snapshot(model, optimizer), saved_modes(model), stash_grads(model)
    search = BatchSizeSearch(0, mode)
    bar = progress_bar(progress, desc=f"probe_batch_size ({mode})", unit="trial")

    def fits(n: int) -> bool:
        bar.set_postfix(batch=n, refresh=False)
        ok = _trial(model, make_batch, n, optimizer, loss_fn, device)
        bar.update()
        return ok

    try:
        with forked_rng(device):
            train_mode(model)
            _search(search, fits, start, max_trials)
    finally:
        bar.close()
        _restore(model, optimizer, snapshot)
        restore_modes(modes)
        restore_grads(grads)
    if search.batch_size == 0:
        raise torch.OutOfMemoryError(
            f"even the first trial, batch {start}, ran out of memory: try start=1, "
            f"a larger budget or a smaller model. Trials: {search.trials}"
        )
    return search


def _search(search: BatchSizeSearch, fits, start: int, max_trials: int) -> None:
    def attempt(n: int) -> bool:
        began = time.perf_counter()
        ok = fits(n)
        search.trials.append((n, ok, time.perf_counter() - began))
        if ok:
            search.batch_size = max(search.batch_size, n)
        return ok

    n, failed = start, None
    while len(search.trials) < max_trials:  # grow: double until a step does not fit
        if not attempt(n):
            failed = n
            break
        n *= 2
    if search.mode == "binsearch" and failed is not None:
        lo, hi = search.batch_size, failed
        while hi - lo > 1 and len(search.trials) < max_trials:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if attempt(mid) else (lo, mid)
