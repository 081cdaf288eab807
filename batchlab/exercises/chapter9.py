"""Chapter 9 (case study): read three out-of-memory messages, plan another model on another GPU.

The three messages are written in the three forms PyTorch printed over the years (1.x, 2.0-2.1 and
2.2+); their numbers are made up for the exercise, and each one has a different cause of
:data:`batchlab.oom.CAUSES`. The checks compute the answers with :func:`batchlab.explain_oom` and
:func:`batchlab.estimate_memory`, so they agree with what the chapter shows.
"""

from __future__ import annotations

import torch

from ..estimate import CUDA_CONSTANTS, estimate_memory
from ..models import build_model
from ..oom import CAUSES, explain_oom
from ..plan import FitPlan
from ..validation import GiB, format_bytes
from .turn import your_turn

OOM_MESSAGES = (
    # A: PyTorch 2.0, with the max_split_size_mb advice of those versions.
    "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.20 GiB (GPU 0; 10.75 GiB total "
    "capacity; 6.02 GiB already allocated; 980.12 MiB free; 9.61 GiB reserved in total by PyTorch) If reserved "
    "memory is >> allocated memory try setting max_split_size_mb to avoid fragmentation.  See documentation for "
    "Memory Management and PYTORCH_CUDA_ALLOC_CONF",
    # B: PyTorch 1.x.
    "RuntimeError: CUDA out of memory. Tried to allocate 9.00 GiB (GPU 0; 15.78 GiB total capacity; 2.10 GiB "
    "already allocated; 12.90 GiB free; 2.15 GiB reserved in total by PyTorch)",
    # C: PyTorch 2.2 and later.
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 256.00 MiB. GPU 0 has a total capacity of "
    "23.65 GiB of which 118.56 MiB is free. Process 4121 has 15.20 GiB memory in use. Including non-PyTorch "
    "memory, this process has 8.32 GiB memory in use. Of the allocated memory 7.41 GiB is allocated by PyTorch, "
    "and 152.37 MiB is reserved by PyTorch but unallocated. If reserved but unallocated memory is large try "
    "setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.",
)
_RULES = {
    "single_allocation": "is the request more than half the GPU?",
    "other_processes": "is more than half the GPU held outside PyTorch's reservation (total - free - reserved)?",
    "fragmentation": "is the reserved-but-unallocated memory at least the request and a tenth of the GPU?",
    "out_of_memory": "none of the three rules above holds",
}


def check_oom_causes(answers, *, messages=OOM_MESSAGES):
    """Chapter 9: the cause of each message of ``messages`` (default :data:`OOM_MESSAGES`), in order."""
    labels = [chr(ord("A") + i) for i in range(len(messages))]
    if your_turn(
        f"name the cause of each of the messages {', '.join(labels)}: a list of {len(messages)} of "
        f"{', '.join(repr(c) for c in CAUSES)}.",
        answers,
    ):
        return
    if not isinstance(answers, (list, tuple)) or len(answers) != len(messages):
        raise ValueError(
            f"answers must be a list of {len(messages)} causes, one per message ({', '.join(labels)}), got {answers!r}"
        )
    unknown = [a for a in answers if a not in CAUSES]
    if unknown:
        raise ValueError(f"each cause must be one of {', '.join(repr(c) for c in CAUSES)}, got {unknown!r}")
    expected = [explain_oom(message).cause for message in messages]
    wrong = [label for label, a, e in zip(labels, answers, expected) if a != e]
    assert not wrong, (
        f"message{'s' if len(wrong) > 1 else ''} {', '.join(wrong)}: not right. Turn every number into bytes (the "
        "2.2+ form gives reserved as allocated plus 'reserved but unallocated'), then ask the checklist's questions "
        "in order and stop at the first that holds: " + " ".join(f"({i}) {_RULES[c]}" for i, c in enumerate(CAUSES, 1))
    )
    print("Correct:")
    for label, cause in zip(labels, expected):
        print(f"  {label}: {cause} ({_RULES[cause]})" if cause != "out_of_memory" else f"  {label}: {cause}")


def check_plan(
    plan,
    *,
    model_name: str = "cnn_bn",
    in_shape=(3, 128, 128),
    effective_batch: int = 1024,
    optimizer: str = "adam",
    gpu_gib: int = 2,
):
    """Chapter 9: a :class:`~batchlab.plan.FitPlan` for ``model_name`` on ``in_shape`` inputs, ``effective_batch``
    samples per step with ``optimizer``, on a ``gpu_gib`` GiB GPU."""
    task = (
        f"plan build_model({model_name!r}, in_shape={tuple(in_shape)}) with {optimizer!r}, {effective_batch} "
        f"samples per optimizer step, on a {gpu_gib} GiB GPU, with batchlab.plan_fit, and give its FitPlan."
    )
    if your_turn(task, plan):
        return
    assert isinstance(plan, FitPlan), f"give the FitPlan that batchlab.plan_fit returns, got {type(plan).__name__}"
    context = CUDA_CONSTANTS["cuda_context"][0]
    assert plan.device == "cuda", f"the plan is for {plan.device!r}: the task's GPU is a CUDA device"
    assert plan.budget != gpu_gib * GiB, (
        f"budget {format_bytes(plan.budget)} is the whole card: PyTorch does not get all of it. What does a CUDA "
        "process hold outside PyTorch's allocator?"
    )
    assert plan.budget == gpu_gib * GiB - context, (
        f"budget {format_bytes(plan.budget)} is not what a {gpu_gib} GiB GPU leaves PyTorch as this chapter counts "
        "it (the GPU's memory minus batchlab.CUDA_CONSTANTS['cuda_context'])"
    )
    assert plan.effective_batch == effective_batch and sum(plan.micro_batches) == effective_batch, (
        f"the plan runs {plan.effective_batch} samples per step; the task asks for {effective_batch}"
    )
    assert plan.optimizer == optimizer, f"the plan is for optimizer {plan.optimizer!r}; the task's is {optimizer!r}"
    # The plan's own estimate of its accumulated step (the whole batch in its micro-batches, as train runs
    # it) must be the task model's: another model or input size gives other bytes.
    model = build_model(model_name, in_shape=tuple(in_shape))
    n, steps = effective_batch, (1 if plan.accumulation_steps == 1 else list(plan.micro_batches))
    batch = torch.empty(n, *in_shape, device="meta"), torch.zeros(n, dtype=torch.long, device="meta")
    try:  # inside the budget with max_batch_size's margin kept free, as plan_fit estimates
        report = estimate_memory(
            model,
            batch,
            optimizer=optimizer,
            device="cuda",
            accumulation_steps=steps,
            budget=plan.budget,
            keep_margin=True,
            precision=plan.precision,
            checkpointing="blocks" if plan.checkpointing else None,
        )
    except torch.OutOfMemoryError:
        raise AssertionError(
            "this plan's step does not fit the task's model in the budget: check the model and its input shape"
        ) from None
    assert report.peak_bytes == plan.peak_bytes, (
        f"the plan's peak ({format_bytes(plan.peak_bytes)}) is not the task model's "
        f"({format_bytes(report.peak_bytes)} for this step): check the model and its input shape"
    )
    print(
        f"Correct: {len(plan.options)} ways fit; the best runs {plan.accumulation_steps} micro-batches "
        f"({' + '.join(map(str, plan.micro_batches))}) in {plan.precision}"
        f"{' with checkpointing' if plan.checkpointing else ''}, peak {format_bytes(plan.peak_bytes)} of the "
        f"{format_bytes(plan.budget)} budget."
    )
