"""Time (and, on a GPU, memory) per effective batch against the micro-batch size (chapter 6 shows the trade).

    python benchmarks/accumulation.py                 # CPU, and CUDA too when a GPU is present
    python benchmarks/accumulation.py --runs 9 --threads 1

For each model the effective batch stays at ``--batch`` (256) and the micro-batch goes 256, 64, 16, 4:
one step is batchlab.train's own (its accumulation loop, optimizer.step, zero_grad). The settings are
timed in turn, round after round, so that all of them see the same machine load; medians of ``--runs``
rounds and the ratio to the step without accumulation are printed. On CUDA the peak memory of the step
(``torch.cuda.max_memory_allocated``) is printed beside batchlab.estimate_memory's estimate for one
step of the micro-batch.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import psutil
import torch

import batchlab

CASES = [("cnn", (1, 28, 28)), ("resnet18", (3, 32, 32))]  # (model, input shape)
MICRO_BATCHES = (256, 64, 16, 4)
MiB = 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _setting(name, in_shape, device):
    model = batchlab.build_model(name, in_shape=in_shape).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, optimizer


def measure(name, in_shape, batch, device, runs):
    """{micro-batch: (median seconds per effective batch, peak bytes on CUDA or None)}."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch, *in_shape, generator=generator).to(device)
    targets = torch.randint(0, 10, (batch,), generator=generator).to(device)
    loss_fn = torch.nn.CrossEntropyLoss()
    settings = {m: _setting(name, in_shape, device) for m in MICRO_BATCHES if batch % m == 0}
    peaks = {}
    for m, (model, optimizer) in settings.items():  # warm-up (optimizer state, caches), then the peak
        batchlab.train_step(model, optimizer, inputs, targets, loss_fn=loss_fn, accumulation_steps=batch // m)
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        batchlab.train_step(model, optimizer, inputs, targets, loss_fn=loss_fn, accumulation_steps=batch // m)
        _sync(device)
        peaks[m] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    seconds = {m: [] for m in settings}
    for _ in range(runs):
        for m, (model, optimizer) in settings.items():
            _sync(device)
            start = time.perf_counter()
            batchlab.train_step(model, optimizer, inputs, targets, loss_fn=loss_fn, accumulation_steps=batch // m)
            _sync(device)
            seconds[m].append(time.perf_counter() - start)
    return {m: (statistics.median(seconds[m]), peaks[m]) for m in settings}, (inputs, targets)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7, help="timed rounds over all settings (default 7)")
    parser.add_argument("--batch", type=int, default=256, help="the effective batch (default 256)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); 1 gives steadier times on a busy machine",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"machine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )
    if hasattr(os, "getloadavg"):
        print(f"load average before: {os.getloadavg()[0]:.2f} (other processes on the machine perturb the times)")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"\n{where}: effective batch {args.batch}")
        print(
            f"{'model':9} {'micro':>5} {'steps':>5} {'ms/effective batch':>19} {'x time':>7}"
            + (f" {'peak MiB':>9} {'estimate MiB':>13}" if device.type == "cuda" else "")
        )
        for name, in_shape in CASES:
            results, (inputs, targets) = measure(name, in_shape, args.batch, device, args.runs)
            base = results[max(results)][0]
            for m, (seconds, peak) in results.items():
                line = f"{name:9} {m:5d} {args.batch // m:5d} {seconds * 1e3:19.1f} {seconds / base:7.2f}"
                if peak is not None:
                    model = batchlab.build_model(name, in_shape=in_shape)
                    estimate = batchlab.estimate_memory(model, (inputs[:m].cpu(), targets[:m].cpu()), device="cuda")
                    line += f" {peak / MiB:9.1f} {estimate.peak_bytes / MiB:13.1f}"
                print(line, flush=True)
    if hasattr(os, "getloadavg"):
        print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    print(
        f"medians of {args.runs} rounds; the settings alternate within each round. The estimate is for one step "
        "of the micro-batch alone; the accumulated step also holds the whole batch and one new gradient."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
