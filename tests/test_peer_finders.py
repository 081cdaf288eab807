"""The batch-size finders learners already use, run on a CPU inside ``memory_budget``.

Accelerate's ``find_executable_batch_size`` and Lightning's ``Tuner.scale_batch_size`` recognise an
out-of-memory error by its text, as CUDA writes it. ``memory_budget`` (and the estimator's CPU budget)
open their messages with CUDA's words, so both finders treat the simulated error as the real one and
settle on a batch. Needs the ``peers`` extra (``pip install -e ".[peers]"``); without it these tests are
skipped and say so.
"""

import math

import pytest
import torch
from torch import nn

import batchlab
from batchlab.budget import memory_budget
from batchlab.steps import make_optimizer, train_step

BUDGET = 8 * 2**20  # bytes: room for the parameters (about 1.2 MiB) and a batch of a few hundred
FEATURES, HIDDEN, CLASSES = 64, 4096, 10  # 32 KiB of activations per sample (hidden + ReLU), float32


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def make_batch(n: int):
    return torch.randn(n, FEATURES), torch.randint(0, CLASSES, (n,))


def simulated_errors():
    """One error raised by memory_budget and one by the estimator's CPU budget, with their messages."""
    model = tiny_model()
    with memory_budget(BUDGET, model):
        try:
            model(make_batch(1024)[0])
        except torch.OutOfMemoryError as error:
            budget_error = error
    try:
        batchlab.estimate_memory(model, make_batch(1024), device="cpu", budget=BUDGET)
    except torch.OutOfMemoryError as error:
        estimate_error = error
    return {"memory_budget": budget_error, "estimate_memory": estimate_error}


def check_usable(model: nn.Module) -> None:
    """Outside the budget the model still trains: finite parameters, a finite loss, and a step changes them."""
    assert all(torch.isfinite(p).all() for p in model.parameters())
    optimizer = make_optimizer("sgd", model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    loss = train_step(model, optimizer, *make_batch(32))
    assert math.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("source", ["memory_budget", "estimate_memory"])
def test_the_simulated_errors_read_like_cuda_and_say_who_simulated_them(source):
    error = simulated_errors()[source]
    assert isinstance(error, RuntimeError) and len(error.args) == 1  # what both peers' checks require
    assert error.args[0].startswith("CUDA out of memory.")
    assert f"Simulated by batchlab.{source}" in error.args[0] and "no GPU ran out of memory" in error.args[0]


@pytest.mark.parametrize("source", ["memory_budget", "estimate_memory"])
def test_accelerate_and_lightning_recognise_the_simulated_errors(source):
    accelerate_memory = pytest.importorskip("accelerate.utils.memory", reason="needs accelerate (the peers extra)")
    lightning_memory = pytest.importorskip(
        "lightning.pytorch.utilities.memory", reason="needs lightning (the peers extra)"
    )
    error = simulated_errors()[source]
    assert accelerate_memory.should_reduce_batch_size(error)
    assert lightning_memory.is_oom_error(error)
    assert not lightning_memory.is_oom_error(RuntimeError("shapes do not match"))  # the check can say no


def test_accelerate_find_executable_batch_size_settles_inside_the_budget():
    accelerate_utils = pytest.importorskip("accelerate.utils", reason="needs accelerate (the peers extra)")
    model = tiny_model()
    optimizer = make_optimizer("sgd", model.parameters(), lr=0.01)
    trials = []

    @accelerate_utils.find_executable_batch_size(starting_batch_size=1024)
    def train_once(batch_size):
        trials.append(batch_size)
        optimizer.zero_grad(set_to_none=True)  # a failed trial may have left gradients behind
        train_step(model, optimizer, *make_batch(batch_size))
        return batch_size

    with memory_budget(BUDGET, model, optimizer):
        # SGD's momentum buffers appear at the first optimizer.step(): make them first, or the answer fits
        # only that first step and the second one runs out of memory.
        train_step(model, optimizer, *make_batch(1))
        found = train_once()
        train_step(model, optimizer, *make_batch(found))  # the answer fits, again
    # Accelerate starts at 1024 and takes 90 % after every out-of-memory error until a step fits.
    assert trials[0] == 1024 and trials[-1] == found and 1 < len(trials)
    assert all(later == int(earlier * 0.9) for earlier, later in zip(trials, trials[1:]))
    assert 16 < found < 1024
    check_usable(model)


def lightning_module(pl):
    """A LightningModule around tiny_model() whose data loader reads ``self.batch_size`` (what the tuner sets)."""
    from torch.utils.data import DataLoader, TensorDataset

    inputs, targets = make_batch(2048)  # made outside the budget, like a data set on disk

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.batch_size, self.net = 2, tiny_model()

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self):
            return DataLoader(TensorDataset(inputs, targets), batch_size=self.batch_size)

    return Tiny()


@pytest.mark.parametrize("mode", ["power", "binsearch"])
def test_lightning_scale_batch_size_settles_inside_the_budget(mode, tmp_path):
    pl = pytest.importorskip("lightning.pytorch", reason="needs lightning (the peers extra)")
    from lightning.pytorch.tuner import Tuner

    module = lightning_module(pl)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with memory_budget(BUDGET, module):
        found = Tuner(trainer).scale_batch_size(module, mode=mode, steps_per_trial=1, init_val=16, max_trials=12)
        assert found == module.batch_size
        with torch.no_grad():
            module.net(make_batch(found)[0])  # the answer's forward pass fits
    # A batch of 2048 needs 64 MiB of activations: far over the 8 MiB budget, so the tuner stopped below it.
    assert 16 <= found < 2048
    if mode == "power":
        assert found & (found - 1) == 0  # doubling from 16: the last power of two that fitted
    assert not list(tmp_path.glob(".scale_batch_size_*.ckpt"))  # the tuner restored the weights and cleaned up
    check_usable(module.net)
