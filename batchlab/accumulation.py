"""Gradient accumulation and virtual batches, proved and measured (chapter 6).

The reference loop is :func:`batchlab.train_step`, the step that :func:`batchlab.train` runs
(``accumulation_steps``). This module holds what the chapter needs around it:

* :func:`split_batch`, :func:`accumulate_weighted` and :func:`accumulate_naive`: one effective batch
  as micro-batches, accumulated with each micro-batch's loss weighted by its share of the samples (or
  tokens), or naively divided by the number of micro-batches (the pitfall);
* :func:`compare_gradients` -> :class:`GradientComparison`: the full batch's gradient against the
  accumulated one, parameter by parameter;
* BatchNorm under accumulation: :func:`batchnorm_statistics` (what a BatchNorm layer sees),
  :class:`GhostBatchNorm` and :func:`replace_batchnorm` (virtual batches, GroupNorm, LayerNorm);
* memory and time of one accumulated step: :func:`profile_accumulation`, :func:`accumulation_step_time`;
* :func:`accumulation_run`, the computation behind :class:`batchlab.widgets.AccumulationExplorer`;

The checks of the chapter's exercises are in :mod:`batchlab.exercises.chapter6`.
"""

from __future__ import annotations

import copy
import math
import numbers
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from .memory import MemoryReport, track_memory
from .steps import check_optimizer, make_optimizer, train_step
from .training import train
from .validation import (
    check_batch,
    check_choice,
    check_float,
    check_int,
    check_loss_fn,
    check_model,
    check_seed,
    check_trainable,
    device_of,
)

# Two float32 gradients count as equal when their difference is at most this fraction of the gradient's
# norm: float32 keeps about 7 significant digits, and summing the same numbers in another order
# (micro-batch by micro-batch) changes the last of them.
RTOL = 1e-5


# -- splitting a batch and accumulating its micro-batches ----------------------------------------


def split_batch(batch, micro_batches) -> list:
    """Split ``batch`` = (inputs, targets) into a list of (inputs, targets) micro-batches (views, no copy).

    ``micro_batches`` is a number of equal micro-batches (it must divide the batch, as
    ``accumulation_steps`` must in :func:`batchlab.train`) or a list of sizes that add up to the
    batch, for uneven micro-batches such as the last, partial one: ``[16, 16, 16, 2]``.
    """
    inputs, targets = check_batch(batch)
    n = len(targets)
    if isinstance(micro_batches, numbers.Integral) and not isinstance(micro_batches, bool):
        k = check_int("micro_batches", micro_batches, minimum=1)
        if n % k:
            size = -(-n // k)  # micro-batches of ceil(n / k) samples and a shorter last one, as an example
            raise ValueError(
                f"micro_batches={k} does not divide the batch of {n} samples into equal micro-batches; "
                f"use one of {[d for d in range(1, n + 1) if n % d == 0]}, or give a list of sizes "
                f"(e.g. {[size] * (n // size) + ([n % size] if n % size else [])}) for uneven ones"
            )
        sizes = [n // k] * k
    elif isinstance(micro_batches, (list, tuple)) and micro_batches:
        sizes = [check_int(f"micro_batches[{i}]", s, minimum=1) for i, s in enumerate(micro_batches)]
        if sum(sizes) != n:
            raise ValueError(
                f"micro_batches sizes must add up to the batch ({n} samples), got {sizes} (sum {sum(sizes)})"
            )
    else:
        raise TypeError(f"micro_batches must be a positive int or a non-empty list of sizes, got {micro_batches!r}")
    return list(zip(inputs.split(sizes), targets.split(sizes)))


def _check_training_model(model) -> None:
    check_trainable(model)
    if not model.training:
        raise ValueError(
            "model is in eval mode (model.training is False): BatchNorm would use its running "
            "statistics and dropout would be off, so these would not be the gradients that training "
            "computes. Call model.train() first (batchlab.train does it for you)."
        )


def _check_micro_batches(micro_batches) -> list:
    if not isinstance(micro_batches, (list, tuple)) or not micro_batches:
        raise TypeError(f"micro_batches must be a non-empty list of (inputs, targets) pairs, got {micro_batches!r}")
    for i, pair in enumerate(micro_batches):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(isinstance(t, torch.Tensor) for t in pair):
            raise TypeError(
                f"micro_batches[{i}] must be a pair (inputs, targets) of tensors, got {type(pair).__name__}"
            )
        if len(pair[0]) == 0 or len(pair[1]) == 0:
            raise ValueError(f"micro_batches[{i}] has no samples: every micro-batch needs at least one")
        if len(pair[0]) != len(pair[1]):
            raise ValueError(f"micro_batches[{i}] has {len(pair[0])} inputs but {len(pair[1])} targets")
    return list(micro_batches)


def _counts(micro_batches, count) -> list:
    """How many loss terms (samples, or tokens with ``count``) each micro-batch's mean is taken over."""
    if count is None:
        return [len(targets) for _, targets in micro_batches]
    if not callable(count):
        raise TypeError(
            f"count must be None (count samples) or a function (inputs, targets) -> number of loss "
            f"terms, e.g. lambda x, y: (y != -100).sum(), got {count!r}"
        )
    counts = [int(count(inputs, targets)) for inputs, targets in micro_batches]
    if any(c < 0 for c in counts) or sum(counts) == 0:
        raise ValueError(f"count must give a number >= 0 for each micro-batch and more than 0 in all, got {counts}")
    return counts


def _scalar_loss(loss_fn, outputs, targets) -> torch.Tensor:
    loss = loss_fn(outputs, targets)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError(
            "loss_fn must return the mean loss of a micro-batch as a scalar tensor, got "
            f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}"
        )
    return loss


def _undo_on_error(model: nn.Module, fn):
    """Run ``fn()``; if it fails, put the gradients and buffers back as they were (nothing half-accumulated)."""
    # Gradients that already exist are copied, since backward adds into them in place; the usual case
    # after zero_grad(set_to_none=True) is no gradient at all, which costs nothing to remember.
    grads = {p: (p.grad, p.grad.clone() if p.grad is not None else None) for p in model.parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # BatchNorm statistics move in forward
    try:
        return fn()
    except BaseException:
        with torch.no_grad():
            for p, (grad, saved) in grads.items():
                if grad is not None:
                    grad.copy_(saved)  # the caller's own gradient tensor, with its values as they were
                p.grad = grad
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        raise


def accumulate_weighted(model: nn.Module, micro_batches, *, loss_fn=None, count=None) -> float:
    """Backward over ``micro_batches`` so that ``.grad`` adds the gradient of the whole batch's mean loss.

    ``loss_fn`` (default cross-entropy) returns the *mean* loss of one micro-batch. Each micro-batch's
    loss is weighted by its share of all the loss terms: its samples (default), or what ``count(inputs,
    targets)`` returns, e.g. the tokens that are not padding. Equal and uneven micro-batches then give the
    full batch's gradient. Does not step and does not zero: the caller does both, once per effective batch.
    Returns the batch's mean loss (a float). If anything fails, ``.grad`` and buffers are left as before.
    """
    _check_training_model(model)
    micro_batches = _check_micro_batches(micro_batches)
    loss_fn = check_loss_fn(loss_fn)
    counts = _counts(micro_batches, count)
    total = sum(counts)

    def run() -> float:
        batch_loss = 0.0
        for (inputs, targets), n in zip(micro_batches, counts):
            if n == 0:
                continue  # nothing to average (all padding): its mean would be 0 / 0, its share is 0
            loss = _scalar_loss(loss_fn, model(inputs), targets)  # mean over this micro-batch's n terms
            (loss * (n / total)).backward()  # n/total: its sum over the whole batch's count = the batch mean
            batch_loss += loss.item() * n / total  # .item(): a number, so the graph is freed now
        return batch_loss

    return _undo_on_error(model, run)


def accumulate_naive(model: nn.Module, micro_batches, *, loss_fn=None) -> float:
    """The common shortcut, kept to show its pitfall: every micro-batch's mean loss divided by their number.

    Right only when every micro-batch has the same number of loss terms; with a short last micro-batch or
    padded sequences it gives the few samples (tokens) of a small micro-batch the weight of a full one.
    """
    _check_training_model(model)
    micro_batches = _check_micro_batches(micro_batches)
    loss_fn = check_loss_fn(loss_fn)

    def run() -> float:
        batch_loss = 0.0
        for inputs, targets in micro_batches:
            loss = _scalar_loss(loss_fn, model(inputs), targets)
            (loss / len(micro_batches)).backward()  # the same weight for every micro-batch, whatever its size
            batch_loss += loss.item() / len(micro_batches)
        return batch_loss

    return _undo_on_error(model, run)


# -- the proof: full batch against accumulated micro-batches --------------------------------------


@dataclass
class GradientComparison:
    """One batch's gradient computed at once (``full``) and accumulated over micro-batches, per parameter.

    ``max_abs[i]``: the largest ``|accumulated - full|`` of parameter ``names[i]``; ``relative[i]``:
    ``norm(accumulated - full) / norm(full)`` for that parameter. ``relative_difference``: the same over
    all parameters at once; ``equal`` is True when it is at most ``rtol`` (float rounding). The whole
    gradient decides, because a parameter whose true gradient is about zero (a bias just before a
    BatchNorm, which cancels it) has a meaningless relative difference of its own.
    ``full_loss`` / ``accumulated_loss``: the batch's mean loss computed both ways.
    """

    names: list
    max_abs: list
    relative: list
    relative_difference: float
    micro_batch_sizes: list
    method: str
    full_loss: float
    accumulated_loss: float
    rtol: float = RTOL

    @property
    def max_abs_difference(self) -> float:
        return max(self.max_abs)

    @property
    def equal(self) -> bool:
        return self.relative_difference <= self.rtol

    def table(self) -> str:
        """One line per parameter: its name, max absolute and relative difference."""
        width = max(len(n) for n in self.names)
        lines = [f"{'parameter':<{width}} {'max |acc - full|':>17} {'relative':>9}"]
        lines += [f"{n:<{width}} {a:>17.1e} {r:>9.1e}" for n, a, r in zip(self.names, self.max_abs, self.relative)]
        return "\n".join(lines)

    def __repr__(self) -> str:
        verdict = "equal to float precision" if self.equal else f"DIFFERENT (more than {self.rtol:.0e} relative)"
        return (
            f"GradientComparison(batch {sum(self.micro_batch_sizes)} as micro-batches {self.micro_batch_sizes}, "
            f"{self.method}: max abs difference {self.max_abs_difference:.1e}, relative "
            f"{self.relative_difference:.1e}: {verdict})"
        )


def compare_gradients(
    model: nn.Module,
    batch,
    micro_batches=4,
    *,
    loss_fn=None,
    count=None,
    method: str = "weighted",
    rtol: float = RTOL,
    seed: int = 0,
) -> GradientComparison:
    """The gradient of ``batch`` = (inputs, targets) in one pass against the gradient accumulated over micro-batches.

    ``micro_batches``: a number of equal micro-batches or a list of their sizes (see :func:`split_batch`).
    ``method="weighted"`` accumulates with :func:`accumulate_weighted` (``count`` as there),
    ``"naive"`` with :func:`accumulate_naive`. Both passes run on copies of ``model`` that start from the
    same weights and buffers and the same random seed, so ``model`` is not changed. The model must be in
    train mode, since that is where accumulation matters (BatchNorm, dropout).
    """
    _check_training_model(model)
    check_choice("method", method, ("weighted", "naive"))
    check_float("rtol", rtol)
    check_seed("seed", seed)
    parts = split_batch(batch, micro_batches)
    inputs, targets = batch
    loss_fn = check_loss_fn(loss_fn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        full = _fresh_copy(model)
        full_loss = _scalar_loss(loss_fn, full(inputs), targets)  # the mean over the whole batch
        full_loss.backward()
        torch.manual_seed(seed)
        acc = _fresh_copy(model)
        if method == "weighted":
            acc_loss = accumulate_weighted(acc, parts, loss_fn=loss_fn, count=count)
        else:
            acc_loss = accumulate_naive(acc, parts, loss_fn=loss_fn)
    names, max_abs, relative, squares = [], [], [], [0.0, 0.0]  # squares: sums of diff² and full²
    for (name, p), q in zip(full.named_parameters(), acc.parameters()):
        g_full = (p.grad if p.grad is not None else torch.zeros_like(p)).double()
        diff = (q.grad if q.grad is not None else torch.zeros_like(q)).double() - g_full
        names.append(name)
        max_abs.append(diff.abs().max().item())
        relative.append(_ratio(diff.norm().item(), g_full.norm().item()))
        squares[0] += diff.square().sum().item()
        squares[1] += g_full.square().sum().item()
    return GradientComparison(
        names,
        max_abs,
        relative,
        _ratio(math.sqrt(squares[0]), math.sqrt(squares[1])),
        [len(t) for _, t in parts],
        method,
        full_loss.item(),
        acc_loss,
        rtol,
    )


def _ratio(difference: float, reference: float) -> float:
    if reference > 0:
        return difference / reference
    return 0.0 if difference == 0 else math.inf


def _fresh_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (every layer in the mode it is in) with no gradients; the caller's keeps its own."""
    work = copy.deepcopy(model)
    for p in work.parameters():
        p.grad = None
    return work


# -- BatchNorm: what it sees under accumulation, and the alternatives -----------------------------

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batchnorm_statistics(model: nn.Module, batch, micro_batches=4, *, layer: str | None = None) -> dict:
    """What one BatchNorm layer of ``model`` sees when ``batch`` runs at once and as micro-batches.

    In train mode BatchNorm normalises with the mean and variance of the batch it is given, per channel:
    the whole batch in one pass, only the micro-batch under accumulation. Returns a dict with the
    ``layer`` name, ``full_mean`` / ``full_std`` (one value per channel), ``micro_mean`` / ``micro_std``
    (one row per micro-batch), ``mean_shift`` (how far the micro-batches' means are from the full
    batch's, on average, in units of the full batch's std) and ``output_difference`` (the mean absolute
    difference of the layer's outputs for the same samples; the outputs have std about 1). ``layer``
    names the layer (default: the first BatchNorm). The BatchNorm inside a :class:`GhostBatchNorm` is
    left out: what it sees is fixed by its virtual batch. Runs on a copy: ``model`` is not changed.
    """
    _check_training_model(model)
    parts = split_batch(batch, micro_batches)
    work = _fresh_copy(model)
    ghosts = {id(m.bn) for m in work.modules() if isinstance(m, GhostBatchNorm)}
    norms = {name: m for name, m in work.named_modules() if isinstance(m, BATCHNORMS) and id(m) not in ghosts}
    if not norms:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer: nothing depends on the batch's statistics")
    name = layer if layer is not None else next(iter(norms))
    check_choice("layer", name, list(norms))
    seen = []
    handle = norms[name].register_forward_hook(lambda _m, args, out: seen.append((args[0].detach(), out.detach())))
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # dropout in the copy: keep the caller's generator
            work(batch[0])
            for inputs, _ in parts:
                work(inputs)
    finally:
        handle.remove()
    (full_in, full_out), micro = seen[0], seen[1:]
    dims = [d for d in range(full_in.dim()) if d != 1]  # every dimension but the channels

    def stats(x):  # BatchNorm's own statistics: per channel, the biased variance
        return x.mean(dims), x.var(dims, unbiased=False).sqrt()

    full_mean, full_std = stats(full_in)
    micro_mean, micro_std = (torch.stack(s) for s in zip(*(stats(x) for x, _ in micro)))
    micro_out = torch.cat([out for _, out in micro])
    return {
        "layer": name,
        "full_mean": full_mean,
        "full_std": full_std,
        "micro_mean": micro_mean,
        "micro_std": micro_std,
        "mean_shift": ((micro_mean - full_mean).abs() / full_std).mean().item(),
        "output_difference": (micro_out - full_out).abs().mean().item(),
    }


class GhostBatchNorm(nn.Module):
    """BatchNorm over *virtual* batches of ``virtual_batch`` samples ("ghost batch normalisation").

    In train mode the batch is cut into consecutive pieces of ``virtual_batch`` samples and each piece is
    normalised with its own statistics, by the wrapped ``batchnorm`` (whose weights and running statistics
    are used and updated, piece by piece). What a sample's normalisation depends on is then fixed by the
    virtual batch, not by how many samples happen to pass at once: a batch of 64 in one pass and the same
    64 as micro-batches of 16 (or 32) give the same result. In eval mode it is the plain BatchNorm.
    """

    def __init__(self, batchnorm: nn.Module, virtual_batch: int):
        super().__init__()
        if not isinstance(batchnorm, BATCHNORMS):
            raise TypeError(f"batchnorm must be a torch BatchNorm layer, got {type(batchnorm).__name__}")
        self.bn = batchnorm
        self.virtual_batch = check_int("virtual_batch", virtual_batch, minimum=2)  # 1 sample has no variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.bn(x)
        if len(x) % self.virtual_batch:
            raise ValueError(
                f"GhostBatchNorm got a batch of {len(x)} samples, not a multiple of its virtual batch "
                f"({self.virtual_batch}): use micro-batches that are multiples of it"
            )
        return torch.cat([self.bn(piece) for piece in x.split(self.virtual_batch)])

    def extra_repr(self) -> str:
        return f"virtual_batch={self.virtual_batch}"


NORMS = ("ghost", "group", "layer", "none")


def replace_batchnorm(model: nn.Module, norm: str, *, virtual_batch: int = 16, groups: int = 8) -> nn.Module:
    """A copy of ``model`` with every BatchNorm layer replaced; ``model`` itself is not changed.

    * ``"ghost"``: :class:`GhostBatchNorm` over virtual batches of ``virtual_batch`` samples (same weights);
    * ``"group"``: ``nn.GroupNorm`` with ``groups`` groups of channels (statistics per sample);
    * ``"layer"``: ``nn.GroupNorm(1, channels)``, i.e. LayerNorm over channels and positions of each sample;
    * ``"none"``: ``nn.Identity`` (no normalisation).

    GroupNorm and LayerNorm start from the BatchNorm's scale and shift, so the copy starts as close to
    the original as it can.
    """
    check_model(model)
    check_choice("norm", norm, NORMS)
    if norm == "ghost":
        check_int("virtual_batch", virtual_batch, minimum=2)
    if norm == "group":
        check_int("groups", groups, minimum=1)
    new = copy.deepcopy(model)
    if isinstance(new, BATCHNORMS):
        return _replacement(new, norm, virtual_batch, groups)
    found = [(name, m) for name, m in new.named_modules() if isinstance(m, BATCHNORMS)]
    if not found:
        raise ValueError(f"model ({type(model).__name__}) has no BatchNorm layer to replace")
    for name, bn in found:
        parent_name, _, child = name.rpartition(".")
        parent = new.get_submodule(parent_name) if parent_name else new
        setattr(parent, child, _replacement(bn, norm, virtual_batch, groups))
    return new


def _replacement(bn: nn.Module, norm: str, virtual_batch: int, groups: int) -> nn.Module:
    if norm == "ghost":
        return GhostBatchNorm(bn, virtual_batch)
    if norm == "none":
        return nn.Identity()
    channels = bn.num_features
    groups = 1 if norm == "layer" else math.gcd(groups, channels)  # GroupNorm needs groups to divide channels
    layer = nn.GroupNorm(groups, channels, eps=bn.eps, affine=bn.affine)
    if bn.affine:
        with torch.no_grad():
            layer.weight.copy_(bn.weight)
            layer.bias.copy_(bn.bias)
    return layer


# -- memory and time of one accumulated step ------------------------------------------------------


def _check_steps(accumulation_steps, batch_size: int) -> int:
    k = check_int("accumulation_steps", accumulation_steps, minimum=1)
    if batch_size % k:
        raise ValueError(
            f"accumulation_steps must divide the batch into equal micro-batches: {batch_size} is not "
            f"divisible by {k}; try one of {[d for d in range(1, batch_size + 1) if batch_size % d == 0]}"
        )
    return k


def _setup_step(model, batch, accumulation_steps, optimizer, loss_fn):
    """Checked arguments and a private copy of everything one accumulated step touches."""
    check_trainable(model)
    inputs, targets = check_batch(batch)
    k = _check_steps(accumulation_steps, len(targets))
    check_optimizer(optimizer)
    loss_fn = check_loss_fn(loss_fn)
    work = _fresh_copy(model).train()  # train mode, as batchlab.train runs it
    device = device_of(work)
    # Own copies of the batch: a slice of a larger tensor would otherwise count the whole tensor.
    inputs, targets = inputs.to(device).clone(), targets.to(device).clone()
    return work, inputs, targets, k, make_optimizer(optimizer, work.parameters()), loss_fn


def profile_accumulation(
    model: nn.Module, batch, accumulation_steps: int, *, optimizer="sgd", loss_fn=None
) -> MemoryReport:
    """Measure one step of ``batch`` (the effective batch) in ``accumulation_steps`` micro-batches: a MemoryReport.

    The step is :func:`batchlab.train`'s own: its accumulation loop, ``optimizer.step()`` and
    ``zero_grad(set_to_none=True)``, measured with :func:`batchlab.track_memory` after an unmeasured warm-up
    step on one micro-batch that creates the optimizer state. ``optimizer`` and ``loss_fn`` are as in
    :func:`batchlab.profile_step` (which this equals, up to a few bytes, for ``accumulation_steps=1``).
    The whole batch is alive during the step (as in ``train``, which loads it at once). Runs on a copy of
    ``model``, on its device: ``model`` and the global random state are not changed.
    """
    with torch.random.fork_rng(devices=[]):
        work, inputs, targets, k, opt, loss_fn = _setup_step(model, batch, accumulation_steps, optimizer, loss_fn)
        micro = len(targets) // k
        train_step(work, opt, inputs[:micro], targets[:micro], loss_fn=loss_fn)  # warm-up: optimizer state
        with track_memory(work, opt) as tracker:
            tracker.adopt([inputs, targets], "inputs")
            train_step(work, opt, inputs, targets, loss_fn=loss_fn, accumulation_steps=k)
    name = optimizer if isinstance(optimizer, str) else "custom optimizer"
    return tracker.report(label=f"{type(model).__name__}, batch {len(targets)} = {k} x {micro}, {name}")


def accumulation_step_time(
    model: nn.Module, batch, accumulation_steps: int, *, optimizer="sgd", loss_fn=None, repeats: int = 5
) -> float:
    """Median wall-clock seconds of one step of ``batch`` in ``accumulation_steps`` micro-batches.

    The step is the one :func:`profile_accumulation` measures, timed ``repeats`` times after one
    untimed warm-up step, on a copy of ``model``. A measurement of this machine under its current load.
    """
    check_int("repeats", repeats, minimum=1)
    with torch.random.fork_rng(devices=[]):
        work, inputs, targets, k, opt, loss_fn = _setup_step(model, batch, accumulation_steps, optimizer, loss_fn)
        train_step(work, opt, inputs, targets, loss_fn=loss_fn, accumulation_steps=k)  # warm-up: state, first calls
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            train_step(work, opt, inputs, targets, loss_fn=loss_fn, accumulation_steps=k)
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


# -- the widget's computation ---------------------------------------------------------------------


def accumulation_run(
    micro_batch: int,
    *,
    effective_batch: int = 64,
    model: str = "mlp",
    dataset=None,
    steps: int = 60,
    lr: float = 0.05,
    seed: int = 0,
) -> dict:
    """Train ``model`` at a fixed effective batch in micro-batches of ``micro_batch``; measure its step's memory.

    ``effective_batch / micro_batch`` is the number of accumulation steps (it must divide). The model
    (``batchlab.build_model(model)``, initial weights from ``seed``) is trained for ``steps`` optimizer
    steps on ``dataset`` (default: the digits training set) with :func:`batchlab.train`, and one step is
    measured with :func:`profile_accumulation`. Returns ``micro_batch``, ``accumulation_steps``,
    ``effective_batch``, ``peak_bytes`` (this machine's tensors), ``memory`` (the whole
    :class:`~batchlab.memory.MemoryReport`), ``loss`` (one per step), ``seconds`` (training time) and ``history``.
    """
    from torch.utils.data import default_collate

    from .datasets import digits
    from .models import build_model

    dataset = dataset if dataset is not None else digits(train=True)
    check_int("effective_batch", effective_batch, minimum=1, maximum=len(dataset))
    check_int("micro_batch", micro_batch, minimum=1, maximum=effective_batch)
    if effective_batch % micro_batch:
        raise ValueError(
            f"micro_batch must divide the effective batch ({effective_batch}), got {micro_batch}; try one "
            f"of {[d for d in range(1, effective_batch + 1) if effective_batch % d == 0]}"
        )
    k = effective_batch // micro_batch
    net = build_model(model, in_shape=tuple(dataset[0][0].shape), seed=seed)
    first = default_collate([dataset[i] for i in range(effective_batch)])
    memory = profile_accumulation(net, first, k)
    history = train(
        net,
        dataset,
        batch_size=effective_batch,
        steps=steps,
        accumulation_steps=k,
        lr=lr,
        seed=seed,
        progress=False,
        label=f"{k} x {micro_batch}" if k > 1 else f"batch {effective_batch}",
    )
    return {
        "micro_batch": micro_batch,
        "accumulation_steps": k,
        "effective_batch": effective_batch,
        "peak_bytes": memory.peak_bytes,
        "memory": memory,
        "loss": list(history.loss),
        "seconds": history.seconds[-1],
        "history": history,
    }
