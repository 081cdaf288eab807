"""What the batch size changes (chapter 1): how noisy the gradient is, and how long a step takes.

* :func:`gradient_noise` compares mini-batch gradients with the full-batch gradient.
* :func:`step_times` measures the time of one training step, and so samples per second, per batch size.
* :func:`noise_scale` estimates the gradient noise scale of McCandlish et al. (2018), which predicts
  the critical batch size: the batch past which a larger batch buys few fewer steps (chapter 8).
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
from .validation import (
    check_dataset,
    check_float,
    check_int,
    check_loss_fn,
    check_seed,
    check_trainable,
    device_of,
)


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


def gradient_noise(
    model: nn.Module, dataset: Dataset, batch_sizes, *, draws: int = 20, seed: int = 0, loss_fn=None
) -> list[GradientNoise]:
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


def step_times(
    model: nn.Module, dataset: Dataset, batch_sizes, *, repeats: int = 5, lr: float = 0.01, loss_fn=None
) -> list[StepTime]:
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


@dataclass
class NoiseScale:
    """The gradient noise scale at the model's current weights (McCandlish et al., 2018, appendix A).

    ``gradient_norm_sq`` estimates |G|^2, the squared norm of the true (full-data) gradient;
    ``trace_covariance`` estimates tr(Sigma), the summed variance of one sample's gradient; both come
    from the mean squared norms ``small_norm_sq`` and ``big_norm_sq`` of mini-batch gradients at
    ``batch_sizes`` = (small, big). ``b_simple`` = tr(Sigma) / |G|^2 (in samples) is the batch size at
    which the noise of a mini-batch gradient is as large as the gradient itself: the paper's estimate of
    the critical batch size, below which doubling the batch almost halves the steps needed and above
    which it barely helps.
    """

    batch_sizes: tuple
    small_norm_sq: float
    big_norm_sq: float
    gradient_norm_sq: float
    trace_covariance: float

    @property
    def b_simple(self) -> float:
        return self.trace_covariance / self.gradient_norm_sq

    def steps_factor(self, batch_size: int) -> float:
        """How many times the steps of a noiseless (full-batch) run ``batch_size`` needs: 1 + B_simple / B."""
        return 1 + self.b_simple / batch_size

    def __repr__(self) -> str:
        return (
            f"NoiseScale(batches {self.batch_sizes}: |G|^2 {self.gradient_norm_sq:.4g}, "
            f"tr(Sigma) {self.trace_covariance:.4g}, B_simple {self.b_simple:.1f} samples)"
        )


def noise_scale(
    model: nn.Module, dataset: Dataset, *, batch_sizes=(8, 256), draws: int = 20, seed: int = 0, loss_fn=None
) -> NoiseScale:
    """Estimate B_simple = tr(Sigma) / |G|^2 from gradients at two batch sizes (McCandlish et al., 2018).

    A mini-batch gradient of B samples drawn with replacement has E|G_B|^2 = |G|^2 + tr(Sigma) / B,
    so the mean squared norms at a small and a big batch (``draws`` batches each) give two equations
    for the two unknowns:

        |G|^2     = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
        tr(Sigma) = (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

    Both are unbiased; their ratio is not, and is noisy when |G|^2 is small (near convergence), so use
    enough draws and read B_simple as an order of magnitude. Sigma is the covariance of one sample's
    gradient over the data set. The data set is stacked into one tensor once (the course's data sets
    are small). The caller's model is not changed (a copy is used); the global random state is not
    touched.
    """
    check_trainable(model)
    check_dataset(dataset)
    small, big = _two_batch_sizes(batch_sizes)
    check_int("draws", draws, minimum=1)
    check_seed("seed", seed)
    loss_fn = check_loss_fn(loss_fn)
    with forked_rng(device_of(model)):  # dropout draws from the global generator: keep the caller's
        return _noise_scale(model, dataset, small, big, draws, seed, loss_fn)


def _noise_scale(model, dataset, small, big, draws, seed, loss_fn) -> NoiseScale:
    model = copy.deepcopy(model).train()
    inputs, targets = default_collate([dataset[i] for i in range(len(dataset))])
    generator = torch.Generator().manual_seed(seed)
    norms = []
    for size in (small, big):
        squares = []
        for _ in range(draws):
            index = torch.randint(len(dataset), (size,), generator=generator)  # with replacement: unbiased
            squares.append(_flat_gradient(model, loss_fn, inputs[index], targets[index]).square().sum().item())
        norms.append(statistics.fmean(squares))
    small_sq, big_sq = norms
    gradient_sq = (big * big_sq - small * small_sq) / (big - small)
    trace = (small_sq - big_sq) / (1 / small - 1 / big)
    return NoiseScale((small, big), small_sq, big_sq, gradient_sq, trace)


def _two_batch_sizes(batch_sizes) -> tuple:
    if not isinstance(batch_sizes, (tuple, list)) or len(batch_sizes) != 2:
        raise ValueError(f"batch_sizes must be two batch sizes (small, big), got {batch_sizes!r}")
    small, big = (check_int("batch_sizes item", b, minimum=1) for b in batch_sizes)
    if small >= big:
        raise ValueError(f"batch_sizes must be (small, big) with small < big, got {tuple(batch_sizes)!r}")
    return small, big
