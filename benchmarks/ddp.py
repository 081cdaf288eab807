"""Distributed data parallel on this machine (chapter 7): start-up, communication and step time.

    python benchmarks/ddp.py [--repeats 5]

Prints the median over ``--repeats`` runs of

* start-up: wall time of ``batchlab.launch`` for a function that does one all-reduce, with the
  processes forked from this one (the notebook default) and spawned (fresh interpreters);
* accumulation: the MLP on the digits, 2 processes, global batch 64 = 2 x 4 micro-batches of 8, with
  and without ``no_sync``: gradient all-reduces and MiB per step, their time per step (from starting
  each to its result, overlapping backward and each other) and the time per step;
* processes: time per step at global batch 64 with 1 and 2 processes (on a 2-core machine the two
  processes share the cores that one process would use with 2 threads);
* memory of forked ranks: the unique memory (USS) of the ranks of a 40-step ``train_ddp`` run with 2
  and 4 processes, summed at their joint peak and divided by the number of ranks, with ``launch``'s
  ``gc.freeze`` before forking and without it (so that the ranks' garbage collectors do not copy the
  parent's pages by visiting its objects).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import platform
import statistics
import threading
import time

import psutil
import torch
import torch.distributed as dist

import batchlab
from batchlab import datasets

launching = importlib.import_module("batchlab.processes")

STEPS = 40


def one_all_reduce(rank, world_size):
    t = torch.ones(1)
    dist.all_reduce(t)
    return t.item()


def median_of(repeats, measure, *args):
    return statistics.median(measure(*args) for _ in range(repeats))


def seconds_per_step(digits, world_size):
    return batchlab.train_ddp("mlp", digits, world_size=world_size, batch_size=64, steps=STEPS)["seconds"] / STEPS


def timed_launch(start_method):
    start = time.perf_counter()
    batchlab.launch(one_all_reduce, nprocs=2, start_method=start_method)
    return time.perf_counter() - start


def rank_uss_per_process(digits, world_size) -> float:
    """Peak over a train_ddp run of the summed USS of this process's children, per rank (bytes)."""
    me, peak, done = psutil.Process(), [0], threading.Event()

    def sample():
        while not done.wait(0.02):
            total = 0
            for child in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += child.memory_full_info().uss
            peak[0] = max(peak[0], total)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        batchlab.train_ddp("mlp", digits, world_size=world_size, batch_size=64, steps=STEPS)
    finally:
        done.set()
        sampler.join()
    return peak[0] / world_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    repeats = parser.parse_args().repeats
    print(
        f"machine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, torch "
        f"{torch.__version__}; medians of {repeats} runs"
    )
    for method in ("fork", "spawn"):
        print(f"start-up, {method:5}: {median_of(repeats, timed_launch, method):6.2f} s for launch(nprocs=2)")
    digits = datasets.digits()
    for no_sync in (True, False):
        runs = [
            batchlab.train_ddp("mlp", digits, batch_size=64, steps=STEPS, accumulation_steps=4, no_sync=no_sync)
            for _ in range(repeats)
        ]
        comm = runs[0]["comm"]
        print(
            f"accumulation, no_sync={no_sync!s:5}: {comm['calls'] / STEPS:.2f} all-reduces and "
            f"{comm['bytes'] / STEPS / 2**20:.2f} MiB per step; all-reduce time "
            f"{statistics.median(r['comm']['seconds'] for r in runs) / STEPS * 1e3:6.2f} ms per step; step "
            f"{statistics.median(r['seconds'] for r in runs) / STEPS * 1e3:6.2f} ms"
        )
    for world_size in (1, 2):
        seconds = median_of(repeats, seconds_per_step, digits, world_size)
        print(f"processes: {world_size}: {seconds * 1e3:6.2f} ms per step at global batch 64")
    freezing = launching.frozen_gc
    for world_size in (2, 4):
        with_freeze = median_of(repeats, rank_uss_per_process, digits, world_size)
        launching.frozen_gc = contextlib.nullcontext
        try:
            without = median_of(repeats, rank_uss_per_process, digits, world_size)
        finally:
            launching.frozen_gc = freezing
        print(
            f"memory, {world_size} forked ranks: USS per rank {with_freeze / 2**20:5.0f} MiB with gc.freeze, "
            f"{without / 2**20:5.0f} MiB without (x {without / with_freeze:.1f})"
        )


if __name__ == "__main__":
    main()
