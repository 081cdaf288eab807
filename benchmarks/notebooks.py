"""Run chapter notebooks top to bottom in a fresh kernel; report run time and peak kernel memory.

    python benchmarks/notebooks.py notebooks/*.ipynb          # measure (nothing is written)
    python benchmarks/notebooks.py --write notebooks/*.ipynb  # measure and save outputs (make notebooks)

Each chapter must run in at most 120 s and stay under 1.5 GB of memory (kernel plus any processes it
starts: DataLoader workers, DDP ranks) on a 2-core machine, so that it fits a free Binder session.
Memory is the kernel's resident set (RSS) plus the private memory (USS) of each process it started,
sampled every 50 ms with psutil: forked workers share the kernel's pages (PyTorch's libraries alone
are hundreds of MB), which RSS would count again in every worker. Exit status 1 if a bound is broken.
"""

from __future__ import annotations

import argparse
import platform
import sys
import threading
import time
from pathlib import Path

import nbformat
import psutil
from nbclient import NotebookClient

MAX_SECONDS = 120
MAX_MEMORY = 1.5e9


def tree_memory(process: psutil.Process) -> int:
    """RSS of a process plus the USS of all its descendants, in bytes (0 once it has gone)."""
    total = 0
    try:
        total += process.memory_info().rss
        for child in process.children(recursive=True):
            try:
                total += child.memory_full_info().uss
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total


def run_notebook(path: Path, write: bool) -> tuple[float, int]:
    """Execute ``path`` in its own folder; return (seconds, peak memory of the kernel tree in bytes)."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        store_widget_state=False,
        record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    peak, done = [0], threading.Event()

    def sample():
        while not done.wait(0.05):
            kernel = getattr(client.km, "provisioner", None) if client.km else None
            pid = getattr(getattr(kernel, "process", None), "pid", None)
            if pid:
                peak[0] = max(peak[0], tree_memory(psutil.Process(pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    sampler.start()
    try:
        client.execute()
    finally:
        done.set()
        sampler.join()
    seconds = time.perf_counter() - start
    if write:
        nb.metadata.pop("widgets", None)
        nbformat.write(nb, path)
    return seconds, peak[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--write", action="store_true", help="save the executed notebooks in place")
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )
    print(f"{'notebook':40} {'seconds':>8} {'peak mem':>10}  within bounds")
    ok = True
    for path in args.notebooks:
        seconds, memory = run_notebook(path, args.write)
        fine = seconds <= MAX_SECONDS and memory <= MAX_MEMORY
        ok &= fine
        print(f"{path.name:40} {seconds:8.1f} {memory / 1e9:8.2f} GB  {'yes' if fine else 'NO'}", flush=True)
    print(f"bounds: {MAX_SECONDS} s and {MAX_MEMORY / 1e9:.1f} GB per notebook")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
