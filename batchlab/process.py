"""The process's view of memory: what the operating system sees beside what Python's tensors hold (chapters 3 and 4).

:func:`process_memory` reads this process's resident (RSS), unique (USS) and proportional (PSS) memory
with psutil, and the bytes of the CPU tensors that Python objects refer to; :class:`ProcessMemory` is
also what :func:`batchlab.workers.worker_memory` returns for each ``DataLoader`` worker.
"""

from __future__ import annotations

import gc
import itertools
from dataclasses import dataclass

import psutil
import torch

from .memory import storage_bytes
from .validation import MiB


@dataclass(frozen=True)
class ProcessMemory:
    """The memory of one process as the operating system sees it, beside what Python's tensors hold, in bytes.

    * ``rss_bytes``: resident pages, shared ones included (what ``top`` and the task manager show);
    * ``uss_bytes``: pages only this process holds, what it would free by exiting;
    * ``pss_bytes``: shared pages divided among the processes that share them (Linux only; None elsewhere);
    * ``tensor_bytes``: the storages of the CPU tensors that Python objects refer to (found through the
      garbage collector, each storage once). Tensors that only the autograd graph keeps are not Python
      objects, so they are missing here; :func:`track_memory` sees them. None for a process measured
      from outside, such as a ``DataLoader`` worker (:func:`batchlab.workers.worker_memory`): its
      tensors cannot be counted from this process.
    """

    rss_bytes: int
    uss_bytes: int
    pss_bytes: int | None = None
    tensor_bytes: int | None = None

    @classmethod
    def of(cls, process: psutil.Process, tensor_bytes: int | None = None) -> ProcessMemory:
        """What the operating system reports for ``process`` now (``psutil``'s full memory info)."""
        info = process.memory_full_info()
        return cls(
            rss_bytes=info.rss, uss_bytes=info.uss, pss_bytes=getattr(info, "pss", None), tensor_bytes=tensor_bytes
        )

    @property
    def other_bytes(self) -> int | None:
        """Resident memory that is not tensors: the interpreter, torch's libraries, freed-but-kept pages."""
        return None if self.tensor_bytes is None else self.rss_bytes - self.tensor_bytes

    def __repr__(self) -> str:
        shared = f"PSS {self.pss_bytes / MiB:.1f} MiB, " if self.pss_bytes is not None else ""
        own = f"{shared}USS {self.uss_bytes / MiB:.1f} MiB"
        if self.tensor_bytes is None:
            return (
                f"ProcessMemory(resident {self.rss_bytes / MiB:.1f} MiB, {own}; its tensors are not known: "
                "measured from outside the process)"
            )
        return (
            f"ProcessMemory(resident {self.rss_bytes / MiB:.1f} MiB, of which CPU tensors "
            f"{self.tensor_bytes / MiB:.1f} MiB and everything else {self.other_bytes / MiB:.1f} MiB; {own})"
        )


_TENSOR_TYPES: dict = {}  # type -> is it a tensor type? (cached: asked for every object gc knows)


def python_tensors(objects=None) -> list:
    """Every tensor that is a Python object now (parameters included), or among ``objects``.

    Types are checked once each with ``issubclass``; ``isinstance`` on every object would ask some
    lazy objects for their ``__class__`` and make them warn.
    """
    objects = gc.get_objects() if objects is None else objects
    types = list(map(type, objects))
    kinds = set(types)
    for kind in kinds - _TENSOR_TYPES.keys():
        _TENSOR_TYPES[kind] = issubclass(kind, torch.Tensor)
    tensor_kinds = {kind for kind in kinds if _TENSOR_TYPES[kind]}
    # The same as [obj for obj in objects if type(obj) in tensor_kinds], without a Python-level loop.
    return list(itertools.compress(objects, map(tensor_kinds.__contains__, types)))


def process_memory() -> ProcessMemory:
    """The memory of this process (RSS, USS, PSS, from psutil) and the bytes of the CPU tensors Python holds.

    Chapter 4 compares the RSS with the tensors; chapter 3 compares the kernel with its
    ``DataLoader`` workers (:func:`batchlab.workers.worker_memory` returns the same type per worker).
    """
    tensors = [t for t in python_tensors() if t.device.type == "cpu"]
    return ProcessMemory.of(psutil.Process(), tensor_bytes=storage_bytes(tensors))
