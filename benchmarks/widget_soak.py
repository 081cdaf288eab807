"""A soak of the explorers: many control changes must not grow memory or leave threads behind (issue 16).

    python benchmarks/widget_soak.py              # 200 changes of each control of each explorer
    python benchmarks/widget_soak.py --changes 20 # a quick look

For each explorer of :mod:`batchlab.widgets` (BatchSizeExplorer, ConvergenceExplorer, LoaderExplorer,
AccumulationExplorer) every control is moved ``--changes`` times through ``control.value``, as the
browser moves it, cycling over a few values; the explorer then waits until its panels show the last
value. Three rounds of every value of every control first are the warm-up: the explorers cache their
runs and estimates, matplotlib and the allocator settle, so the growth printed is what the changes
themselves leave behind. Printed: the process's resident memory (psutil) after the warm-up and after
the soak, the growth, the growth during each explorer's share of the soak, the number of live ipywidgets
before and after, and the number of Python threads before, during and after closing every explorer.

Resident memory is printed twice: as it is, and after glibc's ``malloc_trim(0)`` has given the free pages
of its heaps back to the system. The first is what a learner's kernel holds; the second counts only pages
still in use, so a growth there is memory kept (a leak), while a growth in the first alone is the C
allocator keeping freed memory for reuse. The trim at the warm-up point happens after the first number
is read, so the first growth includes pages the soak takes back from the system: it can only be larger.
Small settings (the 359 test digits, the MLP, short runs) keep it to about a quarter of an hour on two busy cores.
"""

from __future__ import annotations

import argparse
import ctypes
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


def soak(pairs, changes: int) -> dict:
    """Move every control of every explorer ``changes`` times; return each explorer's resident growth (bytes)."""
    grown = {}
    for explorer, controls in pairs:
        before = rss()
        for name, values in controls.items():
            values = cycle_values(explorer, name, values)
            control = explorer.controls[name]
            for i in range(changes):
                control.value = values[i % len(values)]
            explorer.wait()
        grown[type(explorer).__name__] = rss() - before
    return grown


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def trimmed_rss() -> int | None:
    """Resident memory after glibc's malloc_trim(0) gave its heaps' free pages back (None without glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    gc.collect()
    libc.malloc_trim(0)
    return psutil.Process().memory_info().rss


def live_widgets() -> int:
    """How many ipywidgets exist in this process (every widget registers itself until it is closed)."""
    from ipywidgets.widgets.widget import _instances

    return len(_instances)


def mib(size: int | None) -> str:
    return "n/a" if size is None else f"{size / MiB:.1f} MiB"


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
    warm, widgets_warm = rss(), live_widgets()
    warm_trimmed = trimmed_rss()
    print(
        f"warm-up done after {time.perf_counter() - start:.0f} s: resident {mib(warm)} ({mib(warm_trimmed)} after "
        f"malloc_trim), {widgets_warm} widgets, {threading.active_count()} threads"
    )
    total = sum(len(controls) for _, controls in pairs) * args.changes
    began = time.perf_counter()
    grown = soak(pairs, args.changes)
    after, widgets_after = rss(), live_widgets()
    after_trimmed = trimmed_rss()
    print(
        f"{total} changes ({args.changes} of each of {total // args.changes} controls of {len(pairs)} explorers) "
        f"in {time.perf_counter() - began:.0f} s"
    )
    print(
        f"resident memory: {mib(warm)} after the warm-up, {mib(after)} after the soak: {(after - warm) / MiB:+.1f} MiB"
    )
    if warm_trimmed is not None and after_trimmed is not None:
        print(
            f"after malloc_trim (pages in use): {mib(warm_trimmed)} after the warm-up, {mib(after_trimmed)} after "
            f"the soak: {(after_trimmed - warm_trimmed) / MiB:+.1f} MiB"
        )
    print("growth during each explorer's changes: " + ", ".join(f"{k} {v / MiB:+.1f} MiB" for k, v in grown.items()))
    threads_open = threading.active_count()
    for explorer, _ in pairs:
        explorer.close()
    print(
        f"live widgets: {widgets_warm} after the warm-up, {widgets_after} after the soak, "
        f"{live_widgets()} after closing the explorers"
    )
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
