"""From samples to batches, by hand and with ``DataLoader`` workers (chapter 3).

* :func:`iter_batches` - the batching loop a learner would write: shuffle the indices, slice them into
  batches, fetch every sample (so per-sample transforms see samples), collate, keep or drop the last
  partial batch. Chapter 3 proves it yields the same batches as ``torch.utils.data.DataLoader``.
* :func:`collate` - ``default_collate`` with an error that names the field and the shapes that differ.
* :func:`loader_throughput` / :func:`loader_sweep` - samples per second, time to the first batch and
  how busy the main process is, for one ``DataLoader`` configuration or a grid of them.
* :func:`shapes_image_folder` - a CPU-heavy data set for those measurements: PNG files on disk,
  decoded and augmented by a ``torchvision.transforms.v2`` pipeline in every ``__getitem__``.
* The pitfalls of workers: :class:`SharedGeneratorDataset` and :func:`seed_worker` (random numbers),
  :class:`LookupTable` and :func:`worker_memory` (copy-on-access of Python objects).
* The exercises: :func:`token_sequences` and :func:`check_padding_collate` (a padding ``collate_fn``),
  :func:`check_best_num_workers` (reading your own measurements) and :func:`check_persistent_prediction`
  (what persistent workers do to a generator the data set owns).

Every data set and function here lives in an importable module, so ``DataLoader`` workers can find
them on platforms that *spawn* workers (macOS, Windows) as well as where they fork (Linux).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info
from torch.utils.data import default_collate as torch_default_collate

from .datasets import shapes, write_image_folder
from .torch_internals import has_workers, shutdown_workers
from .validation import check_int

# ----------------------------------------------------------------------------------------------------
# Manual batching


def iter_batches(dataset, batch_size: int, *, shuffle: bool = False, drop_last: bool = False, seed: int = 0,
                 collate_fn=None):
    """Yield batches of ``dataset`` the way ``DataLoader(num_workers=0)`` does, written out by hand.

    ``shuffle`` uses the permutation ``torch.randperm(len(dataset), generator=Generator().manual_seed(seed))``,
    the order that ``DataLoader(sampler=RandomSampler(dataset, generator=that generator))`` visits.
    ``drop_last`` skips a last batch smaller than ``batch_size``. ``collate_fn`` turns a list of
    samples into a batch (default: :func:`collate`, i.e. ``default_collate``). Arguments are checked
    when the function is called, before the first batch is asked for.
    """
    _check_dataset(dataset)
    check_int("batch_size", batch_size, minimum=1)
    check_int("seed", seed, minimum=0)
    _check_bool("shuffle", shuffle)
    _check_bool("drop_last", drop_last)
    if collate_fn is not None and not callable(collate_fn):
        raise TypeError(f"collate_fn must be a function from a list of samples to a batch, got {collate_fn!r}")
    return batch_loop(dataset, batch_size, shuffle, drop_last, seed, collate_fn or collate)


def batch_loop(dataset, batch_size, shuffle, drop_last, seed, collate_fn):
    """The loop of :func:`iter_batches`, without its argument checks: the code chapter 3 shows."""
    n = len(dataset)
    if shuffle:  # one permutation of all indices per pass, from its own seeded generator
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    else:
        order = list(range(n))
    for start in range(0, n, batch_size):
        indices = order[start:start + batch_size]  # the last slice may be shorter ...
        if drop_last and len(indices) < batch_size:
            return  # ... and drop_last skips it
        samples = [dataset[i] for i in indices]  # one sample at a time: per-sample transforms apply here
        yield collate_fn(samples)  # list of (x, y) -> (stacked x, tensor of y)


def collate(samples):
    """``torch.utils.data.default_collate``, with an error that says which field could not be stacked.

    ``default_collate`` stacks tensors of one shape; when the samples disagree its message does not say
    where. This raises ``ValueError`` naming the field (``[0]`` is the first element of each sample)
    and the shapes or types found, with the position in ``samples`` of the first sample of each.
    """
    try:
        return torch_default_collate(samples)
    except (RuntimeError, TypeError) as error:
        problem = collate_problem(samples)
        if problem is None:
            raise
        raise ValueError(f"cannot collate {len(samples)} samples into a batch: {problem}") from error


def collate_problem(samples) -> str | None:
    """Describe why ``samples`` cannot be stacked into one batch (which field, which shapes), or None."""
    return _mismatch(list(samples), "")


def _mismatch(items, where):
    label = f"field {where}" if where else "the samples"
    kinds = {}
    for i, item in enumerate(items):
        kind = "tensor" if isinstance(item, torch.Tensor) else type(item).__name__
        kinds.setdefault(kind, i)
    if len(kinds) > 1 and not set(kinds) <= {"int", "float", "bool"}:
        found = "; ".join(f"samples[{i}] has a {kind}" for kind, i in kinds.items())
        return f"{label} mixes types: {found}"
    first = items[0]
    if isinstance(first, torch.Tensor):
        shapes_seen = {}
        for i, item in enumerate(items):
            shapes_seen.setdefault(tuple(item.shape), i)
        if len(shapes_seen) > 1:
            found = "; ".join(f"samples[{i}] has shape {shape}" for shape, i in list(shapes_seen.items())[:4])
            return (f"{label} has tensors of different shapes ({found}). Resize or crop them to one size, "
                    "or pass a collate_fn that pads them")
        return None
    if isinstance(first, dict):
        keys = {tuple(sorted(map(str, item))) for item in items}
        if len(keys) > 1:
            return f"{label} has dicts with different keys: {sorted(keys)}"
        for key in first:
            problem = _mismatch([item[key] for item in items], f"{where}[{key!r}]")
            if problem:
                return problem
        return None
    if isinstance(first, (tuple, list)):
        lengths = {len(item) for item in items}
        if len(lengths) > 1:
            return f"{label} has sequences of different lengths {sorted(lengths)}"
        for j in range(len(first)):
            problem = _mismatch([item[j] for item in items], f"{where}[{j}]")
            if problem:
                return problem
    return None


# ----------------------------------------------------------------------------------------------------
# Measuring loaders


@dataclass(frozen=True)
class LoaderStats:
    """What :func:`loader_throughput` measured for one loader configuration, one entry per repeat.

    * ``runs_samples_per_second``: samples delivered per second after the warm-up batches.
    * ``runs_first_batch_seconds``: seconds from asking for an iterator to holding the first batch
      (worker start-up included).
    * ``runs_busy_fraction``: CPU seconds of the main process (all its threads) per wall-clock second
      in the timed part: about 1 when the main process does the loading itself, near 0 when it only
      waits for workers (it can exceed 1 when torch uses several threads).
    * ``warnings``: what ``DataLoader`` warned about (e.g. more workers than cores).

    The properties give medians over the repeats.
    """

    loader: str
    batch_size: int
    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    prefetch_factor: int | None = None
    runs_samples_per_second: tuple = ()
    runs_first_batch_seconds: tuple = ()
    runs_busy_fraction: tuple = ()
    warnings: tuple = field(default=(), compare=False)

    @property
    def samples_per_second(self) -> float:
        return statistics.median(self.runs_samples_per_second)

    @property
    def first_batch_seconds(self) -> float:
        return statistics.median(self.runs_first_batch_seconds)

    @property
    def busy_fraction(self) -> float:
        return statistics.median(self.runs_busy_fraction)

    @property
    def setting(self) -> str:
        """The configuration, as it would be written in code."""
        if self.loader == "iter_batches":
            return f"iter_batches(batch_size={self.batch_size})"
        extra = "".join([", pin_memory=True" * self.pin_memory, ", persistent_workers=True" * self.persistent_workers,
                         f", prefetch_factor={self.prefetch_factor}" * (self.prefetch_factor is not None)])
        return f"DataLoader(batch_size={self.batch_size}, num_workers={self.num_workers}{extra})"

    def __str__(self) -> str:
        return (f"{self.setting}: {self.samples_per_second:,.0f} samples/s (median of "
                f"{len(self.runs_samples_per_second)}), first batch after {self.first_batch_seconds:.2f} s, "
                f"main process busy {self.busy_fraction:.0%}")

    def merged(self, other: LoaderStats) -> LoaderStats:
        """These runs and ``other``'s runs of the same configuration together."""
        if (self.loader, self.batch_size, self.num_workers) != (other.loader, other.batch_size, other.num_workers):
            raise ValueError(f"cannot merge the runs of {self.setting} and {other.setting}")
        return replace(self, runs_samples_per_second=self.runs_samples_per_second + other.runs_samples_per_second,
                       runs_first_batch_seconds=self.runs_first_batch_seconds + other.runs_first_batch_seconds,
                       runs_busy_fraction=self.runs_busy_fraction + other.runs_busy_fraction,
                       warnings=tuple(dict.fromkeys(self.warnings + other.warnings)))


def loader_throughput(dataset, *, batch_size: int, num_workers: int = 0, pin_memory: bool = False,
                      persistent_workers: bool = False, prefetch_factor: int | None = None, batches: int = 50,
                      warmup: int = 5, repeats: int = 3, seed: int = 0, collate_fn=None) -> LoaderStats:
    """Measure one ``DataLoader`` configuration over ``dataset`` (chapter 3).

    Each of ``repeats`` runs asks the loader for a fresh iterator (an epoch: shuffled, ``drop_last``),
    takes ``warmup`` batches untimed, then times ``batches`` more. Only fetching is timed: the loop
    does nothing with a batch, so this is the most a training loop could get from this loader. With
    ``persistent_workers`` every run also reads the rest of its epoch, untimed, so that the next run's
    time to the first batch is that of a new epoch on idle workers.

    Everything is checked before a worker starts: the arguments, that the data set has
    ``(warmup + batches) * batch_size`` samples, and that its first ``batch_size`` samples collate.
    Workers are shut down when the function returns, fails or is interrupted (Ctrl-C).
    Randomness in the data set's transforms is seeded from ``seed``; the global random state is left
    as it was.

    While it measures, torch in the main process uses one thread, as ``DataLoader`` makes each worker
    do, so that 0 and N workers do the same work per sample. (Per-image operations gain little from
    several threads, and when other programs keep the cores busy, threads that wait for each other
    can make them many times slower.)
    """
    _check_loader_args(dataset, batch_size, num_workers, pin_memory, persistent_workers, prefetch_factor,
                       batches, warmup, repeats, seed, collate_fn)
    collate_fn = collate_fn or collate
    stats = LoaderStats("DataLoader", batch_size, num_workers, pin_memory, persistent_workers, prefetch_factor)
    with torch.random.fork_rng(devices=[]), one_thread(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        collate_fn([dataset[i] for i in range(batch_size)])  # un-collatable samples fail here, not in a worker
        torch.manual_seed(seed)  # transforms in the main process (num_workers=0) draw from this
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(seed), num_workers=num_workers,
                            pin_memory=pin_memory, persistent_workers=persistent_workers,
                            prefetch_factor=prefetch_factor, collate_fn=collate_fn)
        iterator = None
        try:
            for _ in range(repeats):
                start = time.perf_counter(), time.process_time()
                with frozen_gc():  # see frozen_gc: workers then copy less of this process's memory
                    iterator = iter(loader)  # workers start here (once only with persistent_workers)
                stats = stats.merged(_time_batches(iterator, start, stats, batches, warmup))
                if persistent_workers:
                    for _ in iterator:  # finish the epoch (untimed), as training would: the next one
                        pass  # then starts from idle workers instead of waiting for this one's leftovers
                else:
                    stop_workers(iterator)
        finally:
            stop_workers(iterator)  # also after an error or Ctrl-C: no worker is left behind
    messages = tuple(dict.fromkeys(str(w.message).strip() for w in caught))
    return replace(stats, warnings=messages)


def iter_batches_throughput(dataset, *, batch_size: int, batches: int = 50, warmup: int = 5, repeats: int = 3,
                            seed: int = 0, collate_fn=None) -> LoaderStats:
    """Measure :func:`iter_batches` (shuffled, ``drop_last``) exactly as :func:`loader_throughput` measures a loader."""
    _check_loader_args(dataset, batch_size, 0, False, False, None, batches, warmup, repeats, seed, collate_fn)
    stats = LoaderStats("iter_batches", batch_size)
    with torch.random.fork_rng(devices=[]), one_thread():
        torch.manual_seed(seed)
        for _ in range(repeats):
            start = time.perf_counter(), time.process_time()
            iterator = iter_batches(dataset, batch_size, shuffle=True, drop_last=True, seed=seed,
                                    collate_fn=collate_fn)
            stats = stats.merged(_time_batches(iterator, start, stats, batches, warmup))
    return stats


def _time_batches(iterator, start, stats, batches, warmup):
    """Take ``warmup`` batches, then time ``batches`` more; ``start``: (wall, cpu) clocks before ``iter()``."""
    next(iterator)
    first = time.perf_counter() - start[0]
    for _ in range(warmup - 1):
        next(iterator)
    # with warmup=0 the first batch (and the workers' start-up) is part of the timed window
    wall, cpu = (time.perf_counter(), time.process_time()) if warmup else start
    for _ in range(batches if warmup else batches - 1):
        next(iterator)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return replace(stats, runs_samples_per_second=(batches * stats.batch_size / wall,),
                   runs_first_batch_seconds=(first,), runs_busy_fraction=(cpu / wall,))


@contextlib.contextmanager
def one_thread():
    """Run the block with ``torch.set_num_threads(1)`` (what every DataLoader worker uses), then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def frozen_gc():
    """Hide this process's objects from the garbage collector of worker processes forked in the block.

    A forked worker shares memory pages with its parent until one of them writes to a page. The
    worker's garbage collector writes to every object it examines, so its first full collection would
    copy pages holding the parent's objects into the worker. ``gc.freeze()`` moves them into a
    generation the collector skips; the worker keeps that state, and the parent is unfrozen afterwards.
    """
    if gc.get_freeze_count():  # the caller froze objects already: leave their choice alone
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def stop_workers(iterator) -> None:
    """Shut down the worker processes of a ``DataLoader`` iterator now, and wait for them to exit.

    ``DataLoader`` stops its workers when its iterator is garbage-collected, but after an exception
    the traceback keeps the iterator alive, so the workers would linger. This calls the iterator's
    private ``_shutdown_workers`` (through :mod:`batchlab.torch_internals`, whose tests fail loudly if
    torch renames it). Does nothing for ``None`` or a single-process iterator.
    """
    if iterator is not None and has_workers(iterator):
        shutdown_workers(iterator)


def _check_loader_args(dataset, batch_size, num_workers, pin_memory, persistent_workers, prefetch_factor,
                       batches, warmup, repeats, seed, collate_fn):
    _check_dataset(dataset)
    check_int("batch_size", batch_size, minimum=1)
    check_int("num_workers", num_workers, minimum=0)
    _check_bool("pin_memory", pin_memory)
    _check_bool("persistent_workers", persistent_workers)
    if prefetch_factor is not None:
        check_int("prefetch_factor", prefetch_factor, minimum=1)
        if num_workers == 0:
            raise ValueError(f"prefetch_factor={prefetch_factor} needs num_workers > 0 (it is the number of "
                             "batches each worker prepares ahead); use prefetch_factor=None with num_workers=0")
    if persistent_workers and num_workers == 0:
        raise ValueError("persistent_workers=True needs num_workers > 0 (it keeps the worker processes "
                         "alive between epochs); use persistent_workers=False with num_workers=0")
    check_int("batches", batches, minimum=1)
    check_int("warmup", warmup, minimum=0)
    check_int("repeats", repeats, minimum=1)
    check_int("seed", seed, minimum=0)
    if collate_fn is not None and not callable(collate_fn):
        raise TypeError(f"collate_fn must be a function from a list of samples to a batch, got {collate_fn!r}")
    needed = (warmup + batches) * batch_size
    if len(dataset) < needed:
        raise ValueError(f"dataset has {len(dataset)} samples, but (warmup + batches) * batch_size = "
                         f"({warmup} + {batches}) * {batch_size} = {needed} are needed per run; "
                         "use a larger data set or fewer batches")


def _check_dataset(dataset):
    if not isinstance(dataset, Dataset) or not hasattr(dataset, "__len__"):
        raise TypeError(f"dataset must be a map-style torch Dataset with a length, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty: there is nothing to batch")


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


@dataclass
class LoaderSweep:
    """The results of :func:`loader_sweep`: one :class:`LoaderStats` per (batch_size, num_workers).

    ``str()`` gives a table; :meth:`figure` plots samples per second against ``num_workers``, one
    line per batch size, with the usable CPU cores marked.
    """

    stats: list
    cores: int

    def table(self) -> str:
        lines = [f"{'batch size':>10} {'workers':>7} {'samples/s':>10} {'first batch':>11} {'main busy':>9}"]
        for s in sorted(self.stats, key=lambda s: (s.batch_size, s.num_workers)):
            lines.append(f"{s.batch_size:>10} {s.num_workers:>7} {s.samples_per_second:>10,.0f} "
                         f"{s.first_batch_seconds:>10.2f}s {s.busy_fraction:>9.0%}")
        return "\n".join(lines)

    __str__ = table

    def speedup(self, num_workers: int, *, batch_size: int | None = None, baseline: int = 0) -> float:
        """Samples per second with ``num_workers`` divided by that with ``baseline`` workers."""
        def rate(workers):
            for s in self.stats:
                if s.num_workers == workers and batch_size in (None, s.batch_size):
                    return s.samples_per_second
            raise ValueError(f"the sweep has no run with num_workers={workers}, batch_size={batch_size}")
        return rate(num_workers) / rate(baseline)

    def figure(self, *, highlight: tuple | None = None):
        """Throughput against ``num_workers``, one line per batch size (a matplotlib ``Figure``).

        ``highlight=(batch_size, num_workers)`` rings that point (the widget's current setting).
        """
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 3.6), layout="constrained")
        ax = fig.subplots()
        for size in sorted({s.batch_size for s in self.stats}):
            runs = sorted((s for s in self.stats if s.batch_size == size), key=lambda s: s.num_workers)
            ax.plot([s.num_workers for s in runs], [s.samples_per_second for s in runs], "o-",
                    label=f"batch size {size}")
            if highlight is not None and highlight[0] == size:
                for s in runs:
                    if s.num_workers == highlight[1]:
                        ax.plot([s.num_workers], [s.samples_per_second], "o", markersize=14,
                                markerfacecolor="none", markeredgecolor="black")
        ax.axvline(self.cores, color="grey", linestyle=":", label=f"{self.cores} usable CPU cores")
        ax.set_xlabel("num_workers")
        ax.set_ylabel("samples per second")
        ax.set_ylim(bottom=0)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        return fig


def loader_sweep(dataset, *, num_workers=(0, 1, 2), batch_size=(32,), repeats: int = 3, **options) -> LoaderSweep:
    """Run :func:`loader_throughput` for every ``batch_size`` x ``num_workers`` (chapter 3).

    The repeats are interleaved (all settings once, then all again, ...) so that a burst of load from
    another program on the machine spreads over every setting instead of spoiling one. ``options``
    go to :func:`loader_throughput` (``batches``, ``warmup``, ``pin_memory``, ...).
    """
    workers = _check_grid("num_workers", num_workers, minimum=0)
    sizes = _check_grid("batch_size", batch_size, minimum=1)
    check_int("repeats", repeats, minimum=1)
    for size in sizes:  # every argument is checked before the first worker starts
        _check_loader_args(dataset, size, max(workers), options.get("pin_memory", False),
                           options.get("persistent_workers", False), options.get("prefetch_factor"),
                           options.get("batches", 50), options.get("warmup", 5), 1, options.get("seed", 0),
                           options.get("collate_fn"))
    results = {}
    for _ in range(repeats):
        for size in sizes:
            for n in workers:
                run = loader_throughput(dataset, batch_size=size, num_workers=n, repeats=1, **options)
                results[size, n] = results[size, n].merged(run) if (size, n) in results else run
    return LoaderSweep(list(results.values()), usable_cores())


def _check_grid(name, values, *, minimum):
    values = (values,) if isinstance(values, int) else tuple(values)
    if not values:
        raise ValueError(f"{name} must be an int or a non-empty list of ints, got {values!r}")
    return tuple(check_int(name, v, minimum=minimum) for v in values)


def usable_cores() -> int:
    """The CPU cores this process may use: its CPU affinity, capped by a cgroup CPU quota (Binder, Docker).

    ``os.cpu_count()`` counts the cores of the whole machine, which on a shared server can be far more
    than a notebook is allowed to use. Both cgroup versions are read: v2's ``cpu.max`` and v1's
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota()
    return min(cores, max(1, math.ceil(quota))) if quota else cores


def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPU time per second the cgroup may use (e.g. 1.5 cores), or None when there is no quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------------
# A CPU-heavy data set: PNG files decoded and augmented in every __getitem__

SHAPES_FOLDER_SIZE = 1024


def shapes_image_folder(n: int = SHAPES_FOLDER_SIZE, image_size: int = 128, *, crop_size: int | None = None,
                        augment: bool = True, seed: int = 0, root=None):
    """Procedural shapes written as PNG files and read back with ``torchvision.datasets.ImageFolder``.

    Every ``__getitem__`` reads a file, decodes it (``ImageFolder``'s loader, with Pillow), turns it
    into a uint8 tensor and, with ``augment``, takes a random resized crop of ``crop_size`` pixels
    (default 7/8 of ``image_size``), flips it at random and jitters its colours; then converts to float
    and normalises with the per-channel mean and std of these files.
    That is real CPU work per sample, which is what ``DataLoader`` workers share (chapter 3).

    The files are written once, to ``root`` (default: ``$BATCHLAB_CACHE`` or the system temporary
    folder, under ``batchlab-cache/shapes-<n>-<image_size>px-seed<seed>``), and reused afterwards. The
    data set's ``mean`` and ``std`` attributes hold the statistics used by ``Normalize``.
    """
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    check_int("n", n, minimum=1)
    check_int("image_size", image_size, minimum=16)
    crop_size = image_size * 7 // 8 if crop_size is None else check_int("crop_size", crop_size, minimum=8,
                                                                        maximum=image_size)
    _check_bool("augment", augment)
    check_int("seed", seed, minimum=0)
    folder = Path(root) if root is not None else _cache_dir() / f"shapes-{n}-{image_size}px-seed{seed}"
    mean, std = _write_once(folder, lambda path: write_image_folder(shapes(n, image_size, seed=seed), path))
    # ImageFolder's default loader decodes with Pillow; ToImage turns the picture into a uint8 tensor
    steps = [v2.ToImage()]
    if augment:
        steps += [v2.RandomResizedCrop(crop_size, scale=(0.35, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                  v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3)]
    else:
        steps += [v2.CenterCrop(crop_size)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    dataset = ImageFolder(str(folder), transform=v2.Compose(steps))
    dataset.mean, dataset.std = mean, std
    return dataset


def _cache_dir() -> Path:
    return Path(os.environ.get("BATCHLAB_CACHE") or Path(tempfile.gettempdir()) / "batchlab-cache")


def _write_once(folder: Path, write) -> tuple[list, list]:
    """Write the folder with ``write(path)`` unless a complete copy exists; return its pixel mean and std.

    The files go to a private temporary folder that is renamed into place only when complete (with
    ``stats.json`` written last), so an interrupted run never leaves a half-written data set behind.
    """
    stats_file = folder / "stats.json"
    if not stats_file.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=folder.name + ".partial-", dir=folder.parent))
        try:
            with one_thread():  # small per-image operations: one thread is faster on a busy machine
                write(partial)
                (partial / "stats.json").write_text(json.dumps(_pixel_stats(partial)))
            try:
                partial.rename(folder)
            except OSError:  # another process finished first: use its copy
                if not stats_file.exists():
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    stats = json.loads(stats_file.read_text())
    return stats["mean"], stats["std"]


def _pixel_stats(folder: Path) -> dict:
    """Per-channel mean and std of all pixels of the PNG files in ``folder``, on the [0, 1] scale."""
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    count = 0
    from torchvision.datasets.folder import pil_loader
    from torchvision.transforms.v2.functional import pil_to_tensor

    for path in sorted(folder.glob("*/*.png")):
        pixels = pil_to_tensor(pil_loader(str(path))).double().div_(255).flatten(1)
        total += pixels.sum(1)
        squares += pixels.square().sum(1)
        count += pixels.shape[1]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    return {"mean": [round(v, 4) for v in mean.tolist()], "std": [round(v, 4) for v in std.tolist()]}


# ----------------------------------------------------------------------------------------------------
# Pitfalls of workers: random numbers and memory


class SharedGeneratorDataset(Dataset):
    """Item ``i`` is ``(i, r)`` with ``r`` drawn from a NumPy generator the data set creates in ``__init__``.

    The pitfall of chapter 3: every worker process gets a *copy* of that generator in the same state,
    so the workers draw the same "random" numbers, and (without persistent workers) every epoch
    repeats the previous one. Pass :func:`seed_worker` as ``worker_init_fn`` to fix it.
    """

    def __init__(self, n: int, seed: int = 0):
        self.n = check_int("n", n, minimum=1)
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return index, float(self.rng.random())


def seed_worker(worker_id: int) -> None:
    """A ``worker_init_fn`` that gives each worker's copy of the data set (its ``rng``) its own generator.

    ``torch.utils.data.get_worker_info().seed`` differs per worker and per epoch and is derived from
    the loader's ``generator``, so a loader built with ``generator=torch.Generator().manual_seed(s)``
    gives the same numbers on every run. (``DataLoader`` already seeds each worker's global torch,
    ``random`` and ``numpy.random`` generators; a generator the data set owns is the one it cannot see.)
    """
    info = get_worker_info()
    if info is not None and hasattr(info.dataset, "rng"):
        info.dataset.rng = np.random.default_rng(info.seed)


class LookupTable(Dataset):
    """Item ``i`` is the number ``i / n``, kept in a Python list (``"list"``) or a NumPy array (``"numpy"``).

    A list holds one Python object per number; reading an object updates its reference count, which
    writes to its memory page. In a forked worker that write makes the operating system copy the page
    (copy-on-write), so the worker slowly gets its own copy of everything it reads. A NumPy array is
    one buffer of raw numbers and reading it writes nothing (chapter 3, memory of workers).
    """

    def __init__(self, n: int, storage: str = "list"):
        check_int("n", n, minimum=1)
        if storage not in ("list", "numpy"):
            raise ValueError(f"storage must be 'list' or 'numpy', got {storage!r}")
        self.storage = storage
        values = np.arange(n, dtype=np.float64) / n
        self.values = values.tolist() if storage == "list" else values

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: int) -> float:
        return float(self.values[index])


def worker_memory(dataset, *, batch_size: int, num_workers: int = 2) -> list:
    """Read all of ``dataset`` once with a ``DataLoader`` and return the memory of each worker at the end.

    One dict per worker, in bytes: ``rss`` (resident pages, shared ones included), ``pss`` (shared
    pages divided among the processes that share them; Linux only, else None) and ``uss`` (pages only
    this worker holds: what it would free by exiting). Sampled while the last batch is in hand.
    """
    _check_dataset(dataset)
    check_int("batch_size", batch_size, minimum=1)
    check_int("num_workers", num_workers, minimum=1)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    others = {p.pid for p in psutil.Process().children()}  # processes that are not this loader's workers
    with frozen_gc():
        iterator = iter(loader)
    memory = []
    try:
        for index, _ in enumerate(iterator):
            if index == len(loader) - 1:  # every worker has done its share; none has exited yet
                for child in [p for p in psutil.Process().children() if p.pid not in others]:
                    info = child.memory_full_info()
                    memory.append({"rss": info.rss, "pss": getattr(info, "pss", None), "uss": info.uss})
    finally:
        stop_workers(iterator)
    return memory


def process_memory() -> dict:
    """Memory of this process, in bytes, with the same fields as :func:`worker_memory`."""
    info = psutil.Process().memory_full_info()
    return {"rss": info.rss, "pss": getattr(info, "pss", None), "uss": info.uss}


# ----------------------------------------------------------------------------------------------------
# Exercise: a collate_fn that pads variable-length sequences

PAD = 0  # the token id used for padding; real tokens are 1 .. vocab - 1


class TokenSequences(Dataset):
    """Item ``i`` is ``(tokens, label)``: a 1-D int64 tensor of 1..``max_length`` token ids (never 0) and 0 or 1.

    The label says whether the sequence is longer than half of ``max_length``. Lengths differ from
    item to item, so ``default_collate`` cannot stack them: this is the data set of the exercise.
    """

    def __init__(self, n: int, max_length: int, vocab: int, seed: int):
        self.n, self.max_length, self.vocab, self.seed = n, max_length, vocab, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} is out of range for a data set of {self.n} items")
        rng = np.random.default_rng([self.seed, index])
        length = int(rng.integers(1, self.max_length + 1))
        tokens = torch.from_numpy(rng.integers(1, self.vocab, size=length))
        return tokens, int(2 * length > self.max_length)


def token_sequences(n: int = 100, *, max_length: int = 12, vocab: int = 50, seed: int = 0) -> TokenSequences:
    """A data set of ``n`` variable-length token sequences for the padding exercise (see :class:`TokenSequences`)."""
    check_int("n", n, minimum=1)
    check_int("max_length", max_length, minimum=1)
    check_int("vocab", vocab, minimum=2)
    check_int("seed", seed, minimum=0)
    return TokenSequences(n, max_length, vocab, seed)


def check_padding_collate(collate_fn) -> None:
    """Check a learner's padding ``collate_fn`` (the chapter 3 exercise), as the other ``check_...`` helpers do.

    ``None`` (the notebook's placeholder) prints the task; a wrong function raises ``AssertionError``
    saying which case failed and what was expected; a right one prints what was checked.

    The function receives a list of ``(tokens, label)`` samples, ``tokens`` a 1-D int64 tensor of any
    length, and must return ``(padded, mask, labels)``:

    * ``padded``: int64, shape (batch, longest sequence *in this batch*), each row the sequence
      followed by ``PAD`` (0) tokens;
    * ``mask``: bool, same shape, True at real tokens and False at padding;
    * ``labels``: int64, shape (batch,).

    Checks a mixed batch, a batch of one, a batch that needs no padding, and every batch of a
    ``DataLoader`` that uses the function.
    """
    if collate_fn is None:
        print("Your turn: write pad_collate(samples) -> (padded, mask, labels) and pass the function here.")
        return
    if not callable(collate_fn):
        raise TypeError(f"collate_fn must be a function from a list of samples to a batch, got {collate_fn!r}")
    data = token_sequences(40, max_length=9, seed=3)
    cases = [("a batch of sequences of different lengths", [data[i] for i in range(8)]),
             ("a batch of one sequence", [data[5]]),
             ("a batch whose sequences all have the same length", _same_length(data))]
    for name, samples in cases:
        problem = _padding_problem(collate_fn, samples)
        assert problem is None, f"{name}: {problem}"
    loader = DataLoader(data, batch_size=6, collate_fn=collate_fn)
    try:
        batches = list(loader)
    except Exception as error:  # the learner's code: say what happened, as an AssertionError
        raise AssertionError(f"in a DataLoader, it raised {type(error).__name__}: {error}") from error
    for number, (batch, samples) in enumerate(zip(batches, iter_batches(data, 6, collate_fn=list))):
        problem = _padding_problem(lambda _, b=batch: b, samples)
        assert problem is None, f"batch {number} of DataLoader(data, batch_size=6, collate_fn=...): {problem}"
    print("Correct:\n" + "\n".join(f"  ✓ {name}" for name, _ in cases)
          + f"\n  ✓ all {len(batches)} batches of a DataLoader over {len(data)} sequences, each padded to "
          "its own longest")


def _same_length(data):
    by_length = {}
    for i in range(len(data)):
        tokens, label = data[i]
        by_length.setdefault(len(tokens), []).append((tokens, label))
    return max(by_length.values(), key=len)[:3]


def _padding_problem(collate_fn, samples) -> str | None:
    """What is wrong with ``collate_fn(samples)`` as a padding collate, or None."""
    try:
        result = collate_fn([(tokens.clone(), label) for tokens, label in samples])
    except Exception as error:  # the learner's code
        return f"it raised {type(error).__name__}: {error}"
    if not isinstance(result, (tuple, list)) or len(result) != 3:
        got = f"a {type(result).__name__} of {len(result)}" if isinstance(result, (tuple, list)) else (
            f"a {type(result).__name__}")
        return f"expected (padded, mask, labels), got {got}"
    padded, mask, labels = result
    for name, value in (("padded", padded), ("mask", mask), ("labels", labels)):
        if not isinstance(value, torch.Tensor):
            return f"{name} should be a tensor, got {type(value).__name__}"
    longest = max(len(tokens) for tokens, _ in samples)
    expected_shape = (len(samples), longest)
    if tuple(padded.shape) != expected_shape:
        return (f"padded should have shape (batch, longest in this batch) = {expected_shape}, "
                f"got {tuple(padded.shape)}")
    if padded.dtype != torch.int64:
        return f"padded should keep the tokens' dtype torch.int64, got {padded.dtype}"
    if mask.dtype != torch.bool or tuple(mask.shape) != expected_shape:
        return f"mask should be a torch.bool tensor of shape {expected_shape}, got {mask.dtype} {tuple(mask.shape)}"
    if labels.dtype != torch.int64 or tuple(labels.shape) != (len(samples),):
        return f"labels should be torch.int64 of shape ({len(samples)},), got {labels.dtype} {tuple(labels.shape)}"
    for row, (tokens, label) in enumerate(samples):
        length = len(tokens)
        if not torch.equal(padded[row, :length], tokens):
            return f"row {row} of padded should start with sample {row}'s tokens {tokens.tolist()}"
        if (padded[row, length:] != PAD).any():
            return f"row {row} of padded should end with padding {PAD} after its {length} tokens"
        if not mask[row, :length].all() or mask[row, length:].any():
            return f"row {row} of mask should be True for its {length} tokens and False after them"
        if int(labels[row]) != label:
            return f"labels[{row}] should be sample {row}'s label {label}, got {int(labels[row])}"
    return None


# ----------------------------------------------------------------------------------------------------
# Exercises 2 and 3: reading measurements, predicting what persistent workers do


def check_best_num_workers(answer, measured, *, batch_size: int = 64) -> None:
    """Check exercise 2 of chapter 3: the ``num_workers`` that delivered the most samples/s at ``batch_size``.

    ``measured`` is what *you* measured: a :class:`LoaderSweep`, or the explorer's ``state["measured"]``
    (a dict from ``(batch_size, num_workers)`` to samples per second). It must hold every ``num_workers``
    from 0 to one more than the usable cores at ``batch_size``, so that the settings beyond the cores
    are compared too. The right answer is the fastest setting in those measurements, not a number
    fixed in advance: on a busy machine it changes from run to run. ``None`` prints the task.
    """
    if answer is None:
        print(f"Your turn: measure num_workers from 0 to one more than your usable cores at batch size {batch_size}, "
              "then give the num_workers that delivered the most samples per second.")
        return
    rates = _rates_at(measured, batch_size)
    cores = usable_cores()
    missing = [n for n in range(cores + 2) if n not in rates]
    assert not missing, (
        f"measure num_workers={', '.join(map(str, missing))} at batch size {batch_size} first: this machine "
        f"has {cores} usable cores, so compare 0 to {cores + 1} workers (move the explorer's sliders, or run "
        f"loader_sweep(images, num_workers=range({cores + 2}), batch_size={batch_size}))")
    assert isinstance(answer, int) and not isinstance(answer, bool), (
        f"the answer should be a number of workers (an int), got {answer!r}")
    best = max(rates, key=rates.get)
    assert answer == best, (
        f"num_workers={answer} is not the fastest in your measurements at batch size {batch_size}: "
        "compare the samples per second of every setting")
    print(f"Correct: num_workers={best} delivered {rates[best]:,.0f} samples/s, "
          f"{rates[best] / rates[0]:.2f}x num_workers=0; this machine has {cores} usable cores.")
    if best > cores:
        print("More workers than cores came out on top: they cannot add CPU, so the settings from "
              f"{cores} workers up differ by noise. Measure again with more repeats to see it.")
    elif best == 0:
        print("No workers came out on top: the cores were busy with other work, so the workers had no "
              "spare CPU and only added their costs. Measure again when the machine is idle.")


def _rates_at(measured, batch_size: int) -> dict:
    """``{num_workers: samples/s}`` at ``batch_size`` from a :class:`LoaderSweep` or a ``state["measured"]`` dict."""
    if isinstance(measured, LoaderSweep):
        pairs = {(s.batch_size, s.num_workers): s.samples_per_second for s in measured.stats}
    elif isinstance(measured, dict):
        pairs = measured
    else:
        raise TypeError("measured must be a LoaderSweep or the explorer's state['measured'] (a dict from "
                        f"(batch_size, num_workers) to samples/s), got {type(measured).__name__}")
    return {workers: rate for (size, workers), rate in pairs.items() if size == batch_size}


def persistent_worker_numbers(epochs: int = 2) -> list:
    """The numbers a :class:`SharedGeneratorDataset` of 8 items gives with 2 *persistent* workers.

    No ``worker_init_fn``, batches of 2: one list of 4 batches per epoch, each batch the 2 numbers
    drawn for it (batches 0 and 2 come from worker 0, batches 1 and 3 from worker 1).
    """
    loader = DataLoader(SharedGeneratorDataset(8), batch_size=2, num_workers=2, persistent_workers=True,
                        generator=torch.Generator().manual_seed(0))
    # The persistent workers stop when the loader, which holds their iterator, is freed on return.
    return [[[round(r, 3) for r in batch[1].tolist()] for batch in loader] for _ in range(epochs)]


def check_persistent_prediction(epoch_2_repeats_epoch_1, workers_draw_the_same) -> None:
    """Check exercise 3 of chapter 3: two predictions (True or False) about ``persistent_workers=True``.

    Without a ``worker_init_fn``, with 2 persistent workers, does epoch 2 of a
    :class:`SharedGeneratorDataset` repeat epoch 1's numbers, and do the two workers still draw the
    same numbers as each other? The check runs it (:func:`persistent_worker_numbers`) and compares.
    ``None`` prints the task.
    """
    if epoch_2_repeats_epoch_1 is None or workers_draw_the_same is None:
        print("Your turn: predict, True or False, whether epoch 2 repeats epoch 1 and whether the two workers "
              "draw the same numbers, with persistent_workers=True and no worker_init_fn.")
        return
    for name, value in (("epoch_2_repeats_epoch_1", epoch_2_repeats_epoch_1),
                        ("workers_draw_the_same", workers_draw_the_same)):
        assert isinstance(value, bool), f"{name} should be True or False, got {value!r}"
    first, second = persistent_worker_numbers(epochs=2)
    repeats = first == second
    same = all(epoch[0] == epoch[1] and epoch[2] == epoch[3] for epoch in (first, second))
    hint = ("run numbers_per_epoch with persistent_workers=True added to its DataLoader and compare the "
            "batches; remember which copy of the data set each worker uses")
    assert epoch_2_repeats_epoch_1 == repeats, f"not what happens for epoch 2 against epoch 1: {hint}"
    assert workers_draw_the_same == same, f"not what happens for the two workers: {hint}"
    print(f"Correct. epoch 1: {first}\n         epoch 2: {second}")
    print("Persistent workers keep their copy of the data set, generator included, from one epoch to the "
          "next, so each copy moves on" + (" - but both copies started in the same state, so the workers "
          "still agree with each other: only a worker_init_fn gives each its own generator." if same else "."))
