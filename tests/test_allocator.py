"""The CUDA caching allocator model follows the rules of PyTorch's CUDACachingAllocator."""

import pytest
import torch

from batchlab.allocator import CachingAllocator, MiB, block_size, segment_size


def test_block_and_segment_sizes():
    assert [block_size(n) for n in (1, 511, 512, 513, 4096)] == [512, 512, 512, 1024, 4096]
    assert segment_size(512) == 2 * MiB  # small requests share 2 MiB segments
    assert segment_size(1 * MiB + 512) == 20 * MiB  # 1-10 MiB requests get 20 MiB segments
    assert segment_size(10 * MiB + 1) == 12 * MiB  # large requests: rounded up to 2 MiB


def test_small_blocks_share_a_segment_and_are_reused():
    a = CachingAllocator()
    blocks = [a.malloc(1000) for _ in range(4)]
    assert a.allocated == 4 * 1024 and a.reserved == 2 * MiB
    a.free(blocks[1])
    again = a.malloc(600)  # best fit: the freed 1024-byte block, the smallest free block that holds 1024
    assert again.addr == blocks[1].addr and a.reserved == 2 * MiB


def test_freed_neighbours_merge_back_into_one_block():
    a = CachingAllocator()
    x, y = a.malloc(512 * 1024), a.malloc(512 * 1024)
    a.free(x)
    a.free(y)
    big = a.malloc(1 * MiB)  # fits only because x and y merged (with the rest of the segment)
    assert big.addr == x.addr and a.reserved == 2 * MiB


def test_unsplit_large_blocks_are_charged_in_full():
    a = CachingAllocator()
    first = a.malloc(16 * MiB)
    a.free(first)
    # 15.5 MiB reuses the cached 16 MiB block; the 0.5 MiB left is too small to split off in the
    # large pool (it must be more than 1 MiB), so the tensor is charged the whole block.
    second = a.malloc(15 * MiB + 512 * 1024)
    assert second.size == 16 * MiB and a.allocated == 16 * MiB and a.reserved == 16 * MiB
    assert a.peak_allocated == 16 * MiB


def test_out_of_memory_after_releasing_the_cache():
    a = CachingAllocator(budget=40 * MiB)
    cached = a.malloc(30 * MiB)
    a.free(cached)  # 30 MiB stay reserved, unused
    a.malloc(32 * MiB)  # too big for the cached block: the cache is released first, so it fits
    assert a.reserved == 32 * MiB and a.allocated == 32 * MiB
    with pytest.raises(torch.OutOfMemoryError, match=r"Tried to allocate 10.00 MiB.*of a 40.00 MiB budget"):
        a.malloc(10 * MiB)
