"""How quickly the batch-size explorer responds on this machine (issue 7's bounds).

    python benchmarks/explorer.py            # every model
    python benchmarks/explorer.py --quick    # mlp and cnn only

Drives a full ``BatchSizeExplorer`` (all three panels, the digits, a simulated 4 GiB GPU) through its
controls' ``.value``, as the browser does, and measures from each change:

* memory panel: until the change returns (the memory panel is drawn before it does); bound 0.5 s
  (median). Changes of batch size, model and device, first-time (nothing cached) and repeated. The
  largest batch that fits (about ten estimates) is searched in the background after a new model or
  device, and shown when found: that time is printed too;
* convergence panel: until the first points of the new run are drawn (bound 2 s) and until its
  short run is complete (bound 10 s), while the kernel's thread stays free (the run is in a
  background thread);
* a newer change while a run is in flight: how long until the newer run draws, and whether the older
  one drew anything after the change (it must not);
* a setting seen before: how long until it is shown again (cached, nothing is trained).

Times are wall-clock seconds on this machine, with torch on one thread as in the notebooks; the
machine's load average is printed before and after, since other programs slow every number here.
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

from batchlab import MODEL_NAMES
from batchlab.widgets import BatchSizeExplorer

BOUNDS = {"memory": 0.5, "first points": 2.0, "complete": 10.0}


def timed_change(control, value) -> float:
    start = time.perf_counter()
    control.value = value
    return time.perf_counter() - start


def watch_run(explorer, label: str, start: float, timeout: float = 120) -> tuple:
    """Seconds from ``start`` until ``label`` shows its first points, and until it is complete."""
    first = None
    while time.perf_counter() - start < timeout:
        state = explorer.state
        if state["error"]:
            return None, None
        if state["run"] == label and state["steps"] > 0:
            first = first if first is not None else time.perf_counter() - start
            if not state["running"]:
                return first, time.perf_counter() - start
        time.sleep(0.01)
    return first, None


def memory_latencies(explorer) -> dict:
    """Change batch size, then model and device, each through its control; seconds per change."""
    times = {"batch size": [], "model": [], "device": []}
    searches = []  # device changes: seconds until the largest batch that fits is shown too
    for model in ("mlp", "cnn"):
        times["model"].append(timed_change(explorer.model, model))
        for size in (16, 64, 256, 1024, 64, 256):
            times["batch size"].append(timed_change(explorer.batch_size, size))
            explorer.wait()  # the runs are measured elsewhere; here, keep them from piling up
        for profile in list(explorer.profiles)[:4]:
            start = time.perf_counter()
            times["device"].append(timed_change(explorer.profile, profile))
            explorer.wait()
            searches.append(time.perf_counter() - start)
    return times, searches


def convergence_latencies(explorer, models) -> list:
    """Each model at five batch sizes, none run before; seconds until first points and until complete."""
    explorer.set(lr=0.03)  # a learning rate that the memory part did not run
    rows = []
    for model in models:
        for size in (2, 16, 64, 256, 1024):
            with explorer.quietly():  # the model changes with the batch size: nothing of it is cached
                explorer.model.value = model
            start = time.perf_counter()
            explorer.batch_size.value = size
            label = explorer._setting().label
            first, complete = watch_run(explorer, label, start)
            rows.append((model, size, first, complete))
            print(f"  {model:12} batch {size:5}: first points {_s(first)}, complete {_s(complete)}", flush=True)
            explorer.wait()
    return rows


def cancellation(explorer) -> tuple:
    """A resnet18 run at batch 2 is drawing; the model changes to mlp. Seconds until mlp draws."""
    explorer.set(model="resnet18", batch_size=16, lr=0.02)  # a learning rate not run yet: nothing cached
    explorer.batch_size.value = 2
    old = explorer._setting().label
    deadline = time.perf_counter() + 60
    while not (explorer.state["run"] == old and explorer.state["steps"] >= 2) and time.perf_counter() < deadline:
        time.sleep(0.01)
    with explorer.jobs.drawing:  # no drawing slips in between the change and the mark
        start = time.perf_counter()
        explorer.model.value = "mlp"
        mark = len(explorer.training.draws)
    label = explorer._setting().label
    first, complete = watch_run(explorer, label, start)
    explorer.wait()
    stray = [d for d in list(explorer.training.draws)[mark:] if d != label]
    return first, complete, stray


def reuse(explorer) -> float:
    explorer.set(model="cnn", batch_size=64)
    explorer.set(batch_size=128)
    start = time.perf_counter()
    explorer.batch_size.value = 64
    explorer.wait()
    return time.perf_counter() - start


def _s(seconds) -> str:
    return "   -  " if seconds is None else f"{seconds:5.2f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="convergence of mlp and cnn only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"machine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.2f}, torch {torch.__version__} on 1 thread"
    )
    explorer = BatchSizeExplorer(model="mlp", batch_size=64, profile="GPU 4 GiB (simulated)")
    explorer.wait()
    print("memory panel: seconds until a change returns, the memory panel drawn")
    times, searches = memory_latencies(explorer)
    every = [t for ts in times.values() for t in ts]
    for what, ts in times.items():
        print(f"  {what:10}: median {statistics.median(ts):.3f} s, max {max(ts):.3f} s ({len(ts)} changes)")
    print(f"  all       : median {statistics.median(every):.3f} s (bound {BOUNDS['memory']} s)")
    print(
        f"  after a device change, the largest batch that fits is shown after: median "
        f"{statistics.median(searches):.2f} s, max {max(searches):.2f} s (searched in the background)"
    )
    print("convergence panel: seconds from a batch-size change")
    rows = convergence_latencies(explorer, ("mlp", "cnn") if args.quick else MODEL_NAMES)
    firsts = [r[2] for r in rows if r[2] is not None]
    completes = [r[3] for r in rows if r[3] is not None]
    print(
        f"  first points: median {statistics.median(firsts):.2f} s, max {max(firsts):.2f} s "
        f"(bound {BOUNDS['first points']} s); complete: median {statistics.median(completes):.2f} s, "
        f"max {max(completes):.2f} s (bound {BOUNDS['complete']} s); {len(rows) - len(completes)} runs failed"
    )
    first, complete, stray = cancellation(explorer)
    print(
        f"newer change during a resnet18 run: the new run drew after {_s(first)}, complete after {_s(complete)}; "
        f"drawings by the cancelled run after the change: {len(stray)}"
    )
    print(f"a setting seen before, shown again after {reuse(explorer):.3f} s (cached)")
    explorer.close()
    ok = (
        statistics.median(every) <= BOUNDS["memory"]
        and max(firsts) <= BOUNDS["first points"]
        and max(completes) <= BOUNDS["complete"]
        and not stray
    )
    print(f"load average now {os.getloadavg()[0]:.2f}; within bounds: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
