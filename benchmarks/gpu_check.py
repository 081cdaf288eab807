"""On a machine with an NVIDIA GPU: the estimator against the real allocator, and a real out-of-memory.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json]

For each course model and a few batch sizes it measures one training step the way the reference file
was measured (a warm-up step, reset the peak counters, a measured step) and prints the measured
``max_memory_allocated`` / ``max_memory_reserved`` next to ``batchlab.estimate_memory``. Then it limits
the process to a 2 GiB budget (``torch.cuda.set_per_process_memory_fraction``), asks
``max_batch_size`` for the largest resnet18 batch at 3x224x224, checks that this batch trains and that
a much larger one raises ``torch.OutOfMemoryError``, and that training goes on after recovering, and
finds the true largest batch under that budget by real out-of-memory trials (a bisection), next to
``max_batch_size``'s answer (issue 15: never above it, at least 95% of it). Every measured row also
records the sizes of the allocator's segments after the step (``torch.cuda.memory_snapshot``), to compare
with the segments of ``batchlab.CachingAllocator``, and recurrent language models (nn.GRU, nn.LSTM, one
cuDNN call each on the GPU; ``batchlab.rnn_kernels`` models their reserve space and workspaces) are
measured like the course models. For the two steps whose reserved memory the replay misses most on the
H100 reference (cnn_bn at batch 2048, resnet18 at 3x32x32 and batch 1024), it records the allocator's own
history of both steps (``torch.cuda.memory._record_memory_history``): every allocation, free and new segment
of 1 MiB or more, with the operator that asked for it, so that cuDNN's workspaces (the likeliest cause,
chapter 4) can be read off rather than guessed. Exits with status 2 when no GPU is present (nothing to check).
"""

import argparse
import gc
import json
import sys
from pathlib import Path

import torch
from estimate_vs_gpu import LanguageModel, token_loss
from torch import nn

import batchlab

CASES = [
    ("mlp", (1, 28, 28), [64, 4096]),
    ("cnn_bn", (1, 28, 28), [64, 1024]),
    ("resnet18", (3, 32, 32), [32, 512]),
    ("resnet18", (3, 224, 224), [16, 64]),
    ("transformer", (256,), [16, 128]),
]


def make_batch(in_shape, n, device):
    if len(in_shape) == 1:  # token ids
        return torch.randint(0, 1000, (n, *in_shape), device=device), torch.randint(0, 10, (n,), device=device)
    return torch.randn(n, *in_shape, device=device), torch.randint(0, 10, (n,), device=device)


RNN_CASES = [(nn.GRU, [16, 64]), (nn.LSTM, [16, 64])]  # LanguageModel(cell), 128 tokens per sample
TOKENS = 128


def token_batch(n, device):
    tokens = torch.randint(0, 5000, (n, TOKENS), device=device)
    return tokens, torch.randint(0, 5000, (n, TOKENS), device=device)


def measure(name, in_shape, n, optimizer="sgd", cell=None):
    build = (lambda: LanguageModel(cell)) if cell else (lambda: batchlab.build_model(name, in_shape=in_shape))
    batch = (lambda device: token_batch(n, device)) if cell else (lambda device: make_batch(in_shape, n, device))
    loss_fn = token_loss if cell else nn.functional.cross_entropy
    model = build().cuda().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    inputs, targets = batch("cuda")

    def step():
        loss_fn(model(inputs), targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    segments = sorted((seg["total_size"] for seg in torch.cuda.memory_snapshot()), reverse=True)
    estimated = batchlab.estimate_memory(build(), batch("meta"), optimizer=optimizer, loss_fn=loss_fn)
    model = opt = inputs = targets = None  # free the GPU memory before the next case
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "model": name,
        "in_shape": list(in_shape),
        "batch": n,
        "optimizer": optimizer,
        "peak_allocated": measured[0],
        "peak_reserved": measured[1],
        "segments": segments,
        "estimated_allocated": estimated.peak_bytes,
        "estimated_reserved": estimated.reserved_bytes,
        "warnings": estimated.warnings,
    }


def allocator_history(name, in_shape, n) -> dict:
    """Both training steps of ``name`` at batch ``n`` as the allocator saw them: events of 1 MiB or more."""
    model = batchlab.build_model(name, in_shape=in_shape).cuda().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    inputs, targets = make_batch(in_shape, n, "cuda")
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    marks = []
    for _ in range(2):
        marks.append(torch.cuda.memory_reserved())
        nn.functional.cross_entropy(model(inputs), targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = []
    for event in snapshot["device_traces"][0]:
        if event["size"] >= 2**20:
            frames = [f["name"][:80] for f in event.get("frames", [])][:6]  # innermost first: the C++ operator
            events.append([event["action"], event["size"], " < ".join(frames)])
    model = opt = inputs = targets = None
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "model": name,
        "in_shape": list(in_shape),
        "batch": n,
        "reserved_before_each_step": marks,
        "peak_reserved": torch.cuda.max_memory_reserved(),
        "cudnn": torch.backends.cudnn.version(),
        "events": events,
    }


def real_step_fits(model, opt, in_shape, size) -> bool:
    """Whether two real training steps of ``size`` samples fit (the GPU memory is cleaned up either way)."""
    fitted = True
    try:
        for _ in range(2):
            inputs, targets = make_batch(in_shape, size, "cuda")
            nn.functional.cross_entropy(model(inputs), targets).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    except torch.OutOfMemoryError:
        fitted = False
    inputs = targets = None  # recover outside the except block
    opt.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()
    return fitted


def true_maximum(model, opt, in_shape, lo, hi) -> int:
    """The largest batch in [lo, hi) whose real steps fit, by bisection (lo fits, hi does not)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if real_step_fits(model, opt, in_shape, mid) else (lo, mid)
    return lo


def out_of_memory_check(budget_gib=2.0):
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(budget_gib * 2**30 / total)
    in_shape = (3, 224, 224)
    n = batchlab.max_batch_size(
        batchlab.build_model("resnet18", in_shape=in_shape),
        lambda k: make_batch(in_shape, k, "meta"),
        budget=f"{budget_gib}GiB",
    )
    model = batchlab.build_model("resnet18", in_shape=in_shape).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    result = {"budget_gib": budget_gib, "max_batch_size": n}
    for label, size in (("predicted", n), ("four_times", 4 * n), ("after_recovery", n)):
        fitted = real_step_fits(model, opt, in_shape, size)
        result[label] = {"batch": size, "fitted": fitted, "peak_reserved": torch.cuda.max_memory_reserved()}
        torch.cuda.reset_peak_memory_stats()
    if result["predicted"]["fitted"] and not result["four_times"]["fitted"]:
        best = true_maximum(model, opt, in_shape, n, 4 * n)
        result["true_maximum"] = {"batch": best, "max_batch_size_share": n / best}
    torch.cuda.set_per_process_memory_fraction(1.0)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_check.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to check")
        return 2
    rows = []
    for name, in_shape, batches in CASES:
        for n in batches:
            row = measure(name, in_shape, n)
            rows.append(row)
            error = row["estimated_allocated"] / row["peak_allocated"] - 1
            print(
                f"{name:12} {str(in_shape):14} batch {n:>5}: measured {row['peak_allocated'] / 2**20:9.1f} MiB, "
                f"estimated {row['estimated_allocated'] / 2**20:9.1f} MiB ({error:+.1%}); reserved "
                f"{row['peak_reserved'] / 2**20:9.1f} vs {row['estimated_reserved'] / 2**20:9.1f} MiB",
                flush=True,
            )
    for cell, batches in RNN_CASES:
        for n in batches:
            row = measure(cell.__name__, (TOKENS,), n, cell=cell)
            rows.append(row)
            print(
                f"{cell.__name__:12} LM {TOKENS} tokens  batch {n:>5}: measured {row['peak_allocated'] / 2**20:9.1f} "
                f"MiB, estimated {row['estimated_allocated'] / 2**20:9.1f} MiB; reserved "
                f"{row['peak_reserved'] / 2**20:9.1f} vs {row['estimated_reserved'] / 2**20:9.1f} MiB",
                flush=True,
            )
    histories = [allocator_history("cnn_bn", (1, 28, 28), 2048), allocator_history("resnet18", (3, 32, 32), 1024)]
    for history in histories:
        news = [size for action, size, _ in history["events"] if action == "segment_alloc"]
        print(f"{history['model']} batch {history['batch']}: new segments (MiB) {[round(s / 2**20) for s in news]}")
    oom = out_of_memory_check()
    print(json.dumps(oom, indent=1))
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "batchlab": batchlab.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"env": env, "rows": rows, "histories": histories, "out_of_memory": oom}, indent=1))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
