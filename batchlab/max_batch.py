"""The largest batch that fits a memory budget, from estimates only (chapter 4): :func:`max_batch_size`.

A batch counts as fitting when its estimated step (:func:`batchlab.estimate_memory`) runs within the budget while
leaving one more segment for its largest allocation unused (``keep_margin=True``). That room is the estimate's own
uncertainty, in the allocator's units (:func:`batchlab.estimate.margin_bytes` says why).
"""

from __future__ import annotations

import torch
from torch import nn

from .estimate import estimate_memory, honour_autocast
from .memory import MemoryReport
from .precision import check_precision
from .progress import progress_bar
from .steps import check_optimizer
from .validation import MiB, batch_length, check_batch, check_int, check_loss_fn, check_trainable, parse_bytes, shape_of


def _fits(model, make_batch, n, budget, optimizer, loss_fn, device, levers) -> bool:
    try:
        estimate_memory(
            model,
            _checked_batch(make_batch, n),
            optimizer=optimizer,
            loss_fn=loss_fn,
            device=device,
            budget=budget,
            keep_margin=True,
            **levers,
        )
    except torch.OutOfMemoryError:
        return False
    return True


def _checked_batch(make_batch, n: int):
    batch = make_batch(n)
    inputs, targets = check_batch(batch, keyword_inputs=True)
    if batch_length(inputs) != n:
        raise ValueError(
            f"make_batch({n}) must return a batch of {n} samples, but its inputs have shape "
            f"{shape_of(inputs)}: build the batch with n as its first dimension"
        )
    return batch


def max_batch_size(
    model: nn.Module,
    make_batch,
    *,
    budget,
    optimizer="sgd",
    loss_fn=None,
    device="cuda",
    limit: int = 1 << 20,
    precision: str = "fp32",
    checkpointing=None,
    progress: bool = True,
) -> int:
    """The largest batch size whose training step fits in ``budget`` on ``device``, from estimates only.

    ``make_batch(n)`` returns a batch (inputs, targets) of ``n`` samples (meta tensors are fine and
    cost nothing). ``budget`` is the memory PyTorch may use, in bytes or as a string ("4GiB",
    "512 MiB"); on a real card that is its size minus the CUDA context (see ``CUDA_CONSTANTS``).

    A batch fits when the simulated caching allocator never needs more than the budget (it releases
    its unused cache first, like the real one): this counts reserved memory and fragmentation, not
    just the allocated peak. The margin comes from that modelled reserved memory: the simulated allocator
    must run the step while one more segment for the step's largest allocation stays unused
    (``estimate_memory(..., keep_margin=True)``, ``MemoryReport.margin_bytes``). One segment, because a real
    run that cannot reuse a cached block where the replay did needs one new segment; so the margin
    grows with the batch's largest tensor, and the answer errs on the safe side. Activation memory
    grows almost linearly with the batch, so two estimates give a first guess, and a short bisection
    near it gives the answer: about ten estimates in all. ``precision`` and ``checkpointing`` are those
    of :func:`estimate_memory`; ``progress`` draws a bar over the estimates.
    """
    check_trainable(model)
    if not callable(make_batch):
        raise TypeError(f"make_batch must be a function n -> (inputs, targets), got {make_batch!r}")
    budget = parse_bytes("budget", budget)
    check_int("limit", limit, minimum=1)
    check_optimizer(optimizer)
    check_loss_fn(loss_fn)
    check_precision(precision)
    levers = dict(precision=honour_autocast(precision), checkpointing=checkpointing)
    args = (optimizer, loss_fn, device, levers)
    with progress_bar(progress, desc="max_batch_size", unit="estimate") as bar:
        return _largest_fitting(model, make_batch, budget, limit, args, bar)


def _largest_fitting(model, make_batch, budget, limit, args, bar) -> int:
    """:func:`max_batch_size`'s search, ``bar`` advanced by one after each estimate."""
    optimizer, loss_fn, device, levers = args

    def fits(n: int) -> bool:
        bar.set_postfix(batch=n, refresh=False)
        ok = _fits(model, make_batch, n, budget, *args)
        bar.update()
        return ok

    smallest, one = _smallest_batch(model, make_batch, optimizer, loss_fn, device, levers)
    if not fits(smallest):
        raise ValueError(_does_not_fit_message(one, budget, smallest))
    probe = max(smallest + 1, min(limit, 64))
    many = estimate_memory(
        model, _checked_batch(make_batch, probe), optimizer=optimizer, loss_fn=loss_fn, device=device, **levers
    )
    per_sample = max(1.0, (many.peak_bytes - one.peak_bytes) / (probe - smallest))
    guess = int(min(limit, max(smallest, smallest + (budget - one.peak_bytes) / per_sample)))
    # Bracket the answer around the linear guess, then bisect: lo always fits, hi never does.
    if fits(guess):
        lo, hi = guess, min(limit + 1, max(guess + 1, int(guess * 1.1)))
        while hi <= limit and fits(hi):
            lo, hi = hi, min(limit + 1, hi * 2)
    else:
        lo, hi = smallest, guess
        candidate = int(guess * 0.9)
        while candidate > lo and not fits(candidate):
            hi, candidate = candidate, int(candidate * 0.8)
        lo = max(lo, candidate)
    while hi - lo > max(1, lo // 100):  # within 1%: closer is not worth more estimates
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _smallest_batch(model, make_batch, optimizer, loss_fn, device, levers):
    """1, or 2 for models that cannot train on one sample (BatchNorm needs two values per channel)."""
    try:
        return 1, estimate_memory(
            model, _checked_batch(make_batch, 1), optimizer=optimizer, loss_fn=loss_fn, device=device, **levers
        )
    except ValueError as error:
        if "more than 1 value per channel" not in str(error):
            raise
        return 2, estimate_memory(
            model, _checked_batch(make_batch, 2), optimizer=optimizer, loss_fn=loss_fn, device=device, **levers
        )


def _does_not_fit_message(report: MemoryReport, budget: int, smallest: int) -> str:
    parts = sorted(((b, c) for c, b in report.breakdown.items() if b), reverse=True)[:3]
    largest = ", ".join(f"{c} {b / MiB:.1f} MiB" for b, c in parts)
    return (
        f"even a batch of {smallest} does not fit in {budget / MiB:.1f} MiB: one step needs about "
        f"{report.peak_bytes / MiB:.1f} MiB (largest parts: {largest}). Use a larger budget, a smaller "
        f"model, or an optimizer with less state (SGD keeps one buffer per parameter, Adam two)."
    )
