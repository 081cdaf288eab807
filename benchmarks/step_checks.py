"""What do train_step's argument checks cost? (issue 16: they run on every step of every tool)

    python benchmarks/step_checks.py                 # CPU
    python benchmarks/step_checks.py --runs 9 --threads 1

For each model, batchlab.steps.check_step_args (the checks train_step makes before it changes anything)
is timed on its own, many calls per run, and the whole step (forward, loss, backward, SGD step,
zero_grad, which includes the checks) a few steps per run; the medians of ``--runs`` runs and the share
of the step that the checks take are printed. The checks read nothing from a device and stop at the
first parameter they need, so their cost is a few microseconds whatever the model's size.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from functools import partial

import torch

import batchlab
from batchlab.steps import check_step_args, train_step

CASES = [("mlp", (1, 8, 8), 8), ("cnn_bn", (1, 28, 28), 32), ("resnet18", (3, 32, 32), 8)]  # model, shape, batch


def per_call(fn, calls: int) -> float:
    """Seconds per call of ``fn``, over ``calls`` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s)")
    for name, shape, batch in CASES:
        model = batchlab.build_model(name, in_shape=shape)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        inputs, targets = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
        check_only = partial(check_step_args, model, optimizer, inputs, targets, None, 2, None, "fp32", None)
        one_step = partial(train_step, model, optimizer, inputs, targets, accumulation_steps=2)
        checks, steps = [], []
        for _ in range(args.runs):  # alternate the two, so that both see the same machine load
            checks.append(per_call(check_only, 2000))
            steps.append(per_call(one_step, 5))
        check, step = statistics.median(checks), statistics.median(steps)
        print(
            f"{name:9s} batch {batch:3d}: checks {check * 1e6:6.1f} us, step {step * 1e3:8.2f} ms, "
            f"checks are {100 * check / step:.3f}% of the step"
        )


if __name__ == "__main__":
    main()
