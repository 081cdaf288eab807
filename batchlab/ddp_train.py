"""Distributed data-parallel training as a script for ``torchrun`` (chapter 7).

One machine, two processes::

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m batchlab.ddp_train --model mlp --steps 50

Two machines with two processes each: the same command on both, with ``--node_rank`` 0 on the first
and 1 on the second, and the first machine's address::

    python -m torch.distributed.run --nnodes=2 --node_rank=0 --nproc_per_node=2 \\
        --master_addr=10.0.0.1 --master_port=29500 -m batchlab.ddp_train --model mlp --steps 50

(or, with node numbers handed out as machines join: ``--rdzv-backend=c10d
--rdzv-endpoint=10.0.0.1:29400 --rdzv-id=<job-name>`` in place of ``--node_rank``, ``--master_addr``
and ``--master_port``; ``--nnodes`` and ``--nproc_per_node`` stay).

``torchrun`` starts the processes and gives each ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; this script joins the process group and runs
:func:`batchlab.distributed.train_process`, the same loop that :func:`batchlab.train_ddp` runs in a
notebook. Rank 0 prints the loss over the global batch. :func:`recorded_run` returns a run of this
script recorded with its output and memory (chapter 7 shows it instead of starting torchrun itself).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
from importlib import resources

import torch
import torch.distributed as dist

from . import datasets
from .distributed import train_process
from .models import MODEL_NAMES
from .processes import BACKENDS

DATASETS = {"digits": lambda: datasets.digits(train=True), "shapes": lambda: datasets.shapes(2048, image_size=32)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m batchlab.ddp_train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=MODEL_NAMES, default="mlp")
    parser.add_argument("--data", choices=sorted(DATASETS), default="digits")
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps (default 50)")
    parser.add_argument("--batch-size", type=int, default=64, help="global effective batch (default 64)")
    parser.add_argument("--accumulation-steps", type=int, default=1)
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="default: nccl when this process has a GPU of its own, else gloo",
    )
    parser.add_argument("--print-every", type=int, default=10, help="print the loss every N steps (default 10)")
    parser.add_argument("--save", default=None, help="rank 0 saves the final state_dict to this file")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        raise SystemExit(
            "run this script with torchrun (python -m torch.distributed.run ... -m batchlab.ddp_train), "
            "which sets RANK, WORLD_SIZE and the rendezvous address"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    has_gpu = torch.cuda.is_available() and torch.cuda.device_count() > local_rank
    backend = args.backend or ("nccl" if has_gpu else "gloo")
    device = f"cuda:{local_rank}" if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)  # one GPU per process on this machine
    dist.init_process_group(backend)  # env:// - the variables torchrun set
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        result = train_process(
            rank,
            world_size,
            args.model,
            DATASETS[args.data](),
            batch_size=args.batch_size,
            steps=args.steps,
            optimizer=args.optimizer,
            lr=args.lr,
            accumulation_steps=args.accumulation_steps,
            seed=args.seed,
            device=device,
        )
        if rank == 0:
            report(args, world_size, result)
    finally:
        # DDP objects sit in reference cycles; freed only at exit, after the process group is gone, their
        # destructor can abort the process ("terminate called without an active exception"). Free them now.
        gc.collect()
        dist.destroy_process_group()


def report(args, world_size: int, result: dict) -> None:
    """Rank 0's output: the loss over the global batch, and what one step cost in communication."""
    print(
        f"world size {world_size}, per-process batch {result['per_process_batch']}, "
        f"accumulation steps {args.accumulation_steps}, effective batch {args.batch_size}",
        flush=True,
    )
    for step, loss in enumerate(result["loss"], start=1):
        if step % args.print_every == 0 or step == len(result["loss"]):
            print(f"step {step:5d}  loss {loss:.4f}", flush=True)
    comm = result["comm"]
    print(
        f"final loss {result['loss'][-1]:.4f} after {args.steps} steps in {result['seconds']:.1f} s; "
        f"{comm['calls']} gradient all-reduces, {comm['bytes'] / 2**20:.1f} MiB",
        flush=True,
    )
    if args.save:
        torch.save(result["state_dict"], args.save)
        print(f"saved the weights to {args.save}", flush=True)


def recorded_run() -> dict:
    """A run of this script under torchrun, recorded by ``benchmarks/torchrun_run.py`` and shipped with batchlab.

    ``command`` (as typed in a shell), ``stdout`` (rank 0's lines), ``env`` (date, machine, Python, torch),
    ``seconds``, and memory in bytes measured as ``benchmarks/notebooks.py`` measures a notebook:
    ``launcher_rss`` (the process that ran the command), ``children_uss_peak`` (the unique memory of the
    processes torchrun started, summed at their joint peak), ``tree_peak`` (the two together), and
    ``per_process_uss_peak``. ``losses`` is added here: ``{step: loss}`` as rank 0 printed them.
    """
    text = resources.files("batchlab").joinpath("data", "torchrun_run.json").read_text(encoding="utf-8")
    record = json.loads(text)
    pattern = re.compile(r"step\s+(\d+)\s+loss (\d+\.\d+)")
    record["losses"] = {int(m.group(1)): float(m.group(2)) for m in map(pattern.match, record["stdout"]) if m}
    return record


if __name__ == "__main__":
    main()
