"""How long `import batchlab` and `python -m batchlab.ddp_train --help` take, and what they load.

    python benchmarks/import_time.py                 # this checkout
    python benchmarks/import_time.py --before REV    # this checkout beside a git revision, in one run

Each command runs in a fresh interpreter, `--repeats` times in turn with the other tree's, and the
median is printed with `import torch` alone as the floor (every batchlab process pays for torch).
A torchrun rank imports batchlab before it trains: what it loads beyond torch is start-up time of
every rank. `--before` checks the revision out into a temporary git worktree, removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("ipywidgets", "matplotlib", "IPython")
COMMANDS = {
    "import torch": ["-c", "import torch"],
    "import batchlab": ["-c", "import batchlab"],
    "ddp_train --help": ["-m", "batchlab.ddp_train", "--help"],
}
PROBE = (
    "import sys, batchlab, batchlab.ddp_train; "
    f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))"
)


def run(tree: Path, args: list) -> float:
    """Seconds of one fresh interpreter running ``args`` with ``tree`` first on its path."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], env=env, cwd=tree, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def loaded(tree: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=tree, check=True, capture_output=True, text=True)
    return out.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", help="a git revision to compare with (e.g. the commit before a change)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    trees = {"this checkout": ROOT}
    with tempfile.TemporaryDirectory(prefix="batchlab-before-") as scratch:
        if args.before:
            before = Path(scratch) / "tree"
            subprocess.run(["git", "worktree", "add", "--detach", "-q", str(before), args.before], cwd=ROOT, check=True)
            trees = {f"before ({args.before})": before, **trees}
        try:
            times = {(name, cmd): [] for name in trees for cmd in COMMANDS}
            for _ in range(args.repeats):  # interleaved, so both trees see the same machine load
                for name, tree in trees.items():
                    for cmd, cmd_args in COMMANDS.items():
                        times[name, cmd].append(run(tree, cmd_args))
            print(
                f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; median of {args.repeats} "
                "fresh interpreters (seconds)"
            )
            print(f"{'tree':28} " + " ".join(f"{cmd:>18}" for cmd in COMMANDS) + "  heavy modules loaded")
            for name, tree in trees.items():
                medians = [statistics.median(times[name, cmd]) for cmd in COMMANDS]
                print(f"{name:28} " + " ".join(f"{m:18.2f}" for m in medians) + f"  {loaded(tree)}")
        finally:
            if args.before:
                subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
