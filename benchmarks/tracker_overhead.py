"""How much slower is a training step under batchlab.track_memory? (chapter 4 quotes the ratio)

    python benchmarks/tracker_overhead.py            # CPU, and CUDA too when a GPU is present
    python benchmarks/tracker_overhead.py --runs 15 --threads 1

For each model, the same step (forward, loss, backward, SGD step, zero_grad) is timed without and with
the tracker, alternating the two so that both see the same machine load; the medians of ``--runs``
runs and their ratio are printed. The tracker runs Python code after every tensor operation, so the
ratio is largest for small, fast steps and shrinks as the operations get bigger.
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
from torch import nn

import batchlab

CASES = [  # (model, input shape, batch size)
    ("mlp", (1, 28, 28), 64),
    ("cnn_bn", (1, 28, 28), 64),
    ("cnn_bn", (1, 28, 28), 256),
    ("resnet18", (3, 32, 32), 32),
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(model, optimizer, inputs, targets, tracked: bool) -> float:
    """Seconds for one training step, with or without the tracker around it."""
    device = inputs.device
    _sync(device)
    start = time.perf_counter()
    if tracked:
        with batchlab.track_memory(model, optimizer):
            _step(model, optimizer, inputs, targets)
            _sync(device)
    else:
        _step(model, optimizer, inputs, targets)
        _sync(device)
    return time.perf_counter() - start


def _step(model, optimizer, inputs, targets) -> None:
    loss = nn.functional.cross_entropy(model(inputs), targets)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(name, in_shape, batch_size, device, runs):
    model = batchlab.build_model(name, in_shape=in_shape).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch_size, *in_shape, generator=generator).to(device)
    targets = torch.randint(0, 10, (batch_size,), generator=generator).to(device)
    for tracked in (False, True, False, True):  # warm-up: optimizer state, caches, first-call costs
        time_step(model, optimizer, inputs, targets, tracked)
    plain, tracked = [], []
    for _ in range(runs):
        plain.append(time_step(model, optimizer, inputs, targets, False))
        tracked.append(time_step(model, optimizer, inputs, targets, True))
    return statistics.median(plain), statistics.median(tracked)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=9, help="timed runs of each step (default 9)")
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
    print(f"\n{'device':6} {'model':9} {'batch':>5} {'untracked ms':>13} {'tracked ms':>11} {'ratio':>6}")
    for device in devices:
        if device.type == "cuda":
            print(f"GPU: {torch.cuda.get_device_name(device)}")
        for name, in_shape, batch_size in CASES:
            plain, tracked = measure(name, in_shape, batch_size, device, args.runs)
            print(
                f"{device.type:6} {name:9} {batch_size:5d} {plain * 1e3:13.1f} {tracked * 1e3:11.1f} "
                f"{tracked / plain:6.2f}",
                flush=True,
            )
    if hasattr(os, "getloadavg"):
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"medians of {args.runs} runs each, tracked and untracked runs alternating")
    return 0


if __name__ == "__main__":
    sys.exit(main())
