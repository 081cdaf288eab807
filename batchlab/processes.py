"""Starting processes from a notebook for data parallelism (chapter 7).

:func:`launch` starts ``nprocs`` processes from a notebook (what ``torchrun`` does from a shell),
joins them into a process group and runs ``fn(rank, world_size, *args)`` in each. It returns rank 0's
result, raises a failing rank's exception with that rank's traceback (:class:`RankError`), and stops
every process it started after an error, a timeout or a keyboard interrupt. Also here: what each rank
runs around ``fn``, how the caller waits and reports the first failure, and how the processes are
stopped; :func:`free_port`, :func:`default_backend` and :func:`default_start_method`. The training loop
that chapter 7 runs in these processes is in :mod:`batchlab.distributed`.

Why processes start with ``fork`` on Linux: a function defined in a notebook lives in the kernel's
``__main__``, which a ``spawn``-ed process cannot import, so ``spawn`` only runs functions from ``.py``
files. A forked child is a copy of the kernel, so it has the function, the data set and PyTorch already
loaded, and shares their memory pages until it writes to them. Two precautions keep fork safe and small:

* a child must not inherit a busy thread pool: PyTorch's OpenMP pool hangs in a forked child that asks
  for more than one thread after the parent used several. Each child therefore switches to one thread
  before anything else (as DataLoader workers do, and as ``torchrun`` does with ``OMP_NUM_THREADS=1``);
* the kernel's objects are frozen (:func:`gc.freeze`, as the Python documentation advises before a
  fork) while the children start: a child's garbage collector then leaves them alone instead of writing
  to every one of them, which would copy each of their memory pages into the child (benchmarks/ddp.py:
  a training rank of chapter 7 adds about 25 MiB of its own with it, about 105 MiB without).

Elsewhere ``launch`` spawns by default. On macOS forking a process that has loaded PyTorch is not safe
(Apple's system libraries are not fork-safe, which is why CPython itself spawns there since 3.8); Windows
has no fork. With spawn, ``fn`` must be importable from a ``.py`` file; ``start_method="fork"`` can still
be asked for, at the caller's risk on macOS (batchlab's tests run on Linux). CUDA cannot be initialised
again in a forked child, so with the NCCL backend and fork, CUDA must not have been used in the notebook
before :func:`launch`.
"""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from contextlib import nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist

from .progress import progress_bar
from .validation import check_bool, check_choice, check_float, check_int
from .workers import frozen_gc

BACKENDS = ("gloo", "nccl")
MASTER_ADDR = "127.0.0.1"  # every process of launch() runs on this machine


class RankError(RuntimeError):
    """An exception raised in one of the processes of :func:`launch`, carried back to the caller.

    ``rank`` is the process that failed first, ``traceback`` the text of its traceback (the exception
    object itself stays in the process that died).
    """

    def __init__(self, rank: int, world_size: int, traceback: str):
        self.rank, self.world_size, self.traceback = rank, world_size, traceback
        last = traceback.strip().splitlines()[-1] if traceback.strip() else "no Python exception"
        super().__init__(
            f"rank {rank} of {world_size} failed: {last}\n\n--- traceback from rank {rank} ---\n{traceback.rstrip()}"
        )


# -- launching processes ----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on this machine that nothing listens on now (the operating system picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((MASTER_ADDR, 0))  # port 0: let the OS choose an unused one
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((MASTER_ADDR, port))
        except OSError:
            return False
    return True


def default_backend(nprocs: int) -> str:
    """``"nccl"`` when every process can have its own CUDA GPU, ``"gloo"`` (CPU) otherwise."""
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= nprocs else "gloo"


def default_start_method() -> str:
    """How :func:`launch` starts processes unless told: ``"fork"`` on Linux, ``"spawn"`` elsewhere.

    Fork lets a notebook's own functions run in the processes; on macOS it is unsafe once PyTorch is
    loaded (CPython spawns there by default too), and Windows has no fork. See the module docstring.
    """
    return "fork" if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods() else "spawn"


def launch(
    fn,
    *args,
    nprocs: int = 2,
    backend: str | None = None,
    timeout: float | None = 300.0,
    port: int | None = None,
    start_method: str | None = None,
    progress: bool = True,
):
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` new processes that form a process group.

    Each process gets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
    in its environment (as under ``torchrun``), one CPU thread, and a process group already set up
    with ``backend`` (default: :func:`default_backend`); with NCCL, rank *r* uses GPU *r*.
    Returns what rank 0's ``fn`` returned (it travels back with ``torch.save``, so it must be picklable).

    * ``timeout`` (seconds, or None to wait for ever): if the processes have not all finished by then,
      they are stopped and ``TimeoutError`` is raised.
    * ``port``: the rendezvous port; None picks a free one.
    * ``start_method``: ``"fork"`` or ``"spawn"`` (``fn`` must then be importable from a module); the
      default is :func:`default_start_method`: fork on Linux, spawn on macOS and Windows (see the module
      docstring for why).
    * ``progress``: a bar over the wait (processes finished, seconds so far); the processes' own output
      goes to the terminal that started Jupyter, not to the notebook, so the bar lives here.

    An exception in any process is raised here as :class:`RankError` with the traceback of the
    process that failed first. Whatever happens, no process started here is left running.
    """
    start_method, backend, port = _check_launch_args(fn, nprocs, backend, timeout, port, start_method)
    check_bool("progress", progress)
    context = multiprocessing.get_context(start_method)
    workdir = tempfile.mkdtemp(prefix="batchlab-launch-")  # tracebacks and rank 0's result go here
    processes = []
    try:
        # Forked ranks share the kernel's memory pages; keep their garbage collectors off them.
        with frozen_gc() if start_method == "fork" else nullcontext():
            for rank in range(nprocs):
                process = context.Process(
                    target=_rank_main,
                    name=f"batchlab-rank-{rank}",
                    args=(rank, nprocs, fn, args, backend, port, workdir),
                )
                process.start()
                processes.append(process)
        with progress_bar(progress, total=nprocs, desc=f"launch: {nprocs} processes", unit="finished") as bar:
            _wait(processes, timeout, workdir, bar)
        result = os.path.join(workdir, "result.pt")
        if not os.path.exists(result):
            raise RuntimeError("rank 0 finished without a result: did fn call sys.exit()?")
        return torch.load(result, weights_only=False)  # written by our own rank 0 just now
    finally:  # also on KeyboardInterrupt: no process outlives this call
        _stop(processes)
        shutil.rmtree(workdir, ignore_errors=True)


def _check_launch_args(fn, nprocs, backend, timeout, port, start_method):
    """Check :func:`launch`'s arguments before any process starts; return (start method, backend, port)."""
    if not callable(fn):
        raise TypeError(f"fn must be a function fn(rank, world_size, ...), got {fn!r}")
    check_int("nprocs", nprocs, minimum=1)
    if timeout is not None:
        check_float("timeout", timeout)
    methods = multiprocessing.get_all_start_methods()
    chosen = start_method is not None
    start_method = default_start_method() if start_method is None else start_method
    check_choice("start_method", start_method, [m for m in ("fork", "spawn") if m in methods])
    interactive_main = getattr(sys.modules.get("__main__"), "__file__", None) is None  # notebook, REPL
    if start_method == "spawn" and getattr(fn, "__module__", None) == "__main__" and interactive_main:
        why = (
            ""
            if chosen
            else (
                f" (spawn is the default on {sys.platform}: forking a process that has loaded "
                "PyTorch is unsafe on macOS, and Windows cannot fork)"
            )
        )
        if sys.platform == "darwin":
            fork = (
                " Or pass start_method='fork' to run it as on Linux, at your own risk: fork is not safe on "
                "macOS once PyTorch is loaded, and batchlab is tested on Linux only."
            )
        else:
            fork = " Or use start_method='fork'." if "fork" in methods else ""
        raise ValueError(
            f"with start_method='spawn', fn must be importable, but {fn.__name__} is defined in "
            f"a notebook (or another interactive session){why}: move it into a .py file next to "
            f"the notebook and import it from there.{fork}"
        )
    backend = check_choice("backend", default_backend(nprocs) if backend is None else backend, BACKENDS)
    if backend == "nccl":
        _check_nccl(nprocs, start_method)
    if port is None:
        return start_method, backend, free_port()
    check_int("port", port, minimum=1, maximum=65535)
    if not _port_free(port):
        raise ValueError(f"port {port} is in use on {MASTER_ADDR}: pass port=None to pick a free one")
    return start_method, backend, port


def _check_nccl(nprocs: int, start_method: str) -> None:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < nprocs:
        raise ValueError(
            f"backend 'nccl' needs one CUDA GPU per process: nprocs={nprocs} but {gpus} GPU(s) "
            "here; use backend='gloo' or fewer processes"
        )
    if start_method == "fork" and torch.cuda.is_initialized():
        raise RuntimeError(
            "CUDA was already used in this process, and a forked process cannot use it again: "
            "restart the kernel and call launch before any CUDA work, or use start_method='spawn'"
        )


def _rank_main(rank, world_size, fn, args, backend, port, workdir):
    """What each started process runs: set up, call ``fn``, report, tear down."""
    if hasattr(os, "setsid"):  # a process group of its own: launch ends it whole, with what fn started
        os.setsid()
    if sys.platform == "linux":  # if the launching process dies, take this one with it
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    torch.set_num_threads(1)  # first of all: an inherited OpenMP pool hangs if this child uses several threads
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR=MASTER_ADDR,
        MASTER_PORT=str(port),
    )
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)  # one GPU per process, before NCCL sets up its communicator
        dist.init_process_group(backend, timeout=timedelta(minutes=10))  # reads the variables set above
        result = fn(rank, world_size, *args)
        if rank == 0:
            torch.save(result, os.path.join(workdir, "result.pt"))
    except KeyboardInterrupt:
        os._exit(1)  # interrupted with the caller, which reports it: no traceback of our own
    except Exception:
        import traceback

        path = os.path.join(workdir, f"error-{rank}")
        with open(path + ".part", "w") as f:
            f.write(f"{time.time()!r}\n{traceback.format_exc()}")  # the time tells which rank failed first
        os.replace(path + ".part", path + ".txt")  # the caller never reads a half-written file
        sys.exit(1)  # the caller raises it; exiting quietly avoids a second copy on this process's stderr
    finally:
        if dist.is_initialized():
            gc.collect()  # free DDP objects (they sit in reference cycles) while their process group exists
            dist.destroy_process_group()


def _wait(processes, timeout, workdir, bar=None) -> None:
    """Wait until every process has finished; raise as soon as one fails or the time is up.

    ``bar`` (a progress bar) counts the finished processes and is redrawn every second meanwhile."""
    deadline = None if timeout is None else time.monotonic() + timeout
    running = {p.sentinel: p for p in processes}
    while running:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        finished = multiprocessing.connection.wait(list(running), timeout=1.0 if left is None else min(left, 1.0))
        if bar is not None:
            bar.update(len(finished))  # also redraws the seconds so far
        if not finished and (left is None or left > 1.0):
            continue  # still running, and time is left
        if not finished:
            ranks = sorted(processes.index(p) for p in running.values())
            raise TimeoutError(
                f"launch timed out after {timeout:g} s: rank(s) {ranks} of {len(processes)} were "
                "still running (a rank stuck in a loop, or waiting in a collective for a rank "
                "that never joins it); all processes were stopped"
            )
        ended = [running.pop(sentinel) for sentinel in finished]
        for process in ended:
            process.join()
        failed = [p for p in ended if p.exitcode != 0]
        if failed:
            # A rank that died without a Python exception (os._exit, the OOM killer's SIGKILL) is the cause
            # when it ends together with peers that then raised "Connection closed by peer".
            silent = [p for p in failed if not os.path.exists(os.path.join(workdir, f"error-{processes.index(p)}.txt"))]
            raise _failure(processes, workdir, first=processes.index((silent or failed)[0]))


def _failure(processes, workdir, first: int) -> RankError:
    """The error of the rank that failed first (a peer of a failed rank often fails too, later).

    ``first`` is the rank whose process was seen to end first: without a traceback of its own it is
    reported with its exit code or signal; otherwise the earliest traceback of any rank is.
    """
    time.sleep(0.2)  # give a peer that is failing at the same moment the time to write its traceback
    if not os.path.exists(os.path.join(workdir, f"error-{first}.txt")):
        return _silent_failure(processes, first)
    reports = []
    for rank in range(len(processes)):
        path = os.path.join(workdir, f"error-{rank}.txt")
        if os.path.exists(path):
            with open(path) as f:
                when, _, text = f.read().partition("\n")
            reports.append((float(when), rank, text))
    _, rank, text = min(reports)
    return RankError(rank, len(processes), text)


def _silent_failure(processes, rank: int) -> RankError:
    code = processes[rank].exitcode
    how = f"was killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    return RankError(
        rank,
        len(processes),
        f"the process {how} without a Python exception (out of memory, os._exit, or a crash in native code?)",
    )


def _stop(processes, grace: float = 2.0) -> None:
    """Terminate (then kill) every process still alive, with the processes each rank started, and reap them."""
    for process in processes:
        _signal_group(process, signal.SIGTERM)  # a rank that already ended may have left children running
        if process.is_alive():
            process.terminate()
    end = time.monotonic() + grace
    for process in processes:
        process.join(max(0.0, end - time.monotonic()))
        if process.is_alive():
            process.kill()  # SIGTERM was not enough (stuck in native code)
            process.join()
    for process in processes:
        _signal_group(process, signal.SIGKILL)  # whatever of a group ignored SIGTERM
        process.close()


def _signal_group(process, signum) -> None:
    """Send ``signum`` to the process group a rank made for itself (its id is the rank's process id)."""
    if process.pid is None or not hasattr(os, "killpg"):
        return
    try:
        if os.getpgid(process.pid) != process.pid:
            return  # the rank has not made its group yet (or its id is now another process's)
    except ProcessLookupError:
        pass  # the rank has ended and been reaped: its group may still hold what it started
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # the group is empty: nothing left to end
