"""On a machine with an NVIDIA GPU: the estimator against the real allocator, and a real out-of-memory.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json]

For each course model and a few batch sizes it measures one training step the way the reference file
was measured (a warm-up step, reset the peak counters, a measured step) and prints the measured
``max_memory_allocated`` / ``max_memory_reserved`` next to ``batchlab.estimate_memory``. Then it limits
the process to a 2 GiB budget (``torch.cuda.set_per_process_memory_fraction``), asks
``max_batch_size`` for the largest resnet18 batch at 3x224x224, checks that this batch trains and that
a much larger one raises ``torch.OutOfMemoryError``, and that training goes on after recovering.
Exits with status 2 when no GPU is present (nothing to check).
"""

import argparse
import gc
import json
import sys
from pathlib import Path

import torch
from torch import nn

import batchlab

CASES = [("mlp", (1, 28, 28), [64, 4096]), ("cnn_bn", (1, 28, 28), [64, 1024]), ("resnet18", (3, 32, 32), [32, 512]),
         ("resnet18", (3, 224, 224), [16, 64]), ("transformer", (256,), [16, 128])]


def make_batch(in_shape, n, device):
    if len(in_shape) == 1:  # token ids
        return torch.randint(0, 1000, (n, *in_shape), device=device), torch.randint(0, 10, (n,), device=device)
    return torch.randn(n, *in_shape, device=device), torch.randint(0, 10, (n,), device=device)


def measure(name, in_shape, n, optimizer="sgd"):
    model = batchlab.build_model(name, in_shape=in_shape).cuda().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    inputs, targets = make_batch(in_shape, n, "cuda")

    def step():
        nn.functional.cross_entropy(model(inputs), targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    meta = make_batch(in_shape, n, "meta")
    estimated = batchlab.estimate_memory(batchlab.build_model(name, in_shape=in_shape), meta, optimizer=optimizer)
    model = opt = inputs = targets = None  # free the GPU memory before the next case
    gc.collect()
    torch.cuda.empty_cache()
    return {"model": name, "in_shape": list(in_shape), "batch": n, "optimizer": optimizer,
            "peak_allocated": measured[0], "peak_reserved": measured[1],
            "estimated_allocated": estimated.peak_bytes, "estimated_reserved": estimated.reserved_bytes}


def out_of_memory_check(budget_gib=2.0):
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(budget_gib * 2**30 / total)
    in_shape = (3, 224, 224)
    n = batchlab.max_batch_size(batchlab.build_model("resnet18", in_shape=in_shape),
                                lambda k: make_batch(in_shape, k, "meta"), budget=f"{budget_gib}GiB")
    model = batchlab.build_model("resnet18", in_shape=in_shape).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    result = {"budget_gib": budget_gib, "max_batch_size": n}
    for label, size in (("predicted", n), ("four_times", 4 * n), ("after_recovery", n)):
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
        result[label] = {"batch": size, "fitted": fitted, "peak_reserved": torch.cuda.max_memory_reserved()}
        torch.cuda.reset_peak_memory_stats()
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
            print(f"{name:12} {str(in_shape):14} batch {n:>5}: measured {row['peak_allocated'] / 2**20:9.1f} MiB, "
                  f"estimated {row['estimated_allocated'] / 2**20:9.1f} MiB ({error:+.1%}); reserved "
                  f"{row['peak_reserved'] / 2**20:9.1f} vs {row['estimated_reserved'] / 2**20:9.1f} MiB", flush=True)
    oom = out_of_memory_check()
    print(json.dumps(oom, indent=1))
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "batchlab": batchlab.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"env": env, "rows": rows, "out_of_memory": oom}, indent=1))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
