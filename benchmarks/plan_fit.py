"""How long does plan_fit take for the course models at realistic sizes, and what does it propose?

    python benchmarks/plan_fit.py

For mlp, cnn, cnn_bn and resnet18 on 3x224x224 images and the transformer on 512 tokens: the plans
for an effective batch of 256 on a 4 GiB GPU (4 GiB minus the CUDA context that
``CUDA_CONSTANTS["cuda_context"]`` gives: what PyTorch can use), SGD, fp32 and bf16, with and without
checkpointing. Prints each table and the seconds it took, wall-clock and CPU (one torch thread; goal
from issue 13: <= 30 s per model on this 2-core machine), the median of ``--repeats`` runs.
"""

import argparse
import os
import platform
import statistics
import time

import psutil
import torch

import batchlab
from batchlab.explorer import memory_input_shape, meta_batch, meta_model

GiB = 2**30
EFFECTIVE_BATCH = 256
GPU_GIB = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--models", nargs="*", default=list(batchlab.MODEL_NAMES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    budget = GPU_GIB * GiB - batchlab.CUDA_CONSTANTS["cuda_context"][0]
    print(
        f"machine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs, "
        f"{len(os.sched_getaffinity(0))} usable; torch {torch.__version__}"
    )
    print(
        f"budget: a {GPU_GIB} GiB GPU minus the CUDA context = {budget / GiB:.2f} GiB; effective batch "
        f"{EFFECTIVE_BATCH}\n"
    )
    times, cpu_times = {}, {}
    for name in args.models:
        shape = memory_input_shape(name)
        model = meta_model(name, shape)
        seconds, cpu = [], []
        for _ in range(args.repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            try:
                plan = batchlab.plan_fit(
                    model, lambda n, shape=shape: meta_batch(n, shape), budget=budget, effective_batch=EFFECTIVE_BATCH
                )
            except ValueError as error:
                plan = f"no plan: {error}"
            seconds.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        times[name], cpu_times[name] = statistics.median(seconds), statistics.median(cpu)
        print(
            f"== {name} at {'x'.join(map(str, shape))}: {times[name]:.1f} s wall, {cpu_times[name]:.1f} s "
            f"of CPU (medians of {args.repeats}; wall > CPU when other programs share the cores)"
        )
        print(plan, "\n")
    print("seconds per model (wall / CPU):", ", ".join(f"{n} {times[n]:.1f} / {cpu_times[n]:.1f}" for n in times))
    # One torch thread: on an idle core wall-clock equals CPU time, so CPU time is what this machine needs.
    print(
        f"goal <= 30 s per model: {'met' if max(cpu_times.values()) <= 30 else 'NOT met'} in CPU time, "
        f"{'met' if max(times.values()) <= 30 else 'NOT met'} in wall-clock time at load "
        f"{os.getloadavg()[0]:.1f} on {len(os.sched_getaffinity(0))} cores"
    )


if __name__ == "__main__":
    main()
