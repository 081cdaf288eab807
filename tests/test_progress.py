"""Progress bars (batchlab.progress): every long-running function draws one bar, advanced once per unit of
work and closed at the end; progress=False draws nothing; the bars never change a result."""

import os

import pytest
import torch
import torch.distributed as dist

import batchlab
from batchlab import datasets, progress
from batchlab.budget import memory_budget


class RecordingBar:
    """Stands in for tqdm.auto.tqdm: keeps the options it was made with, its count and whether it closed."""

    made = []

    def __init__(self, **options):
        self.options, self.n, self.closed, self.postfix = options, 0, False, {}
        RecordingBar.made.append(self)

    def update(self, n=1):
        self.n += n

    def set_postfix(self, refresh=True, **values):
        self.postfix = values

    def close(self):
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.fixture
def bars(monkeypatch):
    RecordingBar.made = []
    monkeypatch.setattr(progress, "tqdm", RecordingBar)
    return RecordingBar.made


def only_bar(bars):
    assert len(bars) == 1, [b.options for b in bars]
    bar = bars[0]
    assert bar.closed and "disable" not in bar.options and bar.options["leave"] is False
    return bar


def mlp():
    return batchlab.build_model("mlp", in_shape=(1, 8, 8))


def test_bars_are_quiet_in_the_unit_tests_and_drawn_in_the_notebook_kernels():
    from tqdm.auto import tqdm

    with tqdm(total=3) as bar:  # tests/conftest.py imported tqdm with TQDM_DISABLE=1
        assert bar.disable
    assert "TQDM_DISABLE" not in os.environ  # ... and removed it, so nbval's kernels draw their bars


def test_train_bar_counts_the_steps_and_shows_the_loss(bars):
    history = batchlab.train(mlp(), datasets.digits(), batch_size=32, steps=7, progress=True, label="run")
    bar = only_bar(bars)
    assert (bar.options["total"], bar.n, bar.options["desc"]) == (7, 7, "run")
    assert bar.postfix == {"loss": f"{history.loss[-1]:.3f}"}


def test_progress_false_makes_no_bar_and_the_same_history(bars):
    quiet = batchlab.train(mlp(), datasets.digits(), batch_size=32, steps=5, progress=False)
    assert bars == []  # not even a disabled tqdm, whose monitor thread would outlive the call
    loud = batchlab.train(mlp(), datasets.digits(), batch_size=32, steps=5, progress=True)
    assert len(bars) == 1 and "disable" not in bars[0].options
    assert quiet.loss == loud.loss
    assert isinstance(progress.progress_bar(False), progress.NoBar)


def test_probe_batch_size_bar_counts_its_trials(bars):
    model = batchlab.build_model("cnn_bn", in_shape=(3, 32, 32), num_classes=5)
    with memory_budget("48MiB", model):
        search = batchlab.probe_batch_size(
            model, lambda n: (torch.randn(n, 3, 32, 32), torch.randint(0, 5, (n,))), mode="power"
        )
    bar = only_bar(bars)
    assert bar.n == len(search.trials) >= 3
    assert bar.postfix == {"batch": search.trials[-1][0]}


def test_max_batch_size_bar_counts_its_estimates(bars, monkeypatch):
    import batchlab.max_batch as estimate

    calls = []
    real_fits = estimate._fits
    monkeypatch.setattr(estimate, "_fits", lambda *args: calls.append(args[2]) or real_fits(*args))
    n = batchlab.max_batch_size(
        mlp(),
        lambda n: (torch.empty(n, 1, 8, 8, device="meta"), torch.empty(n, dtype=torch.long, device="meta")),
        budget="512MiB",
    )
    bar = only_bar(bars)
    assert bar.n == len(calls) >= 3 and n in calls


def meta_batch(n):
    return torch.empty(n, 1, 8, 8, device="meta"), torch.empty(n, dtype=torch.long, device="meta")


def test_plan_fit_bar_counts_its_settings_and_its_searches_draw_none(bars):
    plan = batchlab.plan_fit(
        mlp(), meta_batch, budget="512MiB", effective_batch=256, precisions=("fp32", "bf16"), checkpointing=False
    )
    bar = only_bar(bars)  # max_batch_size inside draws no bar of its own
    assert bar.n == bar.options["total"] == 2 and plan.micro_batches == [256]


def test_loader_sweep_bar_counts_its_runs(bars):
    batchlab.loader_sweep(
        datasets.shapes(64, image_size=8), num_workers=(0,), batch_size=(8, 16), repeats=2, batches=2, warmup=1
    )
    bar = only_bar(bars)
    assert (bar.options["total"], bar.n) == (4, 4)
    assert bar.postfix == {"batch_size": 16, "num_workers": 0}


def test_leak_check_bar_counts_its_calls_and_does_not_look_like_a_leak(bars):
    model = mlp()
    x = torch.randn(16, 1, 8, 8)

    def step():
        model(x).sum().backward()
        model.zero_grad(set_to_none=True)

    report = batchlab.leak_check(step, iterations=10, warmup=2, label="clean", progress=True)
    bar = only_bar(bars)
    assert (bar.options["total"], bar.n, bar.options["desc"]) == (12, 12, "leak_check clean")
    assert not report.leaking, report.message


def rank_plus_one(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def test_launch_bar_counts_the_finished_processes(bars):
    assert batchlab.launch(rank_plus_one, nprocs=2, timeout=120) == 3.0
    bar = only_bar(bars)
    assert (bar.options["total"], bar.n) == (2, 2)


@pytest.mark.parametrize(
    "call",
    [
        lambda: batchlab.train(mlp(), datasets.digits(), batch_size=32, steps=1, progress="yes"),
        lambda: batchlab.probe_batch_size(
            mlp(), lambda n: (torch.randn(n, 1, 8, 8), torch.zeros(n, dtype=torch.long)), progress=1
        ),
        lambda: batchlab.max_batch_size(
            mlp(), lambda n: (torch.randn(n, 1, 8, 8), torch.zeros(n, dtype=torch.long)), budget="1GiB", progress=None
        ),
        lambda: batchlab.loader_sweep(datasets.shapes(16, image_size=8), num_workers=(0,), progress="no"),
        lambda: batchlab.leak_check(lambda: None, progress=0),
        lambda: batchlab.launch(rank_plus_one, progress="on"),
        lambda: batchlab.train_ddp("mlp", datasets.digits(), batch_size=32, steps=1, progress=2),
        lambda: batchlab.plan_fit(mlp(), meta_batch, budget="1GiB", effective_batch=64, progress="yes"),
    ],
    ids=[
        "train",
        "probe_batch_size",
        "max_batch_size",
        "loader_sweep",
        "leak_check",
        "launch",
        "train_ddp",
        "plan_fit",
    ],
)
def test_progress_must_be_a_bool(call, bars):
    with pytest.raises(TypeError, match="progress must be True or False, got"):
        call()
    assert bars == []  # refused before any bar (or any work) started


def test_the_explorer_and_the_exercise_checks_draw_no_bars_of_their_own(bars):
    from batchlab.widgets import BatchSizeExplorer

    explorer = BatchSizeExplorer(datasets.digits(), model="mlp", panels="memory")
    explorer.close()
    assert bars == []  # its own texts say what it does


def test_the_nbval_rule_blanks_a_bars_meter_and_nothing_else():
    import configparser
    import re
    from pathlib import Path

    from tqdm import tqdm

    rules = configparser.ConfigParser()
    rules.read(Path(__file__).parent / "nbval_sanitize.cfg")
    rule = rules["progress bars"]
    meters = [
        tqdm.format_meter(0, 40, 0, prefix="batch 64, lr 0.05", unit="step", ascii=False),  # as a widget shows
        tqdm.format_meter(0, None, 0, prefix="probe_batch_size (power)", unit="trial"),  # no total known
        tqdm.format_meter(7, 40, 3725.0, prefix="train", unit="step", postfix="loss=0.123"),
    ]
    for meter in meters:
        assert re.sub(rule["regex"], rule["replace"], meter) == "(progress bar)", meter
    lesson = "epoch [1/2]: loss 0.512 [after 32 steps]\nbatch 94 after 13 trials: 2, 4, 8 (OOM)"
    assert re.sub(rule["regex"], rule["replace"], lesson) == lesson
