"""Data parallelism over processes with ``torch.distributed`` (chapter 7).

Three pieces, each small enough to read in one go:

* :func:`launch` starts ``nprocs`` processes from a notebook (what ``torchrun`` does from a shell),
  joins them into a process group and runs ``fn(rank, world_size, *args)`` in each. It returns rank 0's
  result, raises a failing rank's exception with that rank's traceback, and stops every process it
  started after an error, a timeout or a keyboard interrupt.
* :func:`global_batch_order` asks ``DistributedSampler`` which samples each process gets, and lists
  them in the order of the *global* batches, so that one process can replay exactly what the group saw.
* :func:`train_process` is the code every process runs: ``DistributedSampler``, ``DistributedDataParallel``,
  gradient accumulation with ``no_sync``. :func:`train_ddp` runs it under :func:`launch`; the script
  ``python -m batchlab.ddp_train`` runs the same function under ``torchrun``.

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
import math
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
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from .models import MODEL_NAMES, build_model
from .progress import progress_bar
from .steps import check_optimizer, make_optimizer, train_step
from .training import History
from .validation import check_bool, check_choice, check_dataset, check_float, check_int, check_seed
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


# -- which samples each process gets --------------------------------------------------------------


def samples_per_process(n: int, world_size: int, drop_last: bool = False) -> int:
    """How many samples ``DistributedSampler`` gives each process per epoch: the data padded up to a
    multiple of ``world_size`` by repeating samples, or cut down to one with ``drop_last``."""
    return n // world_size if drop_last else math.ceil(n / world_size)


def sampler_assignment(
    n: int, world_size: int, *, epoch: int = 0, shuffle: bool = True, seed: int = 0, drop_last: bool = False
) -> list:
    """For each rank, the indices that ``DistributedSampler`` gives it in ``epoch``, over ``n`` samples."""
    assignment = []
    for rank in range(world_size):
        sampler = DistributedSampler(
            range(n), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        sampler.set_epoch(epoch)  # what a training loop must call at the start of every epoch
        assignment.append(list(sampler))
    return assignment


def global_batch_order(
    n: int, *, world_size: int, batch_size: int, steps: int, seed: int = 0, drop_last: bool = False
) -> list:
    """The sample indices that DDP training over ``n`` samples uses, in the order of its global batches.

    Step *k* of :func:`train_ddp` (global batch ``batch_size``) trains on
    ``order[k * batch_size:(k + 1) * batch_size]``: each process's *k*-th local batch from its
    ``DistributedSampler`` (seeded with ``seed``, ``set_epoch`` at every epoch), rank after rank.
    Training one process on ``Subset(dataset, order)`` without shuffling replays the same batches.
    """
    local = batch_size // world_size
    order, epoch = [], 0
    while len(order) < steps * batch_size:
        per_rank = sampler_assignment(n, world_size, epoch=epoch, seed=seed, drop_last=drop_last)
        for start in range(0, len(per_rank[0]) - local + 1, local):  # full local batches only (drop_last)
            for indices in per_rank:
                order.extend(indices[start : start + local])
        epoch += 1
    return order[: steps * batch_size]


def plot_sampler(
    n: int, world_size: int, *, epochs=(0, 1), shuffle: bool = True, seed: int = 0, drop_last: bool = False
):
    """Which sample each rank gets in each of ``epochs``: one row per epoch, one colour per rank.

    Hatched boxes are padding: samples that ``DistributedSampler`` repeats so that every rank gets
    the same number (``drop_last=True`` cuts the data instead). Returns a matplotlib ``Figure``.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    per_rank = samples_per_process(n, world_size, drop_last)
    fig = Figure(figsize=(0.42 * world_size * (per_rank + 1) + 1, 0.55 * len(epochs) + 0.9), layout="constrained")
    ax = fig.subplots()
    colours = [f"C{rank % 10}" for rank in range(world_size)]
    for row, epoch in enumerate(epochs):
        for rank, indices in enumerate(
            sampler_assignment(n, world_size, epoch=epoch, shuffle=shuffle, seed=seed, drop_last=drop_last)
        ):
            for j, index in enumerate(indices):
                x = rank * (per_rank + 1) + j
                padded = rank + j * world_size >= n  # positions past the end of the data are repeats
                ax.add_patch(
                    Rectangle(
                        (x, -row - 0.4),
                        0.9,
                        0.8,
                        facecolor=colours[rank],
                        edgecolor="black",
                        alpha=0.35 if padded else 0.8,
                        hatch="///" if padded else None,
                        linewidth=0.5,
                    )
                )
                ax.text(x + 0.45, -row, str(index), ha="center", va="center", fontsize=8)
    ax.set_xlim(-0.2, world_size * (per_rank + 1) - 0.8)
    ax.set_ylim(-len(epochs) + 0.45, 0.6)
    ax.set_yticks([-row for row in range(len(epochs))], [f"epoch {e}" for e in epochs])
    ax.set_xticks(
        [rank * (per_rank + 1) + (per_rank - 1) / 2 for rank in range(world_size)],
        [f"rank {rank}" for rank in range(world_size)],
    )
    ax.tick_params(length=0)
    ax.set_frame_on(False)
    ax.set_title(
        f"DistributedSampler: {n} samples over {world_size} processes\n"
        f"shuffle={shuffle}, drop_last={drop_last}; hatched: repeated to pad",
        fontsize=9,
    )
    return fig


# -- counting the gradient all-reduces ------------------------------------------------------------


@dataclass
class CommStats:
    """Gradient all-reduces seen by one process: how many calls, how many bytes, the seconds from
    starting each one to its result arriving (which includes waiting for the slowest process), and the
    bytes of each call in order (``buckets``: one entry per DDP bucket all-reduced)."""

    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0
    buckets: list = field(default_factory=list)


def counting_allreduce_hook(stats, bucket):
    """A DDP communication hook: PyTorch's default all-reduce of ``bucket``, counted and timed in ``stats``
    (a :class:`CommStats`). Unannotated on purpose: DDP checks hook annotations, and this module's
    ``from __future__ import annotations`` would turn them into strings."""
    nbytes = bucket.buffer().numel() * bucket.buffer().element_size()
    stats.calls += 1
    stats.bytes += nbytes
    stats.buckets.append(nbytes)
    start = time.perf_counter()

    def done(future):
        stats.seconds += time.perf_counter() - start
        return future.value()

    return allreduce_hook(None, bucket).then(done)  # None: the default (whole) process group


# -- training ---------------------------------------------------------------------------------------


def _num_classes(dataset) -> int:
    base = getattr(dataset, "dataset", dataset)  # a Subset keeps the classes on the data set it wraps
    return len(getattr(dataset, "classes", None) or getattr(base, "classes", None) or range(10))


def _check_ddp_args(model_name, dataset, world_size, batch_size, steps, accumulation_steps, drop_last):
    """Check everything that can be checked before a process starts; return the per-process batch."""
    check_choice("model_name", model_name, MODEL_NAMES)
    check_dataset(dataset)
    check_int("world_size", world_size, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    check_int("steps", steps, minimum=1)
    check_int("accumulation_steps", accumulation_steps, minimum=1)
    if not isinstance(drop_last, bool):
        raise TypeError(f"drop_last must be True or False, got {drop_last!r}")
    n = len(dataset)
    if world_size > n:
        raise ValueError(f"world_size={world_size} is more processes than the {n} samples of the data set can feed")
    per_step = world_size * accumulation_steps
    if batch_size % per_step:
        raise ValueError(
            f"batch_size must split into world_size x accumulation_steps = {per_step} equal "
            f"micro-batches, got {batch_size}; try a multiple of {per_step}, such as "
            f"{max(per_step, batch_size // per_step * per_step)}"
        )
    local = batch_size // world_size
    if samples_per_process(n, world_size, drop_last) < local:
        raise ValueError(
            f"each of the {world_size} processes gets {samples_per_process(n, world_size, drop_last)} "
            f"samples per epoch but needs {local} per step (batch_size {batch_size} / world_size "
            f"{world_size}): use a smaller batch_size or fewer processes"
        )
    return local


def train_ddp(
    model_name: str,
    dataset,
    *,
    world_size: int = 2,
    batch_size: int,
    steps: int,
    optimizer="sgd",
    lr: float = 0.05,
    accumulation_steps: int = 1,
    seed: int = 0,
    drop_last: bool = False,
    no_sync: bool = True,
    timeout: float | None = 300.0,
    progress: bool = True,
) -> dict:
    """Train ``build_model(model_name)`` with DistributedDataParallel in ``world_size`` processes.

    ``batch_size`` is the global effective batch: each process takes ``batch_size / world_size``
    samples per step from its ``DistributedSampler``, in ``accumulation_steps`` micro-batches. With
    ``no_sync=False`` DDP all-reduces the gradients after every micro-batch instead of once per step
    (same result, more communication). The optimizer (``"sgd"``, ``"adam"`` or a function) is built as
    :func:`batchlab.train` builds it. Returns rank 0's results, a dict with:

    ``state_dict`` (final weights, CPU tensors), ``loss`` (the mean loss over each global batch),
    ``history`` (a :class:`History` of it, for ``plot_histories``), ``comm`` (rank 0's gradient
    all-reduces: ``calls``, ``bytes``, ``seconds``), ``per_process_batch``, ``micro_batch``, ``seconds``.
    ``progress`` draws :func:`launch`'s bar over the wait.
    """
    _check_ddp_args(model_name, dataset, world_size, batch_size, steps, accumulation_steps, drop_last)
    check_optimizer(optimizer)  # refuses a bad optimizer before anything starts
    check_float("lr", lr)
    check_seed("seed", seed)
    check_bool("no_sync", no_sync)
    config = dict(
        batch_size=batch_size,
        steps=steps,
        optimizer=optimizer,
        lr=lr,
        seed=seed,
        accumulation_steps=accumulation_steps,
        drop_last=drop_last,
        no_sync=no_sync,
    )
    check_bool("progress", progress)
    return launch(_train_and_report, model_name, dataset, config, nprocs=world_size, timeout=timeout, progress=progress)


def _train_and_report(rank, world_size, model_name, dataset, config):
    """:func:`train_process` on this rank's device; the weights come back as CPU tensors."""
    device = f"cuda:{rank}" if dist.get_backend() == "nccl" else "cpu"
    result = train_process(rank, world_size, model_name, dataset, device=device, **config)
    result["state_dict"] = {k: v.detach().cpu() for k, v in result["state_dict"].items()}
    return result


def train_process(
    rank: int,
    world_size: int,
    model_name: str,
    dataset,
    *,
    batch_size: int,
    steps: int,
    optimizer="sgd",
    lr: float = 0.05,
    accumulation_steps: int = 1,
    seed: int = 0,
    drop_last: bool = False,
    no_sync: bool = True,
    device="cpu",
) -> dict:
    """The training loop that every process runs, in a process group that is already set up.

    Used by :func:`train_ddp` (processes from :func:`launch`) and by ``batchlab.ddp_train`` (processes
    from ``torchrun``); arguments as in :func:`train_ddp`. Every process returns the same dict.
    """
    local = _check_ddp_args(model_name, dataset, world_size, batch_size, steps, accumulation_steps, drop_last)
    torch.manual_seed(seed)  # the same global random state in every process
    model = build_model(
        model_name, in_shape=tuple(dataset[0][0].shape), num_classes=_num_classes(dataset), seed=seed
    ).to(device)
    # DDP copies rank 0's weights to every process, then averages gradients over processes during backward.
    # gradient_as_bucket_view: .grad lives inside DDP's communication buffers instead of beside them.
    ddp = DistributedDataParallel(model, device_ids=[device] if device != "cpu" else None, gradient_as_bucket_view=True)
    comm = CommStats()
    ddp.register_comm_hook(comm, counting_allreduce_hook)  # the default all-reduce, counted
    opt = make_optimizer(optimizer, ddp.parameters(), lr=lr)
    # Each process sees its own 1/world_size share of a permutation that is the same in every process.
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=drop_last
    )
    loader = DataLoader(dataset, batch_size=local, sampler=sampler, drop_last=True)  # equal steps everywhere
    losses, seconds = _run_steps(ddp, loader, sampler, opt, steps, accumulation_steps, no_sync, device)
    # One collective at the end instead of one per step: each process's mean loss over its share,
    # averaged over the (equal-sized) shares, is the mean loss over the global batch.
    global_loss = torch.tensor(losses, dtype=torch.float64, device=device)
    dist.all_reduce(global_loss)
    loss = (global_loss / world_size).tolist()
    history = History(
        f"DDP {world_size} x {local // accumulation_steps} x {accumulation_steps}",
        batch_size,
        loss=loss,
        samples=[batch_size * (i + 1) for i in range(steps)],
        seconds=seconds,
    )
    return dict(
        state_dict=model.state_dict(),
        loss=loss,
        history=history,
        comm=asdict(comm),
        per_process_batch=local,
        micro_batch=local // accumulation_steps,
        seconds=seconds[-1],
    )


def _run_steps(ddp, loader, sampler, opt, steps, accumulation_steps, no_sync, device):
    """The loop itself; returns this process's loss per step and the seconds after each step."""
    losses, seconds, start, epoch = [], [], time.perf_counter(), 0
    while len(losses) < steps:
        sampler.set_epoch(epoch)  # a new permutation each epoch, the same one in every process
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            # batchlab's one training step, on this process's share of the global batch. Its micro-batch
            # weights (their shares of the local batch, here equal) give the local mean loss; DDP's
            # all-reduce averages the equal-sized processes' gradients, so every process applies the
            # gradient of the mean over the global batch and the weights stay identical. no_sync keeps
            # every micro-batch's gradients local but the last's, whose backward all-reduces their sum.
            losses.append(
                train_step(
                    ddp,
                    opt,
                    inputs,
                    targets,
                    accumulation_steps=accumulation_steps,
                    no_sync=ddp.no_sync if no_sync else None,
                )
            )
            seconds.append(time.perf_counter() - start)
            if len(losses) == steps:
                break
        epoch += 1
    return losses, seconds
