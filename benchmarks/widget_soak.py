"""A soak of the explorers: many control changes must not grow memory or leave threads behind (issue 16).

    python benchmarks/widget_soak.py              # 200 changes of each control of each explorer
    python benchmarks/widget_soak.py --changes 20 # a quick look

For each explorer of :mod:`batchlab.widgets` (BatchSizeExplorer, ConvergenceExplorer, LoaderExplorer,
AccumulationExplorer) every control is moved ``--changes`` times through ``control.value``, as the
browser moves it, cycling over a few values; the explorer then waits until its panels show the last
value. That is one round. The first round is the warm-up: the explorers cache the runs and estimates
that the changes ask for (bounded caches), matplotlib and the allocators settle. The rounds after it
(``--rounds``, default 1) repeat the same changes: every panel is redrawn and every job started and
cancelled again, so what they add is what the changes themselves leave behind. Printed: the warm-up's
own growth and what the caches hold after it; then the growth after each measured round, in all and
for each explorer; the number of live ipywidgets; the number of Python threads before, with the
explorers open, and after closing every explorer.

Memory is the process's resident memory (psutil), read twice: as it is, and after glibc's
``malloc_trim(0)`` has given the free pages of its heaps back to the system. The first is what a
learner's kernel holds; the second counts only pages still in use, so a growth there is memory kept (a
leak), while a growth in the first alone is the C allocator keeping freed memory for reuse.
Small settings (the 359 test digits, the MLP, short runs) keep a round to about six minutes on two cores.
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
    """One round: move every control of every explorer ``changes`` times; each explorer's growth in pages in use."""
    grown = {}
    for explorer, controls in pairs:
        before = trimmed_rss()
        for name, values in controls.items():
            values = cycle_values(explorer, name, values)
            control = explorer.controls[name]
            for i in range(changes):
                control.value = values[i % len(values)]
            explorer.wait()
        grown[type(explorer).__name__] = trimmed_rss() - before
    return grown


def cached(pairs) -> str:
    """What the explorers' caches hold: runs and estimates."""
    bse, convergence = pairs[0][0], pairs[1][0]
    return (
        f"BatchSizeExplorer {len(bse.runs.runs)} runs, {len(bse.cache.points)} estimates, "
        f"{len(bse.cache.largest)} largest batches; ConvergenceExplorer {len(convergence._cache)} runs"
    )


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def trimmed_rss() -> int:
    """Resident memory after glibc's malloc_trim(0) gave its heaps' free pages back (plain RSS without glibc)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return psutil.Process().memory_info().rss


def live_widgets() -> int:
    """How many ipywidgets exist in this process (every widget registers itself until it is closed)."""
    from ipywidgets.widgets.widget import _instances

    return len(_instances)


def mib(size: int | None) -> str:
    return "n/a" if size is None else f"{size / MiB:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=200, help="changes of each control in a round (default 200)")
    parser.add_argument("--rounds", type=int, default=1, help="measured rounds after the warm-up (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as batchlab.setup() gives the notebooks
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
        f"torch {torch.__version__}"
    )
    threads_before = threading.active_count()
    start = time.perf_counter()
    pairs = explorers()
    total = sum(len(controls) for _, controls in pairs) * args.changes
    built, built_trimmed = rss(), trimmed_rss()
    soak(pairs, args.changes)
    warm, warm_trimmed, widgets_warm = rss(), trimmed_rss(), live_widgets()
    print(
        f"warm-up, one round of {total} changes ({args.changes} of each of {total // args.changes} controls of "
        f"{len(pairs)} explorers) in {time.perf_counter() - start:.0f} s: resident {mib(built)} -> {mib(warm)}, "
        f"pages in use {mib(built_trimmed)} -> {mib(warm_trimmed)} ({(warm_trimmed - built_trimmed) / MiB:+.1f} MiB)"
    )
    print(f"  the caches after it: {cached(pairs)}")
    for round_ in range(1, args.rounds + 1):
        began = time.perf_counter()
        grown = soak(pairs, args.changes)
        after, after_trimmed = rss(), trimmed_rss()
        print(
            f"round {round_} ({total} changes, {time.perf_counter() - began:.0f} s), since the warm-up: resident "
            f"{(after - warm) / MiB:+.1f} MiB, pages in use {(after_trimmed - warm_trimmed) / MiB:+.1f} MiB "
            f"({mib(after_trimmed)}); per explorer: " + ", ".join(f"{k} {v / MiB:+.1f}" for k, v in grown.items())
        )
        print(f"  the caches after it: {cached(pairs)}")
    widgets_after, threads_open = live_widgets(), threading.active_count()
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
        f"Python threads: {threads_before} before, {threads_open} with the explorers open (the BatchSizeExplorer "
        f"trains in a thread of its own), {threading.active_count()} after closing them"
    )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
