"""Data parallelism over processes with ``torch.distributed`` (chapter 7).

Two pieces, each small enough to read in one go (the processes themselves are started by
:func:`batchlab.processes.launch`):

* :func:`global_batch_order` asks ``DistributedSampler`` which samples each process gets, and lists
  them in the order of the *global* batches, so that one process can replay exactly what the group saw;
  :func:`plot_sampler` draws that assignment.
* :func:`train_process` is the code every process runs: ``DistributedSampler``, ``DistributedDataParallel``,
  gradient accumulation with ``no_sync``, and :class:`CommStats` counting the gradient all-reduces.
  :func:`train_ddp` runs it under :func:`~batchlab.processes.launch`; the script ``python -m batchlab.ddp_train``
  runs the same function under ``torchrun``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from .models import MODEL_NAMES, build_model
from .processes import launch
from .steps import check_optimizer, make_optimizer, train_step
from .training import History
from .validation import check_bool, check_choice, check_dataset, check_float, check_int, check_seed

# -- which samples each process gets --------------------------------------------------------------


def samples_per_process(n: int, world_size: int, drop_last: bool = False) -> int:
    """How many samples ``DistributedSampler`` gives each process per epoch: the data padded up to a
    multiple of ``world_size`` by repeating samples, or cut down to one with ``drop_last``."""
    return n // world_size if drop_last else math.ceil(n / world_size)


def sampler_assignment(
    n: int, world_size: int, *, epoch: int = 0, shuffle: bool = True, seed: int = 0, drop_last: bool = False
) -> list:
    """For each rank, the indices that ``DistributedSampler`` gives it in ``epoch``, over ``n`` samples."""
    assignment = []
    for rank in range(world_size):
        sampler = DistributedSampler(
            range(n), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        sampler.set_epoch(epoch)  # what a training loop must call at the start of every epoch
        assignment.append(list(sampler))
    return assignment


def global_batch_order(
    n: int, *, world_size: int, batch_size: int, steps: int, seed: int = 0, drop_last: bool = False
) -> list:
    """The sample indices that DDP training over ``n`` samples uses, in the order of its global batches.

    Step *k* of :func:`train_ddp` (global batch ``batch_size``) trains on
    ``order[k * batch_size:(k + 1) * batch_size]``: each process's *k*-th local batch from its
    ``DistributedSampler`` (seeded with ``seed``, ``set_epoch`` at every epoch), rank after rank.
    Training one process on ``Subset(dataset, order)`` without shuffling replays the same batches.
    """
    local = batch_size // world_size
    order, epoch = [], 0
    while len(order) < steps * batch_size:
        per_rank = sampler_assignment(n, world_size, epoch=epoch, seed=seed, drop_last=drop_last)
        for start in range(0, len(per_rank[0]) - local + 1, local):  # full local batches only (drop_last)
            for indices in per_rank:
                order.extend(indices[start : start + local])
        epoch += 1
    return order[: steps * batch_size]


def plot_sampler(
    n: int, world_size: int, *, epochs=(0, 1), shuffle: bool = True, seed: int = 0, drop_last: bool = False
):
    """Which sample each rank gets in each of ``epochs``: one row per epoch, one colour per rank.

    Hatched boxes are padding: samples that ``DistributedSampler`` repeats so that every rank gets
    the same number (``drop_last=True`` cuts the data instead). Returns a matplotlib ``Figure``.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    per_rank = samples_per_process(n, world_size, drop_last)
    fig = Figure(figsize=(0.42 * world_size * (per_rank + 1) + 1, 0.55 * len(epochs) + 0.9), layout="constrained")
    ax = fig.subplots()
    colours = [f"C{rank % 10}" for rank in range(world_size)]
    for row, epoch in enumerate(epochs):
        for rank, indices in enumerate(
            sampler_assignment(n, world_size, epoch=epoch, shuffle=shuffle, seed=seed, drop_last=drop_last)
        ):
            for j, index in enumerate(indices):
                x = rank * (per_rank + 1) + j
                padded = rank + j * world_size >= n  # positions past the end of the data are repeats
                ax.add_patch(
                    Rectangle(
                        (x, -row - 0.4),
                        0.9,
                        0.8,
                        facecolor=colours[rank],
                        edgecolor="black",
                        alpha=0.35 if padded else 0.8,
                        hatch="///" if padded else None,
                        linewidth=0.5,
                    )
                )
                ax.text(x + 0.45, -row, str(index), ha="center", va="center", fontsize=8)
    ax.set_xlim(-0.2, world_size * (per_rank + 1) - 0.8)
    ax.set_ylim(-len(epochs) + 0.45, 0.6)
    ax.set_yticks([-row for row in range(len(epochs))], [f"epoch {e}" for e in epochs])
    ax.set_xticks(
        [rank * (per_rank + 1) + (per_rank - 1) / 2 for rank in range(world_size)],
        [f"rank {rank}" for rank in range(world_size)],
    )
    ax.tick_params(length=0)
    ax.set_frame_on(False)
    ax.set_title(
        f"DistributedSampler: {n} samples over {world_size} processes\n"
        f"shuffle={shuffle}, drop_last={drop_last}; hatched: repeated to pad",
        fontsize=9,
    )
    return fig


# -- counting the gradient all-reduces ------------------------------------------------------------


@dataclass
class CommStats:
    """Gradient all-reduces seen by one process: how many calls, how many bytes, the seconds from
    starting each one to its result arriving (which includes waiting for the slowest process), and the
    bytes of each call in order (``buckets``: one entry per DDP bucket all-reduced)."""

    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0
    buckets: list = field(default_factory=list)


def counting_allreduce_hook(stats, bucket):
    """A DDP communication hook: PyTorch's default all-reduce of ``bucket``, counted and timed in ``stats``
    (a :class:`CommStats`). Unannotated on purpose: DDP checks hook annotations, and this module's
    ``from __future__ import annotations`` would turn them into strings."""
    nbytes = bucket.buffer().numel() * bucket.buffer().element_size()
    stats.calls += 1
    stats.bytes += nbytes
    stats.buckets.append(nbytes)
    start = time.perf_counter()

    def done(future):
        stats.seconds += time.perf_counter() - start
        return future.value()

    return allreduce_hook(None, bucket).then(done)  # None: the default (whole) process group


# -- training ---------------------------------------------------------------------------------------


def _num_classes(dataset) -> int:
    base = getattr(dataset, "dataset", dataset)  # a Subset keeps the classes on the data set it wraps
    return len(getattr(dataset, "classes", None) or getattr(base, "classes", None) or range(10))


def _check_ddp_args(model_name, dataset, world_size, batch_size, steps, accumulation_steps, drop_last):
    """Check everything that can be checked before a process starts; return the per-process batch."""
    check_choice("model_name", model_name, MODEL_NAMES)
    check_dataset(dataset)
    check_int("world_size", world_size, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    check_int("steps", steps, minimum=1)
    check_int("accumulation_steps", accumulation_steps, minimum=1)
    if not isinstance(drop_last, bool):
        raise TypeError(f"drop_last must be True or False, got {drop_last!r}")
    n = len(dataset)
    if world_size > n:
        raise ValueError(f"world_size={world_size} is more processes than the {n} samples of the data set can feed")
    per_step = world_size * accumulation_steps
    if batch_size % per_step:
        raise ValueError(
            f"batch_size must split into world_size x accumulation_steps = {per_step} equal "
            f"micro-batches, got {batch_size}; try a multiple of {per_step}, such as "
            f"{max(per_step, batch_size // per_step * per_step)}"
        )
    local = batch_size // world_size
    if samples_per_process(n, world_size, drop_last) < local:
        raise ValueError(
            f"each of the {world_size} processes gets {samples_per_process(n, world_size, drop_last)} "
            f"samples per epoch but needs {local} per step (batch_size {batch_size} / world_size "
            f"{world_size}): use a smaller batch_size or fewer processes"
        )
    return local


def train_ddp(
    model_name: str,
    dataset,
    *,
    world_size: int = 2,
    batch_size: int,
    steps: int,
    optimizer="sgd",
    lr: float = 0.05,
    accumulation_steps: int = 1,
    seed: int = 0,
    drop_last: bool = False,
    no_sync: bool = True,
    timeout: float | None = 300.0,
    progress: bool = True,
) -> dict:
    """Train ``build_model(model_name)`` with DistributedDataParallel in ``world_size`` processes.

    ``batch_size`` is the global effective batch: each process takes ``batch_size / world_size``
    samples per step from its ``DistributedSampler``, in ``accumulation_steps`` micro-batches. With
    ``no_sync=False`` DDP all-reduces the gradients after every micro-batch instead of once per step
    (same result, more communication). The optimizer (``"sgd"``, ``"adam"`` or a function) is built as
    :func:`batchlab.train` builds it. Returns rank 0's results, a dict with:

    ``state_dict`` (final weights, CPU tensors), ``loss`` (the mean loss over each global batch),
    ``history`` (a :class:`History` of it, for ``plot_histories``), ``comm`` (rank 0's gradient
    all-reduces: ``calls``, ``bytes``, ``seconds``), ``per_process_batch``, ``micro_batch``, ``seconds``.
    ``progress`` draws :func:`launch`'s bar over the wait.
    """
    _check_ddp_args(model_name, dataset, world_size, batch_size, steps, accumulation_steps, drop_last)
    check_optimizer(optimizer)  # refuses a bad optimizer before anything starts
    check_float("lr", lr)
    check_seed("seed", seed)
    check_bool("no_sync", no_sync)
    config = dict(
        batch_size=batch_size,
        steps=steps,
        optimizer=optimizer,
        lr=lr,
        seed=seed,
        accumulation_steps=accumulation_steps,
        drop_last=drop_last,
        no_sync=no_sync,
    )
    check_bool("progress", progress)
    return launch(_train_and_report, model_name, dataset, config, nprocs=world_size, timeout=timeout, progress=progress)


def _train_and_report(rank, world_size, model_name, dataset, config):
    """:func:`train_process` on this rank's device; the weights come back as CPU tensors."""
    device = f"cuda:{rank}" if dist.get_backend() == "nccl" else "cpu"
    result = train_process(rank, world_size, model_name, dataset, device=device, **config)
    result["state_dict"] = {k: v.detach().cpu() for k, v in result["state_dict"].items()}
    return result


def train_process(
    rank: int,
    world_size: int,
    model_name: str,
    dataset,
    *,
    batch_size: int,
    steps: int,
    optimizer="sgd",
    lr: float = 0.05,
    accumulation_steps: int = 1,
    seed: int = 0,
    drop_last: bool = False,
    no_sync: bool = True,
    device="cpu",
) -> dict:
    """The training loop that every process runs, in a process group that is already set up.

    Used by :func:`train_ddp` (processes from :func:`launch`) and by ``batchlab.ddp_train`` (processes
    from ``torchrun``); arguments as in :func:`train_ddp`. Every process returns the same dict.
    """
    local = _check_ddp_args(model_name, dataset, world_size, batch_size, steps, accumulation_steps, drop_last)
    torch.manual_seed(seed)  # the same global random state in every process
    model = build_model(
        model_name, in_shape=tuple(dataset[0][0].shape), num_classes=_num_classes(dataset), seed=seed
    ).to(device)
    # DDP copies rank 0's weights to every process, then averages gradients over processes during backward.
    # gradient_as_bucket_view: .grad lives inside DDP's communication buffers instead of beside them.
    ddp = DistributedDataParallel(model, device_ids=[device] if device != "cpu" else None, gradient_as_bucket_view=True)
    comm = CommStats()
    ddp.register_comm_hook(comm, counting_allreduce_hook)  # the default all-reduce, counted
    opt = make_optimizer(optimizer, ddp.parameters(), lr=lr)
    # Each process sees its own 1/world_size share of a permutation that is the same in every process.
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=drop_last
    )
    loader = DataLoader(dataset, batch_size=local, sampler=sampler, drop_last=True)  # equal steps everywhere
    losses, seconds = _run_steps(ddp, loader, sampler, opt, steps, accumulation_steps, no_sync, device)
    # One collective at the end instead of one per step: each process's mean loss over its share,
    # averaged over the (equal-sized) shares, is the mean loss over the global batch.
    global_loss = torch.tensor(losses, dtype=torch.float64, device=device)
    dist.all_reduce(global_loss)
    loss = (global_loss / world_size).tolist()
    history = History(
        f"DDP {world_size} x {local // accumulation_steps} x {accumulation_steps}",
        batch_size,
        loss=loss,
        samples=[batch_size * (i + 1) for i in range(steps)],
        seconds=seconds,
    )
    return dict(
        state_dict=model.state_dict(),
        loss=loss,
        history=history,
        comm=asdict(comm),
        per_process_batch=local,
        micro_batch=local // accumulation_steps,
        seconds=seconds[-1],
    )


def _run_steps(ddp, loader, sampler, opt, steps, accumulation_steps, no_sync, device):
    """The loop itself; returns this process's loss per step and the seconds after each step."""
    losses, seconds, start, epoch = [], [], time.perf_counter(), 0
    while len(losses) < steps:
        sampler.set_epoch(epoch)  # a new permutation each epoch, the same one in every process
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            # batchlab's one training step, on this process's share of the global batch. Its micro-batch
            # weights (their shares of the local batch, here equal) give the local mean loss; DDP's
            # all-reduce averages the equal-sized processes' gradients, so every process applies the
            # gradient of the mean over the global batch and the weights stay identical. no_sync keeps
            # every micro-batch's gradients local but the last's, whose backward all-reduces their sum.
            losses.append(
                train_step(
                    ddp,
                    opt,
                    inputs,
                    targets,
                    accumulation_steps=accumulation_steps,
                    no_sync=ddp.no_sync if no_sync else None,
                )
            )
            seconds.append(time.perf_counter() - start)
            if len(losses) == steps:
                break
        epoch += 1
    return losses, seconds
