"""A model of PyTorch's CUDA caching allocator (chapter 4: allocated vs reserved memory).

PyTorch does not call ``cudaMalloc`` for every tensor. It asks the driver for large *segments*,
cuts them into *blocks* for tensors, and keeps freed blocks cached for the next tensor. Two numbers
follow:

* **allocated** (``torch.cuda.memory_allocated``): the blocks in use by tensors. A block is the
  tensor's size rounded up to 512 bytes — or bigger, when a cached block was not worth splitting.
* **reserved** (``torch.cuda.memory_reserved``): all segments, used or cached. This is what the
  device has given PyTorch, what ``nvidia-smi`` shows (plus the CUDA context), and what runs out.

:class:`CachingAllocator` replays allocations and frees with the rules of PyTorch's
``CUDACachingAllocator.cpp`` (default settings, one stream), so the memory estimator can predict both
numbers without a GPU. With a ``budget`` it also behaves as the real allocator does when the device
is full: release the cached segments that are entirely free, try again, and raise
``torch.OutOfMemoryError`` if that is still not enough.
"""

from __future__ import annotations

import bisect
import math

import torch

MiB = 1024 * 1024
MIN_BLOCK = 512  # every block is a multiple of 512 bytes
SMALL_SIZE = 1 * MiB  # requests up to this size come from the small pool
SMALL_SEGMENT = 2 * MiB  # the small pool asks the driver for 2 MiB at a time
LARGE_SEGMENT = 20 * MiB  # requests between 1 and 10 MiB get a 20 MiB segment
MIN_LARGE_ALLOC = 10 * MiB  # from 10 MiB on, a segment is the request rounded up to 2 MiB
ROUND_LARGE = 2 * MiB


class Block:
    """A piece of a segment: its address, size, pool, whether it is free, and its neighbours."""

    __slots__ = ("addr", "size", "small", "free", "prev", "next")

    def __init__(self, addr: int, size: int, small: bool):
        self.addr, self.size, self.small, self.free = addr, size, small, True
        self.prev = self.next = None


def block_size(nbytes: int) -> int:
    """The size of the block a request of ``nbytes`` asks for: at least 512, a multiple of 512."""
    return MIN_BLOCK if nbytes < MIN_BLOCK else MIN_BLOCK * math.ceil(nbytes / MIN_BLOCK)


def segment_size(size: int) -> int:
    """How much the allocator asks the driver for when no cached block can hold ``size`` bytes."""
    if size <= SMALL_SIZE:
        return SMALL_SEGMENT
    if size < MIN_LARGE_ALLOC:
        return LARGE_SEGMENT
    return ROUND_LARGE * math.ceil(size / ROUND_LARGE)


class CachingAllocator:
    """Replay ``malloc(nbytes) -> Block`` and ``free(block)``; read ``allocated`` and ``reserved``.

    ``peak_allocated`` and ``peak_reserved`` follow ``torch.cuda.max_memory_allocated`` and
    ``max_memory_reserved``; :meth:`reset_peaks` is ``torch.cuda.reset_peak_memory_stats``.
    """

    def __init__(self, budget: int | None = None):
        self.budget = budget
        self._pools = {True: [], False: []}  # small pool / large pool: free blocks sorted by (size, addr)
        self._segments: list = []  # the first block of every segment
        self._next_addr = 0
        self.allocated = self.reserved = self.peak_allocated = self.peak_reserved = 0

    def reset_peaks(self) -> None:
        self.peak_allocated, self.peak_reserved = self.allocated, self.reserved

    def limit(self, budget: int) -> None:
        """Make ``budget`` the limit from now on, as if the device had just become that small: release the
        cached segments that are entirely free if more than that is reserved, and raise
        ``torch.OutOfMemoryError`` if the segments still in use alone are more."""
        self.budget = budget
        if not self._room_for(0):
            raise torch.OutOfMemoryError(
                f"Simulated CUDA out of memory: {self.reserved / MiB:.2f} MiB of segments are in use, more than "
                f"the {budget / MiB:.2f} MiB budget."
            )
        self.reset_peaks()

    def segments(self) -> list:
        """The size in bytes of every segment reserved now, in the order they were created."""
        sizes = []
        for first in self._segments:
            size, block = 0, first
            while block is not None:
                size, block = size + block.size, block.next
            sizes.append(size)
        return sizes

    def malloc(self, nbytes: int) -> Block:
        size = block_size(nbytes)
        small = size <= SMALL_SIZE
        block = self._best_fit(size, small) or self._new_segment(size, small, nbytes)
        remaining = block.size - size
        # The allocator splits a block only if what is left is useful: at least 512 bytes in the small
        # pool, more than 1 MiB in the large pool. Otherwise the tensor gets (and is charged) it all.
        if remaining >= MIN_BLOCK if small else remaining > SMALL_SIZE:
            rest = Block(block.addr + size, remaining, small)
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next, block.size = rest, size
            self._insert(rest)
        block.free = False
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block

    def free(self, block: Block) -> None:
        """Return ``block`` to its pool, merged with free neighbours of the same segment (nothing is released)."""
        block.free = True
        self.allocated -= block.size
        for neighbour in (block.prev, block.next):
            if neighbour is not None and neighbour.free:
                self._remove(neighbour)
                first, second = (neighbour, block) if neighbour is block.prev else (block, neighbour)
                first.size += second.size
                first.next = second.next
                if second.next is not None:
                    second.next.prev = first
                block = first
        self._insert(block)

    def _best_fit(self, size: int, small: bool) -> Block | None:
        pool = self._pools[small]
        i = bisect.bisect_left(pool, (size, -1))
        if i == len(pool):
            return None
        return pool.pop(i)[2]

    def _new_segment(self, size: int, small: bool, nbytes: int) -> Block:
        want = segment_size(size)
        if not self._room_for(want):
            raise torch.OutOfMemoryError(
                f"Simulated CUDA out of memory. Tried to allocate {nbytes / MiB:.2f} MiB. "
                f"{self.allocated / MiB:.2f} MiB is allocated by tensors and {self.reserved / MiB:.2f} MiB "
                f"reserved, of a {self.budget / MiB:.2f} MiB budget."
            )
        block = Block(self._next_addr, want, small)
        self._next_addr += want + ROUND_LARGE  # segments never touch, so they never merge
        self._segments.append(block)
        self.reserved += want
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return block

    def _room_for(self, want: int) -> bool:
        """Whether ``want`` more bytes of segments fit the budget, once the cached free segments are released
        if they must go (what PyTorch does before it gives up)."""
        if self.budget is None or self.reserved + want <= self.budget:
            return True
        self._release_free_segments()
        return self.reserved + want <= self.budget

    def _release_free_segments(self) -> None:
        for first in list(self._segments):
            if first.free and first.next is None:  # a whole segment, cached and unused
                self._remove(first)
                self._segments.remove(first)
                self.reserved -= first.size

    def _insert(self, block: Block) -> None:
        bisect.insort(self._pools[block.small], (block.size, block.addr, block))

    def _remove(self, block: Block) -> None:
        pool = self._pools[block.small]
        del pool[bisect.bisect_left(pool, (block.size, block.addr))]
