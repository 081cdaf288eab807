"""What the batch size changes (chapter 1): how noisy the gradient is, and how long a step takes.

* :func:`gradient_noise` compares mini-batch gradients with the full-batch gradient.
* :func:`step_times` measures the time of one training step, and so samples per second, per batch size.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from .state import forked_rng
from .steps import train_step
from .validation import check_dataset, check_float, check_int, check_loss_fn, check_seed, check_trainable, device_of


@dataclass
class GradientNoise:
    """For one batch size: how far mini-batch gradients are from the full-batch gradient.

    ``relative_error`` is the mean of ``|g_batch - g_full| / |g_full|`` over the draws;
    ``cosine`` the mean cosine similarity between ``g_batch`` and ``g_full`` (1 = same direction).
    """

    batch_size: int
    relative_error: float
    cosine: float


def _flat_gradient(model: nn.Module, loss_fn, inputs, targets) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss_fn(model(inputs), targets).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def gradient_noise(model: nn.Module, dataset: Dataset, batch_sizes, *, draws: int = 20, seed: int = 0,
                   loss_fn=None) -> list[GradientNoise]:
    """Mini-batch gradients against the full-batch gradient, at the model's current weights.

    For each batch size, ``draws`` batches are sampled without replacement; the result shows the
    error shrinking roughly as 1 / sqrt(batch size). The caller's model is not changed (a copy is used).
    """
    check_trainable(model)
    check_dataset(dataset)
    sizes = check_batch_sizes(batch_sizes, len(dataset))
    check_int("draws", draws, minimum=1)
    check_seed("seed", seed)
    loss_fn = check_loss_fn(loss_fn)
    with forked_rng(device_of(model)):  # dropout draws from the global generator: keep the caller's
        return _gradient_noise(model, dataset, sizes, draws, seed, loss_fn)


def check_batch_sizes(batch_sizes, dataset_size: int) -> list:
    """``batch_sizes`` as a list of ints from 1 to ``dataset_size``: a list or tuple, not one number."""
    if not isinstance(batch_sizes, (list, tuple, range)) or len(batch_sizes) == 0:
        raise TypeError(f"batch_sizes must be a non-empty list of batch sizes, e.g. [8, 32, 128], got {batch_sizes!r}")
    return [check_int(f"batch_sizes[{i}]", b, minimum=1, maximum=dataset_size) for i, b in enumerate(batch_sizes)]


def _gradient_noise(model, dataset, sizes, draws, seed, loss_fn) -> list[GradientNoise]:
    model = copy.deepcopy(model).train()
    inputs, targets = default_collate([dataset[i] for i in range(len(dataset))])
    full = _flat_gradient(model, loss_fn, inputs, targets)
    generator = torch.Generator().manual_seed(seed)
    results = []
    for size in sizes:
        errors, cosines = [], []
        for _ in range(draws):
            index = torch.randperm(len(dataset), generator=generator)[:size]
            g = _flat_gradient(model, loss_fn, inputs[index], targets[index])
            errors.append(((g - full).norm() / full.norm()).item())
            cosines.append(torch.nn.functional.cosine_similarity(g, full, dim=0).item())
        results.append(GradientNoise(size, statistics.fmean(errors), statistics.fmean(cosines)))
    return results


@dataclass
class StepTime:
    """The median time of one training step (forward, backward, optimizer step) at ``batch_size``."""

    batch_size: int
    seconds: float

    @property
    def samples_per_second(self) -> float:
        return self.batch_size / self.seconds


def step_times(model: nn.Module, dataset: Dataset, batch_sizes, *, repeats: int = 5, lr: float = 0.01,
               loss_fn=None) -> list[StepTime]:
    """Median wall-clock time of an SGD step for each batch size (one warm-up step first).

    Times depend on the machine and on whatever else it is doing: treat them as measurements.
    The caller's model is not changed (a copy is trained).
    """
    check_trainable(model)
    check_dataset(dataset)
    sizes = check_batch_sizes(batch_sizes, len(dataset))
    check_int("repeats", repeats, minimum=1)
    check_float("lr", lr)
    loss_fn = check_loss_fn(loss_fn)
    with forked_rng(device_of(model)):  # dropout draws from the global generator: keep the caller's
        return _step_times(model, dataset, sizes, repeats, lr, loss_fn)


def _step_times(model, dataset, sizes, repeats, lr, loss_fn) -> list[StepTime]:
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)  # plain SGD: no state, the step is forward + backward
    results = []
    for size in sizes:
        inputs, targets = default_collate([dataset[i] for i in range(size)])
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            train_step(model, optimizer, inputs, targets, loss_fn=loss_fn)
            times.append(time.perf_counter() - start)
        results.append(StepTime(size, statistics.median(times[1:])))
    return results
