"""explain_oom reads real out-of-memory messages of every PyTorch version, and batchlab's simulated ones.

The messages are copied from public issue threads and forum posts (the URL above each); the expected
numbers are the printed ones in bytes (PyTorch prints two decimals of KiB, MiB or GiB, powers of 1024).
"""

import pytest
import torch

import batchlab
from batchlab import OOMReport, explain_oom
from batchlab.allocator import CachingAllocator

KiB, MiB, GiB = 2**10, 2**20, 2**30


def size(number, unit):
    """A printed size in bytes, as the message states it (e.g. size(2.26, GiB))."""
    return round(number * unit)


# Each row: the message, the numbers it gives (requested, total, free, allocated, reserved) and the cause.
PYTORCH_1X = [
    pytest.param(  # https://github.com/pytorch/pytorch/issues/59778
        "CUDA out of memory. Tried to allocate 2.26 GiB (GPU 0; 6.00 GiB total capacity; 781.59 MiB already "
        "allocated; 3.03 GiB free; 1.24 GiB reserved in total by PyTorch) ",
        (size(2.26, GiB), 6 * GiB, size(3.03, GiB), size(781.59, MiB), size(1.24, GiB)),
        "out_of_memory",
        id="pytorch-59778",
    ),
    pytest.param(  # https://github.com/pytorch/pytorch/issues/40863
        "RuntimeError: CUDA out of memory. Tried to allocate 60.00 MiB (GPU 0; 11.17 GiB total capacity; 505.96 MiB "
        "already allocated; 12.50 MiB free; 530.00 MiB reserved in total by PyTorch)",
        (60 * MiB, size(11.17, GiB), size(12.5, MiB), size(505.96, MiB), 530 * MiB),
        "other_processes",
        id="pytorch-40863",
    ),
    pytest.param(  # https://github.com/junyanz/pytorch-CycleGAN-and-pix2pix/issues/962
        "RuntimeError: CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 10.76 GiB total capacity; 2.42 GiB "
        "already allocated; 26.12 MiB free; 2.75 GiB reserved in total by PyTorch).",
        (20 * MiB, size(10.76, GiB), size(26.12, MiB), size(2.42, GiB), size(2.75, GiB)),
        "other_processes",
        id="cyclegan-962",
    ),
    pytest.param(  # https://github.com/pytorch/pytorch/issues/35901
        "CUDA out of memory. Tried to allocate 10.84 GiB (GPU 0; 23.65 GiB total capacity; 1.06 GiB already "
        "allocated; 10.26 GiB free; 12.53 GiB reserved in total by PyTorch)",
        (size(10.84, GiB), size(23.65, GiB), size(10.26, GiB), size(1.06, GiB), size(12.53, GiB)),
        "fragmentation",
        id="pytorch-35901",
    ),
    pytest.param(  # https://stackoverflow.com/questions/70074789/cuda-oom-but-the-numbers-dont-add-upp
        "RuntimeError: CUDA out of memory. Tried to allocate 5.37 GiB (GPU 0; 7.79 GiB total capacity; 742.54 MiB "
        "already allocated; 5.13 GiB free; 792.00 MiB reserved in total by PyTorch)",
        (size(5.37, GiB), size(7.79, GiB), size(5.13, GiB), size(742.54, MiB), 792 * MiB),
        "single_allocation",
        id="stackoverflow-70074789",
    ),
    pytest.param(  # https://github.com/pytorch/pytorch/issues/16417 (PyTorch 1.0: "cached" is reserved - allocated)
        "RuntimeError: CUDA out of memory. Tried to allocate 12.50 MiB (GPU 0; 10.92 GiB total capacity; 8.57 MiB "
        "already allocated; 9.28 GiB free; 4.68 MiB cached)",
        (size(12.5, MiB), size(10.92, GiB), size(9.28, GiB), size(8.57, MiB), size(8.57, MiB) + size(4.68, MiB)),
        "out_of_memory",
        id="pytorch-16417-cached",
    ),
]

PYTORCH_2_0_2_1 = [
    pytest.param(  # https://github.com/One-2-3-45/One-2-3-45/issues/25 (2.0: the 1.x numbers, max_split_size_mb)
        "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.69 GiB (GPU 0; 14.56 GiB total "
        "capacity; 649.97 MiB already allocated; 1.31 GiB free; 1.01 GiB reserved in total by PyTorch) If reserved "
        "memory is >> allocated memory try setting max_split_size_mb to avoid fragmentation.  See documentation for "
        "Memory Management and PYTORCH_CUDA_ALLOC_CONF",
        (size(1.69, GiB), size(14.56, GiB), size(1.31, GiB), size(649.97, MiB), size(1.01, GiB)),
        "other_processes",
        id="one2345-25",
    ),
    pytest.param(  # https://github.com/carolchenyx/MGFN./issues/35
        "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.70 GiB. GPU 0 has a total capacty of "
        "6.00 GiB of which 0 bytes is free. Of the allocated memory 2.93 GiB is allocated by PyTorch, and 2.30 GiB is "
        "reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
        "max_split_size_mb to avoid fragmentation.  See documentation for Memory Management and "
        "PYTORCH_CUDA_ALLOC_CONF",
        (size(1.7, GiB), 6 * GiB, 0, size(2.93, GiB), size(2.93, GiB) + size(2.3, GiB)),
        "fragmentation",
        id="mgfn-35",
    ),
    pytest.param(  # https://github.com/wxian3/NeuroLens/issues/2
        "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 55.57 GiB. GPU 0 has a total capacty of "
        "12.00 GiB of which 9.02 GiB is free. Of the allocated memory 984.52 MiB is allocated by PyTorch, and 463.48 "
        "MiB is reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
        "max_split_size_mb to avoid fragmentation.  See documentation for Memory Management and "
        "PYTORCH_CUDA_ALLOC_CONF",
        (size(55.57, GiB), 12 * GiB, size(9.02, GiB), size(984.52, MiB), size(984.52, MiB) + size(463.48, MiB)),
        "single_allocation",
        id="neurolens-2",
    ),
    pytest.param(  # https://github.com/kerrj/lerf/issues/73
        "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 3.00 GiB. GPU 0 has a total capacty of "
        "23.65 GiB of which 1.66 GiB is free. Including non-PyTorch memory, this process has 20.81 GiB memory in use. "
        "Of the allocated memory 12.09 GiB is allocated by PyTorch, and 4.84 GiB is reserved by PyTorch but "
        "unallocated. If reserved but unallocated memory is large try setting max_split_size_mb to avoid "
        "fragmentation.  See documentation for Memory Management and PYTORCH_CUDA_ALLOC_CONF",
        (3 * GiB, size(23.65, GiB), size(1.66, GiB), size(12.09, GiB), size(12.09, GiB) + size(4.84, GiB)),
        "fragmentation",
        id="lerf-73",
    ),
    pytest.param(  # https://github.com/Synthintel0/MyGirlGPT/issues/11
        "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 32.00 MiB. GPU 0 has a total capacty of "
        "4.00 GiB of which 41.56 MiB is free. Including non-PyTorch memory, this process has 3.44 GiB memory in use. "
        "Of the allocated memory 2.58 GiB is allocated by PyTorch, and 1.90 MiB is reserved by PyTorch but "
        "unallocated. If reserved but unallocated memory is large try setting max_split_size_mb to avoid "
        "fragmentation.  See documentation for Memory Management and PYTORCH_CUDA_ALLOC_CONF.",
        (32 * MiB, 4 * GiB, size(41.56, MiB), size(2.58, GiB), size(2.58, GiB) + size(1.9, MiB)),
        "out_of_memory",
        id="mygirlgpt-11",
    ),
    pytest.param(  # https://github.com/vllm-project/vllm/issues/2140 (a comment; PyTorch 2.1.2)
        "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 518.00 MiB. GPU 0 has a total capacty of "
        "21.67 GiB of which 4.06 MiB is free. Process 2417585 has 21.65 GiB memory in use. Of the allocated memory "
        "21.32 GiB is allocated by PyTorch, and 1018.00 KiB is reserved by PyTorch but unallocated. If reserved but "
        "unallocated memory is large try setting max_split_size_mb to avoid fragmentation.  See documentation for "
        "Memory Management and PYTORCH_CUDA_ALLOC_CONF",
        (518 * MiB, size(21.67, GiB), size(4.06, MiB), size(21.32, GiB), size(21.32, GiB) + 1018 * KiB),
        "out_of_memory",
        id="vllm-2140",
    ),
]

PYTORCH_2_2 = [
    pytest.param(  # https://github.com/murong-xu/CADS/issues/4
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 22.78 GiB. GPU 0 has a total capacity of 31.47 "
        "GiB of which 12.73 GiB is free. Including non-PyTorch memory, this process has 18.73 GiB memory in use. Of "
        "the allocated memory 9.08 GiB is allocated by PyTorch, and 9.35 GiB is reserved by PyTorch but unallocated. "
        "If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to "
        "avoid fragmentation.  See documentation for Memory Management  "
        "(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)",
        (size(22.78, GiB), size(31.47, GiB), size(12.73, GiB), size(9.08, GiB), size(9.08, GiB) + size(9.35, GiB)),
        "single_allocation",
        id="cads-4",
    ),
    pytest.param(  # https://github.com/pytorch/pytorch/issues/16417 (a comment of 2024)
        "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 22.00 MiB. GPU 0 has a total capacity of "
        "23.65 GiB of which 11.06 MiB is free. Including non-PyTorch memory, this process has 23.60 GiB memory in "
        "use. Of the allocated memory 22.90 GiB is allocated by PyTorch, and 194.87 MiB is reserved by PyTorch but "
        "unallocated. If reserved but unallocated memory is large try setting "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory "
        "Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)",
        (22 * MiB, size(23.65, GiB), size(11.06, MiB), size(22.9, GiB), size(22.9, GiB) + size(194.87, MiB)),
        "out_of_memory",
        id="pytorch-16417-2024",
    ),
    pytest.param(  # https://github.com/huggingface/meshgen/issues/7 (more allocated than the GPU has: Windows)
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1002.00 MiB. GPU 0 has a total capacity of "
        "8.00 GiB of which 0 bytes is free. Of the allocated memory 13.98 GiB is allocated by PyTorch, and 129.48 MiB "
        "is reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory "
        "Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)",
        (1002 * MiB, 8 * GiB, 0, size(13.98, GiB), size(13.98, GiB) + size(129.48, MiB)),
        "out_of_memory",
        id="meshgen-7",
    ),
    pytest.param(  # https://github.com/kaito-project/kaito/issues/976 (with private pools, CUDA Graphs)
        "ERROR 04-01 23:46:56 [engine.py:160] torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 546.00 "
        "MiB. GPU 0 has a total capacity of 15.77 GiB of which 514.19 MiB is free. Process 562167 has 15.25 GiB "
        "memory in use. Of the allocated memory 13.73 GiB is allocated by PyTorch, with 46.00 MiB allocated in "
        "private pools (e.g., CUDA Graphs), and 736.86 MiB is reserved by PyTorch but unallocated. If reserved but "
        "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid "
        "fragmentation.  See documentation for Memory Management  "
        "(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)",
        (546 * MiB, size(15.77, GiB), size(514.19, MiB), size(13.73, GiB), size(13.73, GiB) + size(736.86, MiB)),
        "out_of_memory",
        id="kaito-976",
    ),
    pytest.param(  # https://github.com/rhymes-ai/Aria/issues/24 (NVML saw 0 bytes for this process)
        "(VllmWorkerProcess pid=2421) ERROR 10-14 12:32:47 multiproc_worker_utils.py:233] torch.OutOfMemoryError: "
        "CUDA out of memory. Tried to allocate 1.88 GiB. GPU 3 has a total capacity of 21.96 GiB of which 1.29 GiB "
        "is free. Including non-PyTorch memory, this process has 0 bytes memory in use. Of the allocated memory 19.02 "
        "GiB is allocated by PyTorch, and 1.32 GiB is reserved by PyTorch but unallocated.",
        (size(1.88, GiB), size(21.96, GiB), size(1.29, GiB), size(19.02, GiB), size(19.02, GiB) + size(1.32, GiB)),
        "out_of_memory",
        id="aria-24",
    ),
    pytest.param(  # https://github.com/jhc13/taggui/issues/188
        "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of "
        "4.00 GiB of which 2.35 GiB is free. Of the allocated memory 825.15 MiB is allocated by PyTorch, and 24.85 "
        "MiB is reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation. See documentation for Memory "
        "Management",
        (20 * MiB, 4 * GiB, size(2.35, GiB), size(825.15, MiB), size(825.15, MiB) + size(24.85, MiB)),
        "out_of_memory",
        id="taggui-188",
    ),
]


@pytest.mark.parametrize("text, numbers, cause", PYTORCH_1X + PYTORCH_2_0_2_1 + PYTORCH_2_2)
def test_real_messages_are_read_exactly(text, numbers, cause):
    report = explain_oom(text)
    got = (report.requested_bytes, report.total_bytes, report.free_bytes, report.allocated_bytes, report.reserved_bytes)
    assert got == numbers
    assert report.cause == cause
    assert report.missing == () and report.text == text and not report.simulated


def test_sizes_are_the_printed_bytes():
    report = explain_oom(PYTORCH_2_0_2_1[-1].values[0])  # vllm-2140: MiB, GiB and KiB in one message
    assert report.requested_bytes == 543162368  # 518.00 MiB
    assert report.reserved_bytes - report.allocated_bytes == 1042432  # 1018.00 KiB
    assert explain_oom(PYTORCH_2_0_2_1[1].values[0]).free_bytes == 0  # "0 bytes is free"


def test_every_cause_has_a_real_example():
    causes = {row.values[2] for row in PYTORCH_1X + PYTORCH_2_0_2_1 + PYTORCH_2_2}
    assert causes == set(batchlab.oom.CAUSES)


def test_processes_are_read_where_the_message_lists_them():
    # https://github.com/pytorch/pytorch/pull/99699 (the PR that added these lines), wrapped as posted
    text = """torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 138.00 MiB.
GPU 0 has a total capacty of 15.90 GiB of which 8.44 MiB is free.
Process 1246069 has 577.00 MiB memory in use. Including non-PyTorch memory,
this process has 15.32 GiB memory in use. Of the allocated memory
14.12 GiB is allocated by PyTorch, and 410.41 MiB is reserved
by PyTorch but unallocated. If reserved but unallocated memory is large
try setting max_split_size_mb to avoid fragmentation.  See documentation
 for Memory Management and PYTORCH_CUDA_ALLOC_CONF"""
    report = explain_oom(text)
    assert report.process_bytes == size(15.32, GiB)
    assert report.other_processes == ((1246069, 577 * MiB),)
    assert (report.requested_bytes, report.free_bytes) == (138 * MiB, size(8.44, MiB))
    assert report.reserved_bytes == size(14.12, GiB) + size(410.41, MiB)
    assert report.cause == "out_of_memory"  # 410 MiB unused is more than the request but not a tenth of the GPU
    assert "1246069: 577.0 MiB" in str(report)
    kaito = explain_oom(PYTORCH_2_2[3].values[0])  # in a container this process is listed by its host pid
    assert kaito.process_bytes is None and kaito.other_processes == ((562167, size(15.25, GiB)),)
    aria = explain_oom(PYTORCH_2_2[4].values[0])
    assert aria.process_bytes == 0 and aria.other_processes == ()
    old = explain_oom(PYTORCH_1X[0].values[0])  # 1.x messages do not list processes
    assert old.process_bytes is None and old.other_processes is None


def test_other_processes_is_total_minus_free_minus_reserved():
    report = explain_oom(PYTORCH_1X[1].values[0])  # pytorch-40863: 530 MiB reserved of 11.17 GiB, 12.5 MiB free
    assert report.outside_bytes == size(11.17, GiB) - size(12.5, MiB) - 530 * MiB
    assert report.outside_bytes > report.total_bytes / 2
    assert "nvidia-smi" in report.advice[0] and "95%" in report.reason


def test_a_request_of_exactly_half_the_gpu_is_not_a_single_allocation():
    # https://github.com/levihsu/OOTDiffusion/issues/167: 2.00 GiB of a 4.00 GiB GPU, nothing allocated
    report = explain_oom(
        "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacty of "
        "4.00 GiB of which 2.80 GiB is free. Of the allocated memory 0 bytes is allocated by PyTorch, and 0 bytes is "
        "reserved by PyTorch but unallocated."
    )
    assert (report.requested_bytes, report.total_bytes, report.allocated_bytes, report.reserved_bytes) == (
        2 * GiB,
        4 * GiB,
        0,
        0,
    )
    assert report.cause == "out_of_memory"
    assert any("at least the request" in note for note in report.notes)  # 2.80 GiB free, yet it failed


def test_the_first_cause_that_holds_wins():
    # Made up to hold for every rule: 3 GiB asked of 4 GiB; 3.5 GiB outside; 0.4 GiB reserved, none used.
    text = (
        "CUDA out of memory. Tried to allocate 3.00 GiB (GPU 0; 4.00 GiB total capacity; 0 bytes already "
        "allocated; 100.00 MiB free; 400.00 MiB reserved in total by PyTorch)"
    )
    assert explain_oom(text).cause == "single_allocation"
    assert explain_oom(text.replace("3.00 GiB (", "300.00 MiB (")).cause == "other_processes"
    fragmented = (
        "CUDA out of memory. Tried to allocate 300.00 MiB (GPU 0; 4.00 GiB total capacity; 1.00 GiB "
        "already allocated; 100.00 MiB free; 3.50 GiB reserved in total by PyTorch)"
    )
    assert explain_oom(fragmented).cause == "fragmentation"


def test_missing_numbers_skip_their_rules_and_are_named():
    # https://github.com/Morizeyao/GPT2-Chinese/issues/215 (a comment that pasted only the parenthesis)
    report = explain_oom(
        "(GPU 0; 15.75 GiB total capacity; 79.11 MiB already allocated; 3.62 MiB free; 86.00 MiB "
        "reserved in total by PyTorch)"
    )
    assert report.requested_bytes is None and report.missing == ("requested",)
    assert report.cause == "other_processes"  # checked without the request: 15.6 GiB held elsewhere
    assert any(note.startswith("single_allocation was not checked") for note in report.notes)
    assert len(report.notes) == 1  # the rules after the first that holds are not needed
    assert "Not in the message: requested" in str(report)
    # https://stackoverflow.com/questions/54374935/how-can-i-fix-this-strange-error-runtimeerror-cuda-error-out-of-memory
    bare = explain_oom("RuntimeError: CUDA error: out of memory")
    assert bare.missing == ("requested", "total", "free", "allocated", "reserved")
    assert bare.cause == "out_of_memory" and len(bare.notes) == 3 and "too few numbers" in bare.reason


def test_a_memory_fraction_is_the_gpu_the_rules_measure_against():
    # The 1.x wording with PyTorch's "X allowed; " (set_per_process_memory_fraction); the allowed and reserved
    # numbers are those quoted in https://github.com/pytorch/pytorch/issues/111729, the rest made up.
    text = (
        "CUDA out of memory. Tried to allocate 3.00 GiB (GPU 0; 12.20 GiB total capacity; 4.50 GiB already "
        "allocated; 7.20 GiB free; 4.77 GiB allowed; 4.74 GiB reserved in total by PyTorch)"
    )
    report = explain_oom(text)
    assert report.allowed_bytes == size(4.77, GiB) and report.reserved_bytes == size(4.74, GiB)
    assert report.cause == "single_allocation"  # 3 GiB is less than half of 12.2 GiB, but more than half of 4.77
    assert any("set_per_process_memory_fraction" in note for note in report.notes)
    assert "(4.77 GiB allowed)" in str(report)
    # The same in the 2.2+ wording, pieced together from the strings of torch 2.14's libc10_cuda.so.
    current = (
        "CUDA out of memory. Tried to allocate 3.00 GiB. GPU 0 has a total capacity of 12.20 GiB of which "
        "7.20 GiB is free. Including non-PyTorch memory, this process has 5.10 GiB memory in use. 4.77 GiB "
        "allowed; Of the allocated memory 4.50 GiB is allocated by PyTorch, and 245.76 MiB is reserved by "
        "PyTorch but unallocated. If reserved but unallocated memory is large try setting "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation."
    )
    report = explain_oom(current)
    assert report.allowed_bytes == size(4.77, GiB) and report.process_bytes == size(5.1, GiB)
    assert report.reserved_bytes == size(4.5, GiB) + size(245.76, MiB) and report.cause == "single_allocation"


def test_apple_mps_messages_give_what_they_have():
    # https://github.com/Comfy-Org/ComfyUI/issues/7440 (newer MPS wording, in GiB; "max allowed" is its limit)
    report = explain_oom(
        "MPS backend out of memory (MPS allocated: 9.57 GiB, other allocations: 17.35 GiB, max allowed: 27.20 GiB). "
        "Tried to allocate 292.50 MiB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper "
        "limit for memory allocations (may cause system failure)."
    )
    assert (report.requested_bytes, report.total_bytes, report.allocated_bytes) == (
        size(292.5, MiB),
        size(27.2, GiB),
        size(9.57, GiB),
    )
    assert report.missing == ("free", "reserved") and report.cause == "out_of_memory"


def test_numbers_that_exceed_the_gpu_get_a_note():
    report = explain_oom(PYTORCH_2_2[2].values[0])  # meshgen-7: 14.11 GiB held on an 8 GiB GPU
    assert any("shared GPU memory" in note for note in report.notes)
    assert report.outside_bytes < 0


@pytest.mark.parametrize("text, numbers, cause", PYTORCH_1X[:1] + PYTORCH_2_0_2_1[:1] + PYTORCH_2_2[:1])
def test_exceptions_are_read_like_their_text(text, numbers, cause):
    assert explain_oom(torch.OutOfMemoryError(text)).requested_bytes == numbers[0]
    assert explain_oom(RuntimeError(text)).cause == cause  # PyTorch 1.x raised RuntimeError


@pytest.mark.parametrize("text, numbers, cause", [PYTORCH_1X[4], PYTORCH_1X[1], PYTORCH_1X[3], PYTORCH_1X[0]])
def test_the_advice_is_ordered_and_names_a_chapter_in_every_step(text, numbers, cause):
    report = explain_oom(text)
    assert report.cause == cause and len(report.advice) >= 2
    assert all("chapter" in step.lower() for step in report.advice)
    text = str(report)
    assert text.startswith(f"Out of memory (GPU): cause {report.cause!r}") and repr(report) == text
    for i, step in enumerate(report.advice, 1):
        assert f"  {i}. {step}" in text


def test_the_ladder_goes_from_batch_to_optimizer():
    advice = explain_oom(PYTORCH_1X[0].values[0]).advice
    order = ["leak_check", "max_batch_size", "accumulation_steps", 'precision="bf16"', "checkpoint", "make_optimizer"]
    positions = [next(i for i, step in enumerate(advice) if key in step) for key in order]
    assert positions == sorted(positions)
    fragmented = explain_oom(PYTORCH_1X[3].values[0]).advice
    assert "expandable_segments:True" in fragmented[0]
    assert "attention" in explain_oom(PYTORCH_1X[4].values[0]).advice[0]


# -- batchlab's own simulated errors ---------------------------------------------------------------


def test_memory_budget_error():
    model = batchlab.build_model("cnn_bn", in_shape=(3, 32, 32), num_classes=5)
    with batchlab.memory_budget("40MiB", model) as tracker:
        with pytest.raises(torch.OutOfMemoryError) as caught:
            model(torch.randn(512, 3, 32, 32))
        in_use = tracker.current_bytes
        report = explain_oom(caught.value)
        del caught
    assert report.simulated and str(report).startswith("Out of memory (simulated GPU budget)")
    assert report.requested_bytes == 64 * MiB and report.total_bytes == 40 * MiB
    assert report.allocated_bytes == size(round(in_use / MiB, 2), MiB)
    assert report.reserved_bytes == report.allocated_bytes  # memory_budget counts tensors only: no cache
    assert report.free_bytes == size(round((40 * MiB - in_use) / MiB, 2), MiB)
    assert report.cause == "single_allocation"  # the first convolution's 64 MiB output, in a 40 MiB budget


def test_the_cuda_like_simulated_wording_reads_the_same():
    # memory_budget's and the CPU estimator's messages as they read once they open with CUDA's words.
    budget = (
        "CUDA out of memory. Tried to allocate 64.00 MiB. (Simulated by batchlab.memory_budget: the tensors "
        "would pass its budget; no GPU ran out of memory.) Of the 40.00 MiB budget, 8.08 MiB is in use by "
        "tensors (parameters 2.08 MiB, buffers 0.00 MiB, inputs 6.00 MiB) and 31.92 MiB is free. The 64.00 "
        "MiB were not allocated. Free memory outside the except block, then try a smaller batch or gradient "
        "accumulation (chapter 6)."
    )
    report = explain_oom(budget)
    assert (report.requested_bytes, report.total_bytes, report.allocated_bytes, report.free_bytes) == (
        64 * MiB,
        40 * MiB,
        size(8.08, MiB),
        size(31.92, MiB),
    )
    assert report.simulated and report.cause == "single_allocation"
    estimate = (
        "CUDA out of memory. (Simulated by batchlab.estimate_memory for device 'cpu': the step needs "
        "316.16 MiB of tensors at its peak, more than the 20.00 MiB budget; no GPU ran out of memory.)"
    )
    report = explain_oom(estimate)
    assert (report.needed_bytes, report.total_bytes, report.requested_bytes) == (size(316.16, MiB), 20 * MiB, None)
    assert report.simulated and report.cause == "out_of_memory" and "15.81 times" in report.reason


def test_cpu_estimator_error():
    model = batchlab.build_model("cnn_bn", in_shape=(3, 32, 32), num_classes=5)
    batch = torch.randn(256, 3, 32, 32), torch.randint(0, 5, (256,))
    with pytest.raises(torch.OutOfMemoryError) as caught:
        batchlab.estimate_memory(model, batch, device="cpu", budget="8MiB")
    report = explain_oom(caught.value)
    assert report.simulated and report.total_bytes == 8 * MiB
    assert report.needed_bytes is not None and report.needed_bytes > 8 * MiB
    assert report.cause == "out_of_memory" and report.missing == ("requested", "free", "allocated", "reserved")


def test_gpu_estimator_and_simulated_allocator_errors():
    model = batchlab.build_model("cnn_bn", in_shape=(3, 32, 32), num_classes=5)
    batch = torch.empty(4096, 3, 32, 32, device="meta"), torch.zeros(4096, dtype=torch.long, device="meta")
    with pytest.raises(torch.OutOfMemoryError) as caught:
        batchlab.estimate_memory(model, batch, budget="256MiB")  # a CUDA estimate replays the caching allocator
    report = explain_oom(caught.value)
    assert report.simulated and report.total_bytes == 256 * MiB
    assert report.free_bytes == report.total_bytes - report.reserved_bytes  # nothing else shares the budget
    assert report.outside_bytes == 0 and report.missing == ()
    allocator = CachingAllocator(budget=64 * MiB)
    allocator.malloc(40 * MiB)
    with pytest.raises(torch.OutOfMemoryError) as caught:
        allocator.malloc(30 * MiB)
    report = explain_oom(caught.value)
    assert (report.requested_bytes, report.allocated_bytes, report.reserved_bytes, report.total_bytes) == (
        30 * MiB,
        40 * MiB,
        40 * MiB,
        64 * MiB,
    )
    assert report.free_bytes == 24 * MiB and report.cause == "out_of_memory"


# -- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello",
        "RuntimeError: Expected all tensors to be on the same device",
        "CUDA error: device-side assert triggered",
    ],
)
def test_text_that_is_not_an_out_of_memory_message_is_refused(text):
    with pytest.raises(ValueError, match="error must be an out-of-memory error or its message.*got"):
        explain_oom(text)
    with pytest.raises(ValueError, match="Tried to allocate"):  # it shows what it expected
        explain_oom(RuntimeError(text))


def test_an_out_of_memory_error_without_a_message_is_still_read():
    report = explain_oom(torch.OutOfMemoryError())
    assert report.cause == "out_of_memory" and len(report.missing) == 5
    with pytest.raises(ValueError, match=r"got RuntimeError\('hello'\)"):
        explain_oom(RuntimeError("hello"))


def test_a_long_non_message_is_shown_shortened():
    with pytest.raises(ValueError) as caught:
        explain_oom("x" * 1000)
    assert "x" * 117 + "..." in str(caught.value) and "x" * 200 not in str(caught.value)


@pytest.mark.parametrize("value", [42, None, 2.5, b"CUDA out of memory.", ["CUDA out of memory."]])
def test_what_is_neither_text_nor_an_exception_is_a_type_error(value):
    with pytest.raises(TypeError, match=r"error must be an exception .* or its message as a str, got"):
        explain_oom(value)


def test_the_report_is_exported():
    assert batchlab.explain_oom is explain_oom and batchlab.OOMReport is OOMReport
    assert {"explain_oom", "OOMReport"} <= set(batchlab.__all__)


# -- generated messages: every wording, sizes in every unit ------------------------------------------


def printed(nbytes):
    """A size as PyTorch's format_size prints it (c10/cuda/CUDACachingAllocator.cpp)."""
    if nbytes <= 1024:
        return f"{nbytes} bytes"
    if nbytes <= 2**20:
        return f"{nbytes / KiB:.2f} KiB"
    if nbytes <= 2**30:
        return f"{nbytes / MiB:.2f} MiB"
    return f"{nbytes / GiB:.2f} GiB"


def read_back(text):
    """What a printed size stands for, in bytes."""
    number, unit = text.split()
    return round(float(number) * {"bytes": 1, "KiB": KiB, "MiB": MiB, "GiB": GiB}[unit])


WORDINGS = {
    "1.x": "RuntimeError: CUDA out of memory. Tried to allocate {req} (GPU 0; {total} total capacity; {alloc} already "
    "allocated; {free} free; {reserved} reserved in total by PyTorch)",
    "2.1": "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate {req}. GPU 0 has a total capacty of "
    "{total} of which {free} is free. Including non-PyTorch memory, this process has {process} memory in "
    "use. Of the allocated memory {alloc} is allocated by PyTorch, and {unalloc} is reserved by PyTorch but "
    "unallocated. If reserved but unallocated memory is large try setting max_split_size_mb to avoid "
    "fragmentation.  See documentation for Memory Management and PYTORCH_CUDA_ALLOC_CONF",
    "2.2": "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate {req}. GPU 0 has a total capacity of "
    "{total} of which {free} is free. Process 4242 has {other} memory in use. Including non-PyTorch memory, "
    "this process has {process} memory in use. Of the allocated memory {alloc} is allocated by PyTorch, and "
    "{unalloc} is reserved by PyTorch but unallocated. If reserved but unallocated memory is large try "
    "setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.",
}


def expected_cause(req, total, free, alloc, reserved):
    """The checklist's rules, written out again from issue 13's wording, as the oracle."""
    if req > total / 2:
        return "single_allocation"
    if total - free - reserved > total / 2:
        return "other_processes"
    if reserved - alloc >= req and reserved - alloc >= total / 10:
        return "fragmentation"
    return "out_of_memory"


@pytest.mark.parametrize("wording", sorted(WORDINGS))
def test_generated_messages_read_back_exactly(wording):
    import random

    rng = random.Random(13)
    causes = set()
    for _ in range(300):
        total = rng.choice([2 * GiB, 4 * GiB, 8 * GiB, 24 * GiB, 80 * GiB]) - rng.randrange(0, 400 * MiB)
        alloc = rng.randrange(0, total)
        unalloc = rng.choice([0, rng.randrange(0, 2048), rng.randrange(0, 2 * MiB), rng.randrange(0, total - alloc)])
        other = rng.randrange(0, max(total - alloc - unalloc, 1))
        free = total - alloc - unalloc - other
        req = rng.choice([512, rng.randrange(1, 2 * MiB), rng.randrange(1, total), rng.randrange(total, 4 * total)])
        fields = {
            "req": printed(req),
            "total": printed(total),
            "free": printed(free),
            "alloc": printed(alloc),
            "unalloc": printed(unalloc),
            "reserved": printed(alloc + unalloc),
            "process": printed(alloc + unalloc + 300 * MiB),
            "other": printed(other),
        }
        report = explain_oom(WORDINGS[wording].format(**fields))
        r, t, f, a = (read_back(fields[k]) for k in ("req", "total", "free", "alloc"))
        reserved = read_back(fields["reserved"]) if wording == "1.x" else a + read_back(fields["unalloc"])
        assert (
            report.requested_bytes,
            report.total_bytes,
            report.free_bytes,
            report.allocated_bytes,
            report.reserved_bytes,
        ) == (r, t, f, a, reserved)
        assert report.cause == expected_cause(r, t, f, a, reserved)
        if wording == "2.2":
            assert report.other_processes == ((4242, read_back(fields["other"])),)
        causes.add(report.cause)
    assert causes == set(batchlab.oom.CAUSES)  # the draws reach every branch
