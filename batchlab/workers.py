"""Worker processes of a ``DataLoader``: their pitfalls and the utilities that avoid them (chapter 3).

* :func:`one_thread` - torch in this process on one thread, as in every worker.
* :func:`frozen_gc` - hide this process's objects from forked workers' garbage collectors.
* :func:`stop_workers` - shut a loader iterator's workers down now (after an error, too).
* :func:`seed_worker` - a ``worker_init_fn`` that gives each worker's copy of the data set its own
  generator (the pitfall of :class:`batchlab.datasets.SharedGeneratorDataset`).
* :func:`worker_memory` - the memory of each worker after reading a data set (the copy-on-access
  pitfall of :class:`batchlab.datasets.LookupTable`).

Every function here lives in an importable module, so ``DataLoader`` workers can find them on
platforms that *spawn* workers (macOS, Windows) as well as where they fork (Linux).
"""

from __future__ import annotations

import contextlib
import gc

import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader, get_worker_info

from .process import ProcessMemory
from .torch_internals import has_workers, shutdown_workers
from .validation import check_dataset, check_int


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


def worker_memory(dataset, *, batch_size: int, num_workers: int = 2) -> list[ProcessMemory]:
    """Read all of ``dataset`` once with a ``DataLoader`` and return the memory of each worker at the end.

    One :class:`batchlab.process.ProcessMemory` per worker, the type :func:`batchlab.process_memory`
    gives for this process: ``rss_bytes`` (resident pages, shared ones included), ``pss_bytes`` (shared
    pages divided among the processes that share them; Linux only, else None) and ``uss_bytes`` (pages
    only this worker holds: what it would free by exiting). ``tensor_bytes`` is None: a worker's
    tensors cannot be counted from the main process. Sampled while the last batch is in hand.
    """
    check_dataset(dataset, labelled=False)
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
                memory += [ProcessMemory.of(child) for child in psutil.Process().children() if child.pid not in others]
    finally:
        stop_workers(iterator)
    return memory
