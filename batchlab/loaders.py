"""Measuring ``DataLoader`` configurations (chapter 3): throughput, sweeps and the cores there are.

* :func:`loader_throughput` - samples per second, time to the first batch and how busy the main
  process is, for one ``DataLoader`` configuration (:class:`LoaderStats`);
  :func:`iter_batches_throughput` measures the hand-written :func:`batchlab.batching.iter_batches`
  the same way.
* :func:`loader_sweep` - a grid of batch sizes x ``num_workers``, repeats interleaved
  (:class:`LoaderSweep`: a table, speed-ups and a figure).
* :func:`usable_cores` - the CPU cores this process may use (affinity and the cgroup CPU quota).
"""

from __future__ import annotations

import math
import numbers
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .batching import collate, iter_batches
from .progress import progress_bar
from .validation import check_bool, check_dataset, check_int, check_seed
from .workers import frozen_gc, one_thread, stop_workers


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
        return self._median("runs_samples_per_second")

    @property
    def first_batch_seconds(self) -> float:
        return self._median("runs_first_batch_seconds")

    @property
    def busy_fraction(self) -> float:
        return self._median("runs_busy_fraction")

    def _median(self, runs: str) -> float:
        values = getattr(self, runs)
        if not values:
            raise ValueError(
                f"{self.setting} has no runs yet: {runs} is empty, so there is no median; "
                "measure it with loader_throughput"
            )
        return statistics.median(values)

    @property
    def setting(self) -> str:
        """The configuration, as it would be written in code."""
        if self.loader == "iter_batches":
            return f"iter_batches(batch_size={self.batch_size})"
        extra = "".join(
            [
                ", pin_memory=True" * self.pin_memory,
                ", persistent_workers=True" * self.persistent_workers,
                f", prefetch_factor={self.prefetch_factor}" * (self.prefetch_factor is not None),
            ]
        )
        return f"DataLoader(batch_size={self.batch_size}, num_workers={self.num_workers}{extra})"

    def __str__(self) -> str:
        if not self.runs_samples_per_second:
            return f"{self.setting}: not measured (no runs)"
        return (
            f"{self.setting}: {self.samples_per_second:,.0f} samples/s (median of "
            f"{len(self.runs_samples_per_second)}), first batch after {self.first_batch_seconds:.2f} s, "
            f"main process busy {self.busy_fraction:.0%}"
        )

    def merged(self, other: LoaderStats) -> LoaderStats:
        """These runs and ``other``'s runs of the same configuration together."""
        if (self.loader, self.batch_size, self.num_workers) != (other.loader, other.batch_size, other.num_workers):
            raise ValueError(f"cannot merge the runs of {self.setting} and {other.setting}")
        return replace(
            self,
            runs_samples_per_second=self.runs_samples_per_second + other.runs_samples_per_second,
            runs_first_batch_seconds=self.runs_first_batch_seconds + other.runs_first_batch_seconds,
            runs_busy_fraction=self.runs_busy_fraction + other.runs_busy_fraction,
            warnings=tuple(dict.fromkeys(self.warnings + other.warnings)),
        )


def loader_throughput(
    dataset,
    *,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    prefetch_factor: int | None = None,
    batches: int = 50,
    warmup: int = 5,
    repeats: int = 3,
    seed: int = 0,
    collate_fn=None,
) -> LoaderStats:
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
    _check_loader_args(
        dataset,
        batch_size,
        num_workers,
        pin_memory,
        persistent_workers,
        prefetch_factor,
        batches,
        warmup,
        repeats,
        seed,
        collate_fn,
    )
    collate_fn = collate_fn or collate
    stats = LoaderStats("DataLoader", batch_size, num_workers, pin_memory, persistent_workers, prefetch_factor)
    with torch.random.fork_rng(devices=[]), one_thread(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        collate_fn([dataset[i] for i in range(batch_size)])  # un-collatable samples fail here, not in a worker
        torch.manual_seed(seed)  # transforms in the main process (num_workers=0) draw from this
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(seed),
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            prefetch_factor=prefetch_factor,
            collate_fn=collate_fn,
        )
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


def iter_batches_throughput(
    dataset, *, batch_size: int, batches: int = 50, warmup: int = 5, repeats: int = 3, seed: int = 0, collate_fn=None
) -> LoaderStats:
    """Measure :func:`iter_batches` (shuffled, ``drop_last``) exactly as :func:`loader_throughput` measures a loader."""
    _check_loader_args(dataset, batch_size, 0, False, False, None, batches, warmup, repeats, seed, collate_fn)
    stats = LoaderStats("iter_batches", batch_size)
    with torch.random.fork_rng(devices=[]), one_thread():
        torch.manual_seed(seed)
        for _ in range(repeats):
            start = time.perf_counter(), time.process_time()
            iterator = iter_batches(dataset, batch_size, shuffle=True, drop_last=True, seed=seed, collate_fn=collate_fn)
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
    return replace(
        stats,
        runs_samples_per_second=(batches * stats.batch_size / wall,),
        runs_first_batch_seconds=(first,),
        runs_busy_fraction=(cpu / wall,),
    )


def _check_loader_args(
    dataset,
    batch_size,
    num_workers,
    pin_memory,
    persistent_workers,
    prefetch_factor,
    batches,
    warmup,
    repeats,
    seed,
    collate_fn,
):
    check_dataset(dataset, labelled=False)
    check_int("batch_size", batch_size, minimum=1)
    check_int("num_workers", num_workers, minimum=0)
    check_bool("pin_memory", pin_memory)
    check_bool("persistent_workers", persistent_workers)
    if prefetch_factor is not None:
        check_int("prefetch_factor", prefetch_factor, minimum=1)
        if num_workers == 0:
            raise ValueError(
                f"prefetch_factor={prefetch_factor} needs num_workers > 0 (it is the number of "
                "batches each worker prepares ahead); use prefetch_factor=None with num_workers=0"
            )
    if persistent_workers and num_workers == 0:
        raise ValueError(
            "persistent_workers=True needs num_workers > 0 (it keeps the worker processes "
            "alive between epochs); use persistent_workers=False with num_workers=0"
        )
    check_int("batches", batches, minimum=1)
    check_int("warmup", warmup, minimum=0)
    check_int("repeats", repeats, minimum=1)
    check_seed("seed", seed)
    if collate_fn is not None and not callable(collate_fn):
        raise TypeError(f"collate_fn must be a function from a list of samples to a batch, got {collate_fn!r}")
    needed = (warmup + batches) * batch_size
    if len(dataset) < needed:
        raise ValueError(
            f"dataset has {len(dataset)} samples, but (warmup + batches) * batch_size = "
            f"({warmup} + {batches}) * {batch_size} = {needed} are needed per run; "
            "use a larger data set or fewer batches"
        )


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
            lines.append(
                f"{s.batch_size:>10} {s.num_workers:>7} {s.samples_per_second:>10,.0f} "
                f"{s.first_batch_seconds:>10.2f}s {s.busy_fraction:>9.0%}"
            )
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
            ax.plot(
                [s.num_workers for s in runs], [s.samples_per_second for s in runs], "o-", label=f"batch size {size}"
            )
            if highlight is not None and highlight[0] == size:
                for s in runs:
                    if s.num_workers == highlight[1]:
                        ax.plot(
                            [s.num_workers],
                            [s.samples_per_second],
                            "o",
                            markersize=14,
                            markerfacecolor="none",
                            markeredgecolor="black",
                        )
        ax.axvline(self.cores, color="grey", linestyle=":", label=f"{self.cores} usable CPU cores")
        ax.set_xlabel("num_workers")
        ax.set_ylabel("samples per second")
        ax.set_ylim(bottom=0)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        return fig


# What loader_sweep passes on to loader_throughput (it sets batch_size, num_workers and repeats itself).
SWEEP_OPTIONS = frozenset(
    {"pin_memory", "persistent_workers", "prefetch_factor", "batches", "warmup", "seed", "collate_fn"}
)


def loader_sweep(
    dataset, *, num_workers=(0, 1, 2), batch_size=(32,), repeats: int = 3, progress: bool = True, **options
) -> LoaderSweep:
    """Run :func:`loader_throughput` for every ``batch_size`` x ``num_workers`` (chapter 3).

    The repeats are interleaved (all settings once, then all again, ...) so that a burst of load from
    another program on the machine spreads over every setting instead of spoiling one. ``options``
    go to :func:`loader_throughput` (``batches``, ``warmup``, ``pin_memory``, ...); ``progress`` draws a
    bar over the runs.
    """
    unknown = sorted(set(options) - SWEEP_OPTIONS)
    if unknown:
        raise TypeError(
            f"loader_sweep got unknown options {', '.join(unknown)}; it passes these to "
            f"loader_throughput: {', '.join(sorted(SWEEP_OPTIONS))}"
        )
    workers = _check_grid("num_workers", num_workers, minimum=0)
    sizes = _check_grid("batch_size", batch_size, minimum=1)
    check_int("repeats", repeats, minimum=1)
    check_bool("progress", progress)
    for size in sizes:  # every argument is checked before the first worker starts
        _check_loader_args(
            dataset,
            size,
            max(workers),
            options.get("pin_memory", False),
            options.get("persistent_workers", False),
            options.get("prefetch_factor"),
            options.get("batches", 50),
            options.get("warmup", 5),
            1,
            options.get("seed", 0),
            options.get("collate_fn"),
        )
    results = {}
    with progress_bar(progress, total=repeats * len(sizes) * len(workers), desc="loader_sweep", unit="run") as bar:
        for _ in range(repeats):
            for size in sizes:
                for n in workers:
                    bar.set_postfix(batch_size=size, num_workers=n, refresh=False)
                    run = loader_throughput(dataset, batch_size=size, num_workers=n, repeats=1, **options)
                    results[size, n] = results[size, n].merged(run) if (size, n) in results else run
                    bar.update()
    return LoaderSweep(list(results.values()), usable_cores())


def _check_grid(name, values, *, minimum):
    """``values`` as a tuple of ints: one int, or a non-empty list, tuple or range of them."""
    if isinstance(values, numbers.Integral) and not isinstance(values, bool):
        values = (values,)
    elif isinstance(values, (list, tuple, range)):
        values = tuple(values)
    else:
        raise TypeError(f"{name} must be an int or a non-empty list of ints, got {values!r} ({type(values).__name__})")
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
