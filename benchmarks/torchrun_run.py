"""Run chapter 7's torchrun command from a process like the notebook's kernel; record its output and memory.

    python benchmarks/torchrun_run.py            # run and print (nothing is written)
    python benchmarks/torchrun_run.py --write    # also save batchlab/data/torchrun_run.json

Chapter 7 does not run ``torchrun`` itself: it starts three fresh Python interpreters with PyTorch (its
agent and two workers), which would take the notebook past its 1.5 GB bound. It shows this recorded
run instead: the command, what rank 0 printed, and the memory measured the way benchmarks/notebooks.py
measures a notebook: the launching process's resident memory (RSS) plus the unique memory (USS) of
every process it started, sampled every 50 ms. The launching process first does what the chapter's
kernel has done by then (imports batchlab, loads the digits, trains with ``train_ddp``), so that the
fresh processes share with it what they would share with a kernel.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

import batchlab
from batchlab import datasets

COMMAND = "python -m torch.distributed.run --standalone --nproc_per_node=2 -m batchlab.ddp_train --model mlp --steps 40"
OUT = Path(__file__).resolve().parent.parent / "batchlab" / "data" / "torchrun_run.json"


def run_and_measure(command: list) -> dict:
    """Run ``command``; return its stdout, exit code, seconds and memory peaks (bytes)."""
    me = psutil.Process()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {"tree": 0, "children_uss": 0, "per_process_uss": {}}
    names = {}
    done = threading.Event()

    def sample():
        while not done.wait(0.05):
            total = 0
            for process in me.children(recursive=True):
                try:
                    uss = process.memory_full_info().uss
                    names.setdefault(process.pid, _role(process))
                except psutil.Error:
                    continue
                total += uss
                peaks["per_process_uss"][process.pid] = max(peaks["per_process_uss"].get(process.pid, 0), uss)
            peaks["children_uss"] = max(peaks["children_uss"], total)
            peaks["tree"] = max(peaks["tree"], me.memory_info().rss + total)

    sampler = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    sampler.start()
    stdout, stderr = child.communicate(timeout=300)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if child.returncode != 0:
        raise SystemExit(f"the command failed ({child.returncode}):\n{stderr[-3000:]}")
    per_process = {names[pid]: uss for pid, uss in sorted(peaks["per_process_uss"].items()) if pid in names}
    return dict(
        stdout=stdout.splitlines(),
        seconds=round(seconds, 1),
        launcher_rss=me.memory_info().rss,
        children_uss_peak=peaks["children_uss"],
        tree_peak=peaks["tree"],
        per_process_uss_peak=per_process,
    )


def _role(process: psutil.Process) -> str:
    """'torchrun agent' or 'worker (pid N)' from a process's command line."""
    line = " ".join(process.cmdline())
    return "torchrun agent" if "torch.distributed.run" in line else f"worker (pid {process.pid})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"save the record to {OUT.relative_to(OUT.parents[2])}")
    args = parser.parse_args()
    batchlab.setup(seed=0)
    digits = datasets.digits(train=True)
    batchlab.train_ddp("mlp", digits, world_size=2, batch_size=64, steps=40, lr=0.05)  # as the chapter did
    command = shlex.split(COMMAND)
    command[0] = sys.executable
    measured = run_and_measure(command)
    workers = [k for k in measured["per_process_uss_peak"] if k.startswith("worker")]  # in pid order
    for i, key in enumerate(workers):  # name workers by start order, not by pid
        measured["per_process_uss_peak"][f"worker {i}"] = measured["per_process_uss_peak"].pop(key)
    record = dict(
        about="Chapter 7's torchrun command, run by benchmarks/torchrun_run.py from a process that had imported "
        "batchlab, loaded the digits and trained with train_ddp (as the chapter's kernel has). Memory as "
        "benchmarks/notebooks.py measures it: the launcher's RSS plus the USS of every process it started, "
        "sampled every 50 ms; bytes.",
        command=COMMAND,
        env=dict(
            date=datetime.date.today().isoformat(),
            machine=f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores",
            python=platform.python_version(),
            torch=torch.__version__,
        ),
        **measured,
    )
    print("\n".join(record["stdout"]))
    mib = 2**20
    print(
        f"{record['seconds']} s; launcher RSS {record['launcher_rss'] / mib:.0f} MiB; started processes' USS at "
        f"their joint peak {record['children_uss_peak'] / mib:.0f} MiB; launcher + started "
        f"{record['tree_peak'] / 1e9:.2f} GB"
    )
    print("peak USS per process:", {k: f"{v / mib:.0f} MiB" for k, v in record["per_process_uss_peak"].items()})
    if args.write:
        OUT.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        print(f"written: {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
