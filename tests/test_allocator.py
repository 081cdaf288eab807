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


# The rules below are those of PyTorch's c10/cuda/CUDACachingAllocator.cpp (default settings: no
# max_split_size, no expandable segments, one stream), tested one by one.


def test_rounding_to_512_bytes():
    # round_size: every request becomes a multiple of kMinBlockSize = 512 bytes, at least 512.
    assert [block_size(n) for n in (0, 1, 512, 1025, 2 * MiB + 1)] == [512, 512, 512, 1536, 2 * MiB + 512]
    a = CachingAllocator()
    a.malloc(1)
    assert a.allocated == 512  # memory_allocated counts the rounded block, not the request


def test_pool_choice_at_one_mib():
    # get_pool: up to kSmallSize = 1 MiB (inclusive) the small pool, above it the large pool; a cached
    # block of one pool never serves a request of the other.
    a = CachingAllocator()
    small = a.malloc(1 * MiB)
    assert small.small and a.reserved == 2 * MiB  # exactly 1 MiB is still small: a 2 MiB segment
    large = a.malloc(1 * MiB + 1)
    assert not large.small and a.reserved == 22 * MiB  # just above: a 20 MiB large segment
    a.free(large)  # 20 MiB cached in the large pool
    a.malloc(4096)  # fits in the small segment's free 1 MiB, never in the large pool's cached block
    assert a.reserved == 22 * MiB
    a.malloc(1 * MiB)  # the small segment has only 1 MiB - 4 KiB free: a new small segment, not the large block
    assert a.reserved == 24 * MiB


def test_segment_sizes_at_the_boundaries():
    # get_allocation_size: <= 1 MiB -> kSmallBuffer 2 MiB; < kMinLargeAlloc 10 MiB -> kLargeBuffer 20 MiB;
    # from 10 MiB on, the request rounded up to kRoundLarge = 2 MiB.
    assert segment_size(1 * MiB) == 2 * MiB
    assert segment_size(1 * MiB + 512) == 20 * MiB
    assert segment_size(10 * MiB - 512) == 20 * MiB
    assert segment_size(10 * MiB) == 10 * MiB
    assert segment_size(11 * MiB) == 12 * MiB
    assert segment_size(12 * MiB) == 12 * MiB


def test_small_pool_splits_down_to_512_bytes():
    # should_split, small pool: split whenever at least kMinBlockSize (512 bytes) would remain.
    a = CachingAllocator()
    whole = a.malloc(1 * MiB)
    rest = a.malloc(1 * MiB - 512)  # the second MiB of the 2 MiB segment, split leaving 512 bytes
    a.free(whole)
    again = a.malloc(1 * MiB - 512)  # the freed 1 MiB block, split: 512 bytes stay free
    assert again.size == 1 * MiB - 512 and rest.size == 1 * MiB - 512
    tail = a.malloc(512)  # the 512-byte remainder of the split, same segment
    assert tail.addr == again.addr + again.size and a.reserved == 2 * MiB


def test_large_pool_splits_only_above_one_mib():
    # should_split, large pool: split only if more than kSmallSize (1 MiB) would remain.
    a = CachingAllocator()
    first = a.malloc(2 * MiB)  # a 20 MiB segment, split: 18 MiB stay cached
    assert first.size == 2 * MiB and a.allocated == 2 * MiB and a.reserved == 20 * MiB
    second = a.malloc(17 * MiB)  # 18 - 17 = exactly 1 MiB would remain: not split, charged 18 MiB
    assert second.size == 18 * MiB and a.allocated == 20 * MiB and a.reserved == 20 * MiB
    a.free(second)
    third = a.malloc(17 * MiB - 512)  # 1 MiB + 512 bytes would remain: split
    assert third.size == 17 * MiB - 512 and a.reserved == 20 * MiB


def test_a_one_to_ten_mib_segment_serves_the_next_requests():
    # Requests between 1 and 10 MiB share 20 MiB segments: the rest of a split segment is reused.
    a = CachingAllocator()
    blocks = [a.malloc(4 * MiB) for _ in range(5)]
    assert a.reserved == 20 * MiB and [b.addr - blocks[0].addr for b in blocks] == [i * 4 * MiB for i in range(5)]
    a.malloc(4 * MiB)  # the segment is full: a second 20 MiB one
    assert a.reserved == 40 * MiB


def test_best_fit_takes_the_smallest_block_then_the_lowest_address():
    # get_free_block: lower_bound on (size, address) in the pool, so the smallest free block that
    # holds the request, and of equal ones the lowest address.
    a = CachingAllocator()
    keep = [a.malloc(12 * MiB), a.malloc(16 * MiB), a.malloc(14 * MiB), a.malloc(14 * MiB)]
    for block in keep:
        a.free(block)
    chosen = a.malloc(13 * MiB)
    assert chosen.addr == keep[2].addr and chosen.size == 14 * MiB  # 14 beats 16; 14 MiB - 13 MiB is not split
    assert a.malloc(13 * MiB).addr == keep[3].addr
    assert a.malloc(13 * MiB).addr == keep[1].addr  # only the 16 MiB block is left that holds it: split
    assert a.reserved == 56 * MiB  # every request was served from the cache


def test_new_segment_only_when_no_cached_block_fits():
    a = CachingAllocator()
    a.free(a.malloc(12 * MiB))
    a.malloc(12 * MiB + 512)  # 512 bytes too big for the cached 12 MiB block: a new 14 MiB segment
    assert a.reserved == 26 * MiB
    assert a.segments() == [12 * MiB, 14 * MiB]


def test_release_frees_only_whole_unused_segments():
    # release_cached_blocks on a failed cudaMalloc: only cached blocks that are a whole segment (not
    # split) go back to the driver; a segment with a live block stays reserved, free part included.
    a = CachingAllocator(budget=50 * MiB)
    live = a.malloc(2 * MiB)  # in a 20 MiB segment that stays, 18 MiB of it free
    a.free(a.malloc(20 * MiB))  # a whole cached 20 MiB segment
    a.malloc(20 * MiB + 512)  # 22 MiB more does not fit in 40 MiB + 22 > 50: the whole cached segment goes
    assert a.reserved == 42 * MiB and not live.free
    assert sorted(a.segments()) == [20 * MiB, 22 * MiB]


def test_a_smaller_limit_releases_whole_cached_segments_first():
    a = CachingAllocator()
    live = a.malloc(2 * MiB)  # a 20 MiB segment in use
    a.free(a.malloc(30 * MiB))  # a whole cached 30 MiB segment
    a.limit(25 * MiB)  # 50 MiB reserved: the cached segment goes, the one in use stays
    assert a.reserved == a.peak_reserved == 20 * MiB and a.segments() == [20 * MiB] and not live.free
    with pytest.raises(torch.OutOfMemoryError, match="20.00 MiB of segments are in use"):
        a.limit(10 * MiB)
    a.malloc(6 * MiB)  # what fits the cached free part of a segment still works under the limit...
    with pytest.raises(torch.OutOfMemoryError):  # ...and a new segment must fit the new limit
        a.malloc(20 * MiB)
