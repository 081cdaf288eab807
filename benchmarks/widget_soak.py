"""A soak of the explorers: many control changes must not grow memory or leave threads behind (issue 16).

    python benchmarks/widget_soak.py              # 200 changes of each control of each explorer
    python benchmarks/widget_soak.py --changes 20 # a quick look

For each explorer of :mod:`batchlab.widgets` (BatchSizeExplorer, ConvergenceExplorer, LoaderExplorer,
AccumulationExplorer) every control is moved ``--changes`` times through ``control.value``, as the
browser moves it, cycling over a few values; the explorer then waits until its panels show the last
value. Three rounds of every value of every control first are the warm-up: the explorers cache their
runs and estimates, matplotlib and the allocator settle, so the growth printed is what the changes
themselves leave behind. Printed: the process's resident memory (psutil) after the warm-up and after
the soak, the growth, and the number of Python threads before, during and after closing every explorer.
Small settings (the 359 test digits, the MLP, short runs) keep it to a few minutes on two busy cores.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import threading
import time

import psutil
import torch

from batchlab import datasets
from batchlab.validation import MiB


def explorers():
    """Each explorer with small settings, and the values each of its controls cycles over."""
    from batchlab.widgets import AccumulationExplorer, BatchSizeExplorer, ConvergenceExplorer, LoaderExplorer

    digits = datasets.digits(train=False)
    shapes = datasets.shapes(96, image_size=16)
    return [
        (
            BatchSizeExplorer(digits, model="mlp", batch_size=32, profile="GPU 4 GiB (simulated)"),
            {
                "batch_size": [16, 32, 64],
                "batch_text": ["16", "32", "48"],
                "lr": [0.01, 0.05, 0.1],
                "model": ["mlp", "cnn", "mlp"],
                "profile": None,
                "accumulation_steps": [1, 2, 4],
            },
        ),
        (
            ConvergenceExplorer(digits, model="mlp", epochs=1, batch_size=32),
            {"batch_size": [16, 32, 64], "lr": [0.01, 0.1, 0.05]},
        ),
        (
            LoaderExplorer(shapes, batch_size=8, batches=4, warmup=1, max_workers=1),
            {"num_workers": [0, 1, 0], "batch_size": [8, 16, 8]},
        ),
        (AccumulationExplorer(digits, effective_batch=16, micro_batch=4, steps=4), {"micro_batch": [4, 8, 16]}),
    ]


def cycle_values(explorer, name, values):
    control = explorer.controls[name]
    if values is None:  # a dropdown: every option it offers
        values = list(control.options)
    return values


def soak(pairs, changes: int) -> None:
    for explorer, controls in pairs:
        for name, values in controls.items():
            values = cycle_values(explorer, name, values)
            control = explorer.controls[name]
            for i in range(changes):
                control.value = values[i % len(values)]
            explorer.wait()


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=200, help="changes of each control (default 200)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as batchlab.setup() gives the notebooks
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
        f"torch {torch.__version__}"
    )
    threads_before = threading.active_count()
    start = time.perf_counter()
    pairs = explorers()
    soak(pairs, 9)  # the warm-up: every value of every control three times (caches fill, allocators settle)
    warm = rss()
    print(
        f"warm-up done after {time.perf_counter() - start:.0f} s: resident {warm / MiB:.1f} MiB, "
        f"{threading.active_count()} threads"
    )
    total = sum(len(controls) for _, controls in pairs) * args.changes
    began = time.perf_counter()
    soak(pairs, args.changes)
    after = rss()
    print(
        f"{total} changes ({args.changes} of each of {total // args.changes} controls of {len(pairs)} explorers) "
        f"in {time.perf_counter() - began:.0f} s"
    )
    print(
        f"resident memory: {warm / MiB:.1f} MiB after the warm-up, {after / MiB:.1f} MiB after the soak: "
        f"{(after - warm) / MiB:+.1f} MiB"
    )
    threads_open = threading.active_count()
    for explorer, _ in pairs:
        explorer.close()
    deadline = time.monotonic() + 10
    while threading.active_count() > threads_before and time.monotonic() < deadline:
        time.sleep(0.1)  # a background job's thread ends after close() cancelled it
    print(
        f"Python threads: {threads_before} before, {threads_open} with the explorers open, "
        f"{threading.active_count()} after closing them"
    )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
