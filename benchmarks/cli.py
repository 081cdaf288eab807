"""How long the command line takes for a GPT-style model of 163M parameters at 1,024 tokens (issue 14).

    python benchmarks/cli.py              # estimate (batch 8, Adam) and plan (effective batch 64) on an RTX 4090
    python benchmarks/cli.py --repeats 3  # the median of three runs of each

Each command runs in a fresh interpreter, as a learner types it, so the times include Python's and
torch's start-up and building the model (benchmarks/gpt.py). Targets: estimate <= 10 s, plan <= 30 s.
Printed: wall-clock seconds (what the learner waits) and the CPU seconds of the process (user + system),
which on a shared machine say how much of the wait was the command's own work.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ["--model", "benchmarks/gpt.py:gpt_160m", "--tokens", "1024", "--vocab", "50257"]
COMMANDS = {
    "estimate": (["estimate", *MODEL, "--batch-size", "8", "--optimizer", "adam", "--gpu", "RTX4090"], 10.0),
    "plan": (["plan", *MODEL, "--effective-batch", "64", "--optimizer", "adam", "--gpu", "RTX4090"], 30.0),
}


def timed(args: list) -> tuple:
    """(wall seconds, CPU seconds, stdout) of ``python -m batchlab ARGS`` in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "batchlab", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    for name, (command, target) in COMMANDS.items():
        runs = [timed(command) for _ in range(args.repeats)]
        wall, cpu = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        verdict = "within" if wall <= target else "OVER"
        print(
            f"{name:8s} wall {wall:6.1f} s  cpu {cpu:6.1f} s  (target {target:.0f} s: {verdict}; "
            f"os.cpu_count() = {os.cpu_count()}, load average {os.getloadavg()[0]:.1f})"
        )
        print("  $ python -m batchlab " + " ".join(command))
        print("\n".join("  " + line for line in runs[-1][2].splitlines()[:14]))


if __name__ == "__main__":
    main()
