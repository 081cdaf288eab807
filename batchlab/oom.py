"""Reading an out-of-memory error: its numbers, its cause and what to do (chapter 9's checklist).

:func:`explain_oom` takes a ``torch.OutOfMemoryError`` (from a real GPU, from ``batchlab.memory_budget``,
from ``batchlab.estimate_memory(budget=...)`` or from the simulated ``CachingAllocator``) or the text of
the message as any PyTorch version printed it, and returns an :class:`OOMReport`. The messages changed
over the years, so each number is looked for in each of its wordings:

* PyTorch 1.x: ``Tried to allocate 20.00 MiB (GPU 0; 4.00 GiB total capacity; 3.42 GiB already
  allocated; 0 bytes free; 3.47 GiB reserved in total by PyTorch)``. Before 1.4 the last number was
  ``W cached``, the reserved memory that no tensor used (PyTorch printed reserved minus allocated).
* PyTorch 2.0-2.1: the same, or ``GPU 0 has a total capacty of ...`` (sic), with the advice to set
  ``max_split_size_mb``.
* PyTorch 2.2 and later: ``GPU 0 has a total capacity of X of which Y is free. Process N has ... memory
  in use. Including non-PyTorch memory, this process has ... memory in use. Of the allocated memory A is
  allocated by PyTorch, and U is reserved by PyTorch but unallocated.``

Sizes are printed by PyTorch with two decimals in bytes, KiB, MiB or GiB (powers of 1024); the report
holds them in bytes, as printed (so ``20.00 MiB`` is 20971520 bytes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .validation import GiB, KiB, MiB, format_bytes

CAUSES = ("single_allocation", "other_processes", "fragmentation", "out_of_memory")

_UNIT = {"bytes": 1, "byte": 1, "b": 1, "kib": KiB, "mib": MiB, "gib": GiB, "tib": 1024 * GiB}
_SIZE = r"(\d+(?:\.\d+)?) ?(bytes|byte|B|KiB|MiB|GiB|TiB)\b"

# Each number, in every wording that some version (or batchlab's simulation) printed; the first that
# matches gives it.
_PATTERNS = {
    "requested": [rf"Tried to allocate {_SIZE}"],
    "total": [
        rf"total capaci?ty of {_SIZE}",
        rf"{_SIZE} total capaci?ty",
        rf"Of the {_SIZE} budget",
        rf"of a {_SIZE} budget",
        rf"more than the {_SIZE} budget",
        rf"max allowed: {_SIZE}",
    ],  # the last: Apple's MPS backend
    "free": [rf"of which {_SIZE} is free", rf"{_SIZE} (?:is )?free\b"],
    "allocated": [
        rf"Of the allocated memory {_SIZE} is allocated by PyTorch",
        rf"{_SIZE} already allocated",
        rf"{_SIZE} is in use by tensors",
        rf"{_SIZE} is allocated by tensors",
        rf"MPS allocated: {_SIZE}",
    ],
    "reserved": [rf"{_SIZE} reserved in total by PyTorch", rf"{_SIZE} reserved, of a"],
    "unallocated": [rf"{_SIZE} is reserved by PyTorch but unallocated", rf"{_SIZE} cached\b"],
    "allowed": [rf"{_SIZE} allowed"],
    "process": [rf"this process has {_SIZE} memory in use"],
    "needed": [rf"needs {_SIZE} of tensors at its peak"],
}
_PROCESS = re.compile(rf"Process (\d+) has {_SIZE} memory in use")
_CORE = ("requested", "total", "free", "allocated", "reserved")

# The ladder for a process whose own tensors fill the GPU, cheapest change first.
_LADDER = (
    "If it failed after some steps rather than at the first, look for a leak first: chapter 5, "
    "batchlab.leak_check(...) (add loss.item(), not the loss tensor; evaluate under torch.no_grad()).",
    "Use a smaller micro-batch: chapter 4, batchlab.max_batch_size(...) estimates the largest that fits, "
    "batchlab.probe_batch_size(...) probes it.",
    "Keep the effective batch with gradient accumulation: chapter 6, batchlab.train(..., accumulation_steps=k) "
    "runs k micro-batches per optimizer step.",
    'Store activations in half the bytes: chapter 8, mixed precision, batchlab.train(..., precision="bf16").',
    "Recompute activations instead of keeping them: chapter 8, activation checkpointing "
    "(torch.utils.checkpoint), about sqrt(n) segments for n layers.",
    "Shrink the optimizer's state: chapter 8, optimizer memory (batchlab.make_optimizer): SGD keeps no extra "
    "copy per parameter (one with momentum), Adam keeps two.",
)


@dataclass(repr=False)
class OOMReport:
    """What an out-of-memory message says, in bytes, and what to do about it (see :func:`explain_oom`).

    ``reserved_bytes`` is everything PyTorch's caching allocator holds (allocated plus reserved but
    unallocated). ``process_bytes`` (this process, PyTorch and other libraries and the CUDA context) and
    ``other_processes`` (``(pid, bytes)`` pairs) only appear in PyTorch 2.1+ messages; in a container this
    process itself can be listed as "Process N". A number the message did not give is ``None`` and named
    in ``missing``; the rules that need it are skipped (``notes`` says which).
    """

    requested_bytes: int | None
    total_bytes: int | None
    free_bytes: int | None
    allocated_bytes: int | None
    reserved_bytes: int | None
    process_bytes: int | None
    other_processes: tuple | None
    cause: str
    reason: str
    advice: tuple
    missing: tuple
    notes: tuple
    simulated: bool
    text: str
    allowed_bytes: int | None = None
    needed_bytes: int | None = None

    @property
    def unallocated_bytes(self) -> int | None:
        """Reserved by PyTorch but holding no tensor (the cache): reserved minus allocated."""
        if self.reserved_bytes is None or self.allocated_bytes is None:
            return None
        return self.reserved_bytes - self.allocated_bytes

    @property
    def outside_bytes(self) -> int | None:
        """Held on the GPU outside PyTorch's reservation: total minus free minus reserved."""
        if None in (self.total_bytes, self.free_bytes, self.reserved_bytes):
            return None
        return self.total_bytes - self.free_bytes - self.reserved_bytes

    def __str__(self) -> str:
        def size(n):
            return "not given" if n is None else format_bytes(n)

        where = "simulated GPU budget" if self.simulated else "GPU"
        lines = [
            f"Out of memory ({where}): cause {self.cause!r}",
            f"  requested      {size(self.requested_bytes)}",
            f"  total          {size(self.total_bytes)}"
            + (f" ({format_bytes(self.allowed_bytes)} allowed)" if self.allowed_bytes is not None else ""),
            f"  free           {size(self.free_bytes)}",
            f"  allocated      {size(self.allocated_bytes)} (tensors)",
            f"  reserved       {size(self.reserved_bytes)}"
            + (
                f" (all PyTorch holds; {format_bytes(self.unallocated_bytes)} of it unallocated)"
                if self.unallocated_bytes is not None
                else ""
            ),
            f"  outside        {size(self.outside_bytes)}"
            + (" (total - free - reserved)" if self.outside_bytes is not None else ""),
        ]
        if self.needed_bytes is not None:
            lines.append(f"  step needs     {size(self.needed_bytes)} at its peak")
        if self.process_bytes is not None:
            lines.append(f"  this process   {size(self.process_bytes)} (with non-PyTorch memory)")
        if self.other_processes:
            listed = ", ".join(f"{pid}: {format_bytes(n)}" for pid, n in self.other_processes)
            lines.append(f"  processes      {listed}")
        lines.append(f"Why: {self.reason}")
        lines.append("What to do:")
        lines += [f"  {i}. {step}" for i, step in enumerate(self.advice, 1)]
        if self.missing:
            lines.append(f"Not in the message: {', '.join(self.missing)}")
        lines += [f"Note: {note}" for note in self.notes]
        return "\n".join(lines)

    __repr__ = __str__


def explain_oom(error) -> OOMReport:
    """Read an out-of-memory error: its numbers in bytes, its cause and the actions that help, in order.

    ``error`` is the exception (``torch.OutOfMemoryError``, or the ``RuntimeError`` PyTorch 1.x raised) or
    its message text. The cause is the first of these that holds (chapter 9's checklist):

    1. ``"single_allocation"``: the request is more than half the GPU; shrink that one tensor.
    2. ``"other_processes"``: more than half the GPU is held outside PyTorch's reservation
       (total - free - reserved): another process or library; find it and stop it.
    3. ``"fragmentation"``: what PyTorch reserved but does not use is at least the request and at least
       a tenth of the GPU; expandable segments, freeing between phases.
    4. ``"out_of_memory"``: otherwise, this process's tensors fill the GPU: the ladder of batch,
       accumulation, precision, checkpointing and optimizer.
    """
    text = _message_of(error)
    flat = " ".join(text.split())  # forum posts wrap the message over several lines
    found = {name: _find(flat, patterns) for name, patterns in _PATTERNS.items()}
    processes = tuple((int(pid), _bytes(number, unit)) for pid, number, unit in _PROCESS.findall(flat))
    recognised = "out of memory" in flat.lower() or any(found[name] is not None for name in _CORE)
    if not recognised and not isinstance(error, torch.OutOfMemoryError):
        shown = repr(flat if len(flat) <= 120 else flat[:117] + "...")
        if isinstance(error, BaseException):
            shown = f"{type(error).__name__}({shown})"
        raise ValueError(
            f"error must be an out-of-memory error or its message, such as 'CUDA out of memory. Tried to allocate "
            f"20.00 MiB (GPU 0; 4.00 GiB total capacity; ...)' or '... GPU 0 has a total capacity of 4.00 GiB of "
            f"which 0 bytes is free ...', got {shown}"
        )
    simulated = "simulated" in flat.lower()
    _fill_simulated(flat, found)
    if found["reserved"] is None and None not in (found["allocated"], found["unallocated"]):
        found["reserved"] = found["allocated"] + found["unallocated"]
    cause, reason, skipped = _cause(found, "budget" if simulated else "GPU")
    missing = tuple(name for name in _CORE if found[name] is None)
    notes = list(skipped) + _notes(found)
    return OOMReport(
        requested_bytes=found["requested"],
        total_bytes=found["total"],
        free_bytes=found["free"],
        allocated_bytes=found["allocated"],
        reserved_bytes=found["reserved"],
        process_bytes=found["process"],
        other_processes=processes if processes or found["process"] is not None else None,
        cause=cause,
        reason=reason,
        advice=_advice(cause, found, processes),
        missing=missing,
        notes=tuple(notes),
        simulated=simulated,
        text=text,
        allowed_bytes=found["allowed"],
        needed_bytes=found["needed"],
    )


def _message_of(error) -> str:
    if isinstance(error, str):
        return error
    if isinstance(error, BaseException):
        return str(error)
    raise TypeError(
        f"error must be an exception (e.g. torch.OutOfMemoryError) or its message as a str, "
        f"got {error!r} ({type(error).__name__})"
    )


def _bytes(number: str, unit: str) -> int:
    return round(float(number) * _UNIT[unit.lower()])


def _find(text: str, patterns) -> int | None:
    for pattern in patterns:
        match = re.search(pattern, text, flags=re.IGNORECASE)
        if match:
            return _bytes(*match.groups())
    return None


def _fill_simulated(text: str, found: dict) -> None:
    """What batchlab's simulations leave unsaid because it follows from how they count."""
    if re.search(r"in use by tensors", text) and found["reserved"] is None:
        found["reserved"] = found["allocated"]  # memory_budget counts live tensors only: nothing is cached
    if re.search(r"reserved, of a .* budget", text) and found["free"] is None and found["total"] is not None:
        found["free"] = found["total"] - found["reserved"]  # the simulated allocator shares its budget with no one


def _cause(found: dict, device: str):
    """The first cause that holds, why, and the rules that could not be checked for want of a number."""
    requested, total, free, allocated, reserved = (found[name] for name in _CORE)
    gpu = min(total, found["allowed"]) if total is not None and found["allowed"] is not None else total
    skipped = []
    if None in (requested, gpu):
        skipped.append(
            "single_allocation was not checked: the message gives no " + _names_missing(request=requested, total=gpu)
        )
    elif requested > gpu / 2:
        return (
            "single_allocation",
            f"one request of {format_bytes(requested)} is more than half the "
            f"{format_bytes(gpu)} {device} ({requested / gpu:.0%} of it): shrink that one tensor; a "
            f"smaller batch helps only as far as that tensor grows with the batch",
            skipped,
        )
    if None in (total, free, reserved):
        skipped.append(
            "other_processes was not checked: the message gives no "
            + _names_missing(total=total, free=free, reserved=reserved)
        )
    elif total - free - reserved > total / 2:
        outside = total - free - reserved
        reason = (
            f"{format_bytes(outside)} of the {format_bytes(total)} {device} ({outside / total:.0%}) "
            f"is held outside this process's PyTorch reservation (total - free - reserved)"
        )
        if found["process"] is not None:
            mine = max(found["process"] - reserved, 0)
            reason += (
                f": {format_bytes(mine)} by this process outside PyTorch (CUDA context, other libraries), "
                f"{format_bytes(max(outside - mine, 0))} by other processes"
            )
        else:
            reason += ": other processes, or another library in this one"
        return "other_processes", reason, skipped
    if None in (requested, gpu, allocated, reserved):
        skipped.append(
            "fragmentation was not checked: the message gives no "
            + _names_missing(request=requested, total=gpu, allocated=allocated, reserved=reserved)
        )
    elif reserved - allocated >= requested and reserved - allocated >= gpu / 10:
        return (
            "fragmentation",
            f"PyTorch reserved {format_bytes(reserved - allocated)} that no tensor uses, "
            f"at least the {format_bytes(requested)} request and a tenth of the {device}, yet found no "
            f"block for it: the cache is fragmented",
            skipped,
        )
    if allocated is not None:
        reason = f"this process's tensors ({format_bytes(allocated)}) fill the memory: the step must need less"
    elif found["needed"] is not None:
        needed = found["needed"]
        times = f", {needed / total:.2f} times the {format_bytes(total)} {device}" if total else ""
        reason = f"the step needs {format_bytes(needed)} at its peak{times}: it must need less"
    else:
        reason = (
            "the message gives too few numbers to tell the causes apart; the usual one is that this "
            "process's tensors fill the memory"
        )
    return "out_of_memory", reason, skipped


def _names_missing(**numbers) -> str:
    return " or ".join(name for name, value in numbers.items() if value is None)


def _notes(found: dict) -> list:
    """Notes on numbers that do not add up the way the checklist's rules assume."""
    total, reserved, requested, free = found["total"], found["reserved"], found["requested"], found["free"]
    notes = []
    if requested is not None and free is not None and free >= requested:
        notes.append(
            f"the GPU reported {format_bytes(free)} free, at least the request: the allocator asks the "
            f"driver for a whole segment (rounded up), the free memory may be in pieces, or a memory "
            f"fraction (torch.cuda.set_per_process_memory_fraction) limits this process"
        )
    if found["allowed"] is not None:
        notes.append(
            f"this process may use only {format_bytes(found['allowed'])} of the GPU "
            f"(torch.cuda.set_per_process_memory_fraction): the rules measure against that; raise the "
            f"fraction if the GPU has room"
        )
    held = max((n for n in (found["allocated"], reserved) if n is not None), default=None)
    if total is not None and held is not None and held > total:
        notes.append(
            f"PyTorch holds {format_bytes(held)}, more than the {format_bytes(total)} total: the driver "
            f"is lending it system memory (Windows' shared GPU memory), much slower than the GPU's own"
        )
    return notes


def _advice(cause: str, found: dict, processes: tuple) -> tuple:
    requested = found["requested"]
    if cause == "single_allocation":
        return (
            f"Shrink the one tensor of {format_bytes(requested)}: shorter sequences, a lower resolution, a "
            f"memory-efficient attention kernel (torch.nn.functional.scaled_dot_product_attention), logits "
            f"computed in chunks. Chapter 4, batchlab.estimate_memory(...) shows in which phase and category "
            f"the peak is, so you know which tensor it is.",
            "Halve its bytes if it is an activation: chapter 8, mixed precision, batchlab.train(..., "
            'precision="bf16").',
            "Then fit the batch to what is left: chapter 4, batchlab.max_batch_size(...).",
        )
    if cause == "other_processes":
        listed = ""
        if processes:
            listed = (
                " The message lists " + ", ".join(f"process {pid} with {format_bytes(n)}" for pid, n in processes) + "."
            )
        return (
            "Find what holds the memory with nvidia-smi and stop it: often another notebook's kernel (shut it "
            "down) or another library in this process. Chapter 4, the caching allocator, explains why "
            "nvidia-smi shows more than torch.cuda.memory_reserved()." + listed,
            "Measure what is really free before you choose a batch: torch.cuda.mem_get_info(), then pass it as "
            "the budget to chapter 4's batchlab.max_batch_size(...).",
        )
    if cause == "fragmentation":
        return (
            "Let the allocator grow segments instead of splitting them: set "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before torch first uses the GPU. Chapter 4, the "
            "caching allocator (batchlab.allocator.CachingAllocator), shows how blocks split and stay reserved.",
            "Free between phases: del what you no longer need (outputs, losses kept as tensors) before evaluation "
            "and before the next step, then torch.cuda.empty_cache(); chapter 5, batchlab.leak_check(...), finds "
            "what stays alive.",
        ) + _LADDER[1:3]
    return _LADDER
