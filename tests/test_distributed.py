"""Chapter 7: launching processes, DistributedSampler order, DDP = single-process training, torchrun."""

import gc
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Subset, TensorDataset

import batchlab
from batchlab import datasets
from batchlab.ddp_train import recorded_run
from batchlab.distributed import global_batch_order, plot_sampler, samples_per_process, train_ddp
from batchlab.processes import RankError, default_start_method, free_port, launch

ROOT = Path(__file__).resolve().parent.parent


def children():
    """Processes this test process started and that still exist. Python's own resource tracker, which
    the first ``spawn`` starts once and keeps for the life of the parent, is not a rank and is left out."""
    return [
        p
        for p in psutil.Process().children(recursive=True)
        if "multiprocessing.resource_tracker" not in " ".join(p.cmdline())
    ]


# Functions the processes run. Module-level, so that spawn can import them too.


def sum_of_ranks(rank, world_size, scale):
    t = torch.tensor([float(rank + 1)]) * scale
    dist.all_reduce(t)  # every process ends with the sum over processes
    return {
        "rank": rank,
        "world_size": world_size,
        "sum": t.item(),
        "env_rank": os.environ["RANK"],
        "threads": torch.get_num_threads(),
    }


def fails_in_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError("rank one went wrong")
    t = torch.ones(1)
    dist.all_reduce(t)  # rank 0 waits here for a peer that is gone
    return t


def hangs_in_rank_1(rank, world_size):
    if rank == 1:
        time.sleep(600)
    t = torch.ones(1)
    dist.all_reduce(t)
    return t


def freeze_count(rank, world_size):
    return gc.get_freeze_count()  # objects the garbage collector of this process never visits


def dies_in_rank_1(rank, world_size):
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # a crash that leaves no Python traceback
    time.sleep(600)


def exits_in_rank_1_during_a_collective(rank, world_size):
    if rank == 1:
        os._exit(3)  # no Python exception; rank 0, waiting in the all-reduce, sees "Connection closed by peer"
    t = torch.ones(1)
    dist.all_reduce(t)
    time.sleep(600)


def starts_a_child_then_fails(rank, world_size, pid_file):
    if rank == 1:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        Path(pid_file).write_text(str(child.pid))
        raise ValueError("rank one went wrong after starting a process")
    time.sleep(600)


# -- launch ------------------------------------------------------------------------------------------


def test_batchlab_launch_is_the_function_from_batchlab_processes():
    import batchlab.processes

    assert batchlab.launch is launch is batchlab.processes.launch
    assert batchlab.RankError is RankError


def test_launch_returns_rank_0_result_after_an_all_reduce():
    torch.ones(300, 300) @ torch.ones(300, 300)  # the parent has used its thread pool before forking
    result = launch(sum_of_ranks, 10.0, nprocs=2)
    assert result == {"rank": 0, "world_size": 2, "sum": 30.0, "env_rank": "0", "threads": 1}
    assert children() == []


def test_launch_one_process_works():
    assert launch(sum_of_ranks, 1.0, nprocs=1)["sum"] == 1.0


def test_exception_in_rank_1_surfaces_with_its_traceback_and_leaves_no_process():
    with pytest.raises(RankError) as info:
        launch(fails_in_rank_1, nprocs=2, timeout=60)
    error = info.value
    assert error.rank == 1 and error.world_size == 2
    assert "ValueError: rank one went wrong" in str(error)
    assert "in fails_in_rank_1" in error.traceback and 'raise ValueError("rank one went wrong")' in error.traceback
    assert children() == []
    assert launch(sum_of_ranks, 1.0)["sum"] == 3.0  # and the caller can launch again


def test_a_hanging_rank_times_out_with_a_clear_message_and_is_stopped():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"timed out after 3 s: rank\(s\) \[0, 1\] of 2 were still running"):
        launch(hangs_in_rank_1, nprocs=2, timeout=3)
    assert 3 <= time.monotonic() - start < 30
    assert children() == []


def test_a_rank_killed_without_a_traceback_is_reported():
    with pytest.raises(RankError, match="rank 1 of 2 failed: .*killed by signal SIGKILL"):
        launch(dies_in_rank_1, nprocs=2, timeout=60)
    assert children() == []


def test_a_rank_that_exits_without_an_exception_is_blamed_not_the_peer_it_left_waiting():
    with pytest.raises(RankError, match="rank 1 of 2 failed: the process exited with code 3 without a Python") as info:
        launch(exits_in_rank_1_during_a_collective, nprocs=2, timeout=60)
    assert info.value.rank == 1
    assert children() == []


def test_what_a_failing_rank_started_is_ended_with_it(tmp_path):
    pid_file = tmp_path / "child.pid"
    with pytest.raises(RankError, match="rank one went wrong after starting a process"):
        launch(starts_a_child_then_fails, str(pid_file), nprocs=2, timeout=60)
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"the process rank 1 started ({pid}) is still running"
        time.sleep(0.1)
    assert children() == []


def test_keyboard_interrupt_stops_every_process_and_is_raised_again(ctrl_c):
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGINT))  # as the notebook's stop button does
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            launch(hangs_in_rank_1, nprocs=2, timeout=120)
    finally:
        timer.cancel()
    assert children() == []


@pytest.mark.parametrize(
    "nprocs, error, message",
    [
        (0, ValueError, "nprocs must be a positive int, got 0"),
        (-1, ValueError, "nprocs must be a positive int, got -1"),
        ("2", TypeError, "nprocs must be an int, got '2'"),
    ],
)
def test_bad_nprocs_is_refused_before_anything_starts(nprocs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        launch(sum_of_ranks, 1.0, nprocs=nprocs)
    assert children() == []


def test_bad_launch_arguments_are_refused():
    with pytest.raises(TypeError, match="fn must be a function"):
        launch("not a function")
    with pytest.raises(ValueError, match="backend must be one of 'gloo', 'nccl', got 'mpi'"):
        launch(sum_of_ranks, 1.0, backend="mpi")
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        launch(sum_of_ranks, 1.0, timeout=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend 'nccl' needs one CUDA GPU per process"):
            launch(sum_of_ranks, 1.0, backend="nccl")


def test_a_port_in_use_is_refused_and_the_default_picks_a_free_one():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match=f"port {port} is in use .*port=None"):
            launch(sum_of_ranks, 1.0, port=port)
        assert free_port() != port
        assert launch(sum_of_ranks, 1.0)["sum"] == 3.0


def test_spawn_refuses_a_function_from_a_notebook(monkeypatch):
    def local(rank, world_size):
        return rank

    local.__module__ = "__main__"  # as if defined in a notebook, whose __main__ has no file to import
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    with pytest.raises(ValueError, match="must be importable.*defined in a notebook.*move it into a .py file"):
        launch(local, start_method="spawn")


@pytest.mark.parametrize("platform, method", [("linux", "fork"), ("darwin", "spawn"), ("win32", "spawn")])
def test_launch_forks_on_linux_only(monkeypatch, platform, method):
    # macOS: forking a process that has loaded PyTorch is not safe (CPython spawns there too); Windows: no fork.
    monkeypatch.setattr(sys, "platform", platform)
    assert default_start_method() == method


def test_on_macos_a_notebook_function_is_refused_with_the_two_ways_out(monkeypatch):
    def local(rank, world_size):
        return rank

    local.__module__ = "__main__"
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(ValueError) as info:
        launch(local)
    message = str(info.value)
    assert "spawn is the default on darwin" in message and "move it into a .py file" in message
    assert "start_method='fork'" in message and "at your own risk" in message and "tested on Linux" in message
    assert children() == []


def test_forked_ranks_start_with_the_parents_objects_frozen_and_the_parent_is_unfrozen_after():
    assert gc.get_freeze_count() == 0
    assert launch(freeze_count, nprocs=2) > 0  # the ranks' collectors leave the parent's objects alone
    assert gc.get_freeze_count() == 0  # and the parent collects them as before
    with pytest.raises(RankError):
        launch(fails_in_rank_1, nprocs=2, timeout=60)
    assert gc.get_freeze_count() == 0  # also after a failure


def test_spawn_runs_an_importable_function():
    # The start method for Windows, and for importable functions elsewhere: fresh interpreters.
    assert launch(sum_of_ranks, 2.0, start_method="spawn", timeout=240)["sum"] == 6.0
    assert children() == []


# -- DistributedSampler order --------------------------------------------------------------------------


def test_samples_per_process_pads_or_drops():
    assert samples_per_process(10, 3) == 4  # 12 slots: two samples appear twice
    assert samples_per_process(10, 3, drop_last=True) == 3
    assert samples_per_process(10, 2) == 5


def test_global_batch_order_is_each_ranks_local_batches_rank_after_rank():
    n, world_size, batch_size = 11, 2, 4
    per_rank = []
    for rank in range(world_size):
        sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=3)
        sampler.set_epoch(0)
        per_rank.append(list(sampler))
    order = global_batch_order(n, world_size=world_size, batch_size=batch_size, steps=2, seed=3)
    assert order == per_rank[0][0:2] + per_rank[1][0:2] + per_rank[0][2:4] + per_rank[1][2:4]


def test_global_batch_order_moves_to_the_next_epoch_with_set_epoch():
    n = 8
    order = global_batch_order(n, world_size=2, batch_size=4, steps=4, seed=0)
    first, second = order[:8], order[8:]
    assert sorted(first) == sorted(second) == list(range(8))  # every sample once per epoch
    assert first != second  # a new permutation in epoch 1
    padded = global_batch_order(5, world_size=2, batch_size=2, steps=3)
    assert len(padded) == 6 and len(set(padded)) == 5  # 5 samples padded to 6 by repeating one


def test_plot_sampler_draws_every_slot_and_hatches_the_padding():
    fig = plot_sampler(10, 3, epochs=(0, 1), shuffle=False)
    ax = fig.axes[0]
    assert len(ax.patches) == 2 * 3 * 4  # 2 epochs x 3 ranks x 4 samples each
    assert sum(bool(patch.get_hatch()) for patch in ax.patches) == 2 * 2  # 12 slots for 10 samples, per epoch
    assert [t.get_text() for t in ax.texts[:8]] == ["0", "3", "6", "9", "1", "4", "7", "0"]
    assert [label.get_text() for label in ax.get_xticklabels()] == ["rank 0", "rank 1", "rank 2"]


# -- DDP training ----------------------------------------------------------------------------------------


def _max_difference(state_a, state_b):
    return max((state_a[k] - state_b[k]).abs().max().item() for k in state_a)


def test_ddp_on_two_processes_equals_single_process_training_on_the_same_global_batches():
    digits = datasets.digits()
    batch_size, steps = 64, 25  # 25 steps > 22 steps per epoch: crosses an epoch (set_epoch)
    ddp = train_ddp("mlp", digits, world_size=2, batch_size=batch_size, steps=steps, lr=0.05)
    order = global_batch_order(len(digits), world_size=2, batch_size=batch_size, steps=steps)
    model = batchlab.build_model("mlp", in_shape=(1, 8, 8), seed=0)
    single = batchlab.train(
        model, Subset(digits, order), batch_size=batch_size, steps=steps, lr=0.05, shuffle=False, progress=False
    )
    assert _max_difference(ddp["state_dict"], model.state_dict()) < 1e-5
    assert ddp["loss"] == pytest.approx(single.loss, abs=1e-5)
    assert ddp["loss"][-1] < ddp["loss"][0]  # and it did learn
    assert ddp["per_process_batch"] == 32 and ddp["micro_batch"] == 32
    assert ddp["history"].loss == ddp["loss"] and ddp["history"].samples[-1] == batch_size * steps
    # Buckets: the first step all-reduces all gradients in one; from then on DDP has rebuilt its buckets in
    # the order gradients arrive, with a small first bucket (1 MiB by default) and 25 MiB for the others.
    gradient_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buckets = ddp["comm"]["buckets"]
    assert buckets[0] == gradient_bytes and len(buckets) == 1 + 2 * (steps - 1)
    first, second = buckets[-2:]
    assert first + second == gradient_bytes and 2**20 <= first < 25 * 2**20
    assert children() == []


def test_no_sync_accumulation_equals_synchronous_accumulation_with_fewer_all_reduces():
    shapes = datasets.shapes(96, image_size=8)
    kwargs = dict(world_size=2, batch_size=32, steps=4, accumulation_steps=4, optimizer="adam", lr=1e-3)
    lazy = train_ddp("cnn", shapes, no_sync=True, **kwargs)
    eager = train_ddp("cnn", shapes, no_sync=False, **kwargs)
    assert _max_difference(lazy["state_dict"], eager["state_dict"]) < 1e-5
    assert lazy["loss"] == pytest.approx(eager["loss"], abs=1e-5)
    gradient_bytes = sum(v.numel() * v.element_size() for v in lazy["state_dict"].values())
    assert lazy["comm"]["bytes"] == 4 * gradient_bytes  # one all-reduce of every gradient per step
    assert eager["comm"]["bytes"] == 4 * 4 * gradient_bytes  # one per micro-batch
    assert eager["comm"]["calls"] > 3 * lazy["comm"]["calls"]
    assert lazy["micro_batch"] == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=30, accumulation_steps=4), "batch_size must split into world_size x accumulation_steps = 8"),
        (dict(world_size=200), "world_size=200 is more processes than the 100 samples"),
        (dict(batch_size=128), "each of the 2 processes gets 50 samples per epoch but needs 64 per step"),
        (dict(world_size=0), "world_size must be a positive int, got 0"),
        (dict(optimizer="lbfgs"), "optimizer must be 'sgd', 'adam'"),
    ],
)
def test_train_ddp_refuses_bad_input_before_starting_processes(kwargs, message):
    data = TensorDataset(torch.randn(100, 1, 8, 8), torch.randint(0, 10, (100,)))
    args = dict(world_size=2, batch_size=32, steps=2) | kwargs
    with pytest.raises(ValueError, match=re.escape(message)):
        train_ddp("mlp", data, **args)
    assert children() == []


def test_train_ddp_refuses_an_unknown_model():
    with pytest.raises(ValueError, match="model_name must be one of"):
        train_ddp("gpt", datasets.digits(), batch_size=8, steps=1)


def test_train_without_shuffle_takes_the_batches_in_order():
    digits = datasets.digits()
    model = batchlab.build_model("mlp", in_shape=(1, 8, 8), seed=0)
    inputs, targets = zip(*(digits[i] for i in range(32)))
    with torch.no_grad():
        first_loss = torch.nn.functional.cross_entropy(model(torch.stack(inputs)), torch.tensor(targets)).item()
    history = batchlab.train(model, digits, batch_size=32, steps=1, shuffle=False, progress=False)
    assert history.loss[0] == pytest.approx(first_loss, abs=1e-6)
    with pytest.raises(TypeError, match="shuffle must be True or False"):
        batchlab.train(model, digits, batch_size=32, steps=1, shuffle="no")


# -- torchrun ---------------------------------------------------------------------------------------------


def readme_torchrun_command():
    """The single-machine torchrun command as the README shows it."""
    lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()]
    found = [line for line in lines if line.startswith("python -m torch.distributed.run --standalone")]
    assert found, "README.md must show the single-machine torchrun command"
    return found[0]


def test_the_readme_torchrun_command_runs_and_prints_the_rank_0_loss():
    command = shlex.split(readme_torchrun_command())
    assert "-m" in command and "batchlab.ddp_train" in command
    command[0] = sys.executable
    steps = command.index("--steps")
    command[steps + 1] = "3"  # a short run of the same command
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    final = re.search(r"final loss (\d+\.\d+) after 3 steps", done.stdout)
    assert final, done.stdout
    reference = train_ddp("mlp", datasets.digits(), world_size=2, batch_size=64, steps=3)
    assert float(final.group(1)) == pytest.approx(reference["loss"][-1], abs=1e-4)
    assert done.stdout.count("final loss") == 1  # rank 0 prints, rank 1 does not


def test_the_recorded_torchrun_run_has_the_losses_of_train_ddp_and_the_readme_command():
    record = recorded_run()
    command = shlex.split(record["command"])
    assert command[:7] == shlex.split(readme_torchrun_command())[:7]  # the README's command, other arguments
    steps = int(command[command.index("--steps") + 1])
    assert sorted(record["losses"]) == list(range(10, steps + 1, 10))
    reference = train_ddp("mlp", datasets.digits(), world_size=2, batch_size=64, steps=steps)
    for step, loss in record["losses"].items():
        assert loss == pytest.approx(reference["loss"][step - 1], abs=1e-4)  # printed with 4 decimals
    assert record["tree_peak"] == pytest.approx(record["launcher_rss"] + record["children_uss_peak"], rel=0.2)


def test_the_script_explains_that_it_needs_torchrun():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    done = subprocess.run(
        [sys.executable, "-m", "batchlab.ddp_train", "--steps", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "run this script with torchrun" in done.stderr
