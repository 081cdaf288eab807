"""Chapter 3's numbers: DataLoader workers on the CPU-heavy image folder, and manual batching vs DataLoader.

    python benchmarks/loader.py               # 5 interleaved repeats of every setting
    python benchmarks/loader.py --repeats 9   # steadier medians on a busy machine

Goals on a 2-core machine, at 128x128 PNG files (decode, random resized crop, flip, colour jitter,
normalise), batch size 32:

* ``num_workers=2`` delivers at least 1.5x the samples per second of ``num_workers=0``;
* ``batchlab.iter_batches`` is within 10% of ``DataLoader(num_workers=0)``.

Every setting runs once per round, the rounds repeat, and every other round runs the settings in
reverse order, so load from other programs spreads over all settings. The settings compared run next
to each other in every round; each ratio is the median of its per-round ratios (the ratio of the
medians is printed too). The load average is printed before and after,
because other programs on the same cores lower the numbers (and the ratios). Each round also measures
the *ceiling*: the same per-sample work in 2 plain processes against 1 (no DataLoader), which is the
most that 2 workers could gain on this machine at that moment. Exit status 1 if a goal is missed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import sys
import time

import psutil
import torch

from batchlab.datasets import shapes_image_folder
from batchlab.loaders import iter_batches_throughput, loader_throughput, usable_cores

WORKERS = (0, 1, 2, 4)


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"


def _fetch(dataset, indices) -> None:
    torch.set_num_threads(1)  # as in a DataLoader worker
    for i in indices:
        dataset[i]


def parallel_rate(dataset, processes: int, per_process: int) -> float:
    """Samples per second of ``processes`` forked processes fetching ``per_process`` samples each."""
    context = multiprocessing.get_context("fork")
    jobs = [
        context.Process(target=_fetch, args=(dataset, range(k * per_process, (k + 1) * per_process)))
        for k in range(processes)
    ]
    start = time.perf_counter()
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    return processes * per_process / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="rounds over all settings (default 5)")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per run (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches per run (default 3)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()

    print(
        f"machine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} cores "
        f"({usable_cores()} usable), Python {platform.python_version()}, torch {torch.__version__}"
    )
    dataset = shapes_image_folder(image_size=args.image_size)
    print(
        f"data: {len(dataset)} PNG files of {args.image_size}x{args.image_size} in {dataset.root}; "
        f"batch size {args.batch_size}, {args.warmup} + {args.batches} batches per run, {args.repeats} rounds"
    )
    print("before:", load())

    options = dict(batch_size=args.batch_size, batches=args.batches, warmup=args.warmup, repeats=1)
    results: dict = {}
    ceiling = []
    order = ["manual", 0, 2, 1, 4]  # the pairs compared (manual-0, 0-2) run back to back
    for round_number in range(args.repeats):
        ceiling.append(parallel_rate(dataset, 2, 256) / parallel_rate(dataset, 1, 256))
        for key in order if round_number % 2 == 0 else order[::-1]:
            if key == "manual":
                run = iter_batches_throughput(dataset, **options)
            else:
                run = loader_throughput(dataset, num_workers=key, **options)
            results[key] = results[key].merged(run) if key in results else run
    results = {key: results[key] for key in (*WORKERS, "manual")}
    print("after: ", load())

    print(f"\n{'setting':44} {'median samples/s':>16} {'min':>7} {'max':>7} {'main busy':>9}")
    for stats in results.values():
        runs = stats.runs_samples_per_second
        print(
            f"{stats.setting:44} {stats.samples_per_second:16,.0f} {min(runs):7,.0f} {max(runs):7,.0f} "
            f"{stats.busy_fraction:9.0%}"
        )

    def ratios(a, b):
        return [x / y for x, y in zip(results[a].runs_samples_per_second, results[b].runs_samples_per_second)]

    def show(values):
        return ", ".join(f"{v:.2f}" for v in values)

    workers_rounds, manual_rounds = ratios(2, 0), ratios("manual", 0)
    workers_ratio, manual_ratio = statistics.median(workers_rounds), statistics.median(manual_rounds)
    workers_ok, manual_ok = workers_ratio >= 1.5, abs(manual_ratio - 1) <= 0.10
    print(
        f"\nnum_workers=2 / num_workers=0: {workers_ratio:.2f}x (per round: {show(workers_rounds)}; ratio of "
        f"medians {results[2].samples_per_second / results[0].samples_per_second:.2f}); goal >= 1.5x: "
        f"{'met' if workers_ok else 'MISSED'}"
    )
    print(
        f"ceiling, 2 plain processes / 1 process doing the same work: {statistics.median(ceiling):.2f}x "
        f"(per round: {', '.join(f'{r:.2f}' for r in ceiling)}); below 2x means the cores were not all ours"
    )
    print(
        f"iter_batches / DataLoader(num_workers=0): {manual_ratio:.3f} (per round: {show(manual_rounds)}; ratio "
        f"of medians {results['manual'].samples_per_second / results[0].samples_per_second:.3f}); goal within "
        f"10%: {'met' if manual_ok else 'MISSED'}"
    )
    print(
        f"medians of {args.repeats} rounds; {statistics.median(results[0].runs_busy_fraction):.0%} of a core busy "
        "in the main process without workers (below ~90% means other programs took CPU time from it)"
    )
    return 0 if workers_ok and manual_ok else 1


if __name__ == "__main__":
    sys.exit(main())
