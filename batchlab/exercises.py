"""Checks for the exercises of chapters 1, 2 and 8.

Each ``check_...`` function takes the learner's answer. ``None`` (the placeholder in the notebook)
prints what to do; a wrong answer raises ``AssertionError`` with a hint; a right one prints why it is
right. Nothing here reveals the answer in its message.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset


def _pending(answer, task: str) -> bool:
    if answer is None:
        print(f"Your turn: {task}")
        return True
    return False


def check_steps_per_epoch(answer, *, n: int = 1438, batch_size: int = 100, drop_last: bool = False):
    """Chapter 1: optimizer steps in one epoch of ``n`` samples at ``batch_size``."""
    if _pending(answer, f"how many steps is one epoch of {n} samples at batch size {batch_size} "
                        f"(drop_last={drop_last})?"):
        return
    expected = n // batch_size if drop_last else math.ceil(n / batch_size)
    assert answer == expected, (
        f"{answer} is not right. Every step uses one batch; think about the last, partial batch "
        f"({n % batch_size} samples) and whether drop_last keeps it."
    )
    print(f"Correct: {expected} steps, the last one with {n % batch_size or batch_size} samples"
          + (" (dropped)." if drop_last and n % batch_size else "."))


def check_scaled_lr(answer, *, base_lr: float = 0.05, base_batch: int = 32, batch: int = 256):
    """Chapter 1: the learning rate for ``batch`` by the linear scaling rule."""
    if _pending(answer, f"by the linear scaling rule, what learning rate goes with batch {batch} "
                        f"if lr {base_lr} suits batch {base_batch}?"):
        return
    expected = base_lr * batch / base_batch
    assert isinstance(answer, (int, float)) and math.isclose(answer, expected, rel_tol=1e-6), (
        f"{answer} is not right. The rule keeps lr / batch size constant."
    )
    print(f"Correct: {expected:g}. Remember it is a starting point: past some batch size the rule breaks.")


def check_normalize_stats(mean, std, dataset: Dataset):
    """Chapter 2: per-channel mean and std of ``dataset``'s images (for ``v2.Normalize``)."""
    if mean is None or std is None:
        print("Your turn: compute the per-channel mean and std over every pixel of every image.")
        return
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    channels = images.transpose(0, 1).flatten(1)
    expected_mean, expected_std = channels.mean(1), channels.std(1)
    mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
    assert mean.shape == expected_mean.shape, (
        f"mean should have one value per channel ({len(expected_mean)}), got shape {tuple(mean.shape)}"
    )
    assert torch.allclose(mean, expected_mean, atol=1e-3), (
        "mean is off: average over the images, the height and the width, but not over the channels"
    )
    assert torch.allclose(std, expected_std, atol=1e-3), (
        "std is off: it is the spread of all pixels of a channel, not the average of per-image stds"
    )
    print(f"Correct: mean {[round(m, 3) for m in expected_mean.tolist()]}, "
          f"std {[round(s, 3) for s in expected_std.tolist()]}")


def check_squares_dataset(dataset_class):
    """Chapter 2: a map-style ``Dataset`` whose item ``i`` is ``(tensor([i]), i * i)`` for ``i < n``."""
    if _pending(dataset_class, "complete SquaresDataset and pass the class (not an instance) here."):
        return
    ds = dataset_class(5)
    assert isinstance(ds, Dataset), "SquaresDataset should subclass torch.utils.data.Dataset"
    assert len(ds) == 5, f"len(SquaresDataset(5)) should be 5, got {len(ds)}: what should __len__ return?"
    for i in range(5):
        x, y = ds[i]
        assert torch.is_tensor(x) and x.tolist() == [float(i)], f"item {i}: the input should be tensor([{i}.])"
        assert y == i * i, f"item {i}: the target should be {i * i}, got {y}"
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert batch[0].shape == (5, 1), "a DataLoader should stack the inputs into shape (5, 1)"
    print("Correct: a DataLoader can batch your data set.")


# -- chapter 8: tuning ----------------------------------------------------------------------------

# Bytes per parameter that an fp32 training step keeps between steps and at its end: the weight, its
# gradient and the optimizer's state (SGD: none; momentum: one buffer; Adam and AdamW: two moments).
_FP32_BYTES_PER_PARAMETER = {"sgd": 4 + 4, "momentum": 4 + 4 + 4, "adam": 4 + 4 + 8, "adamw": 4 + 4 + 8}


def check_bytes_per_parameter(answer, *, optimizer: str = "adam"):
    """Chapter 8: bytes per parameter of fp32 weights + gradients + ``optimizer``'s state."""
    if optimizer not in _FP32_BYTES_PER_PARAMETER:
        names = ", ".join(repr(n) for n in _FP32_BYTES_PER_PARAMETER)
        raise ValueError(f"optimizer must be one of {names}, got {optimizer!r}")
    if _pending(answer, f"how many bytes per parameter do the fp32 weights, gradients and {optimizer}'s "
                        "state take?"):
        return
    expected = _FP32_BYTES_PER_PARAMETER[optimizer]
    assert answer == expected, (
        f"{answer} is not right. Count 4-byte float32 numbers per parameter: the weight, its gradient, and "
        f"one per buffer the optimizer keeps for each parameter (read optimizer.state after one step)."
    )
    print(f"Correct: {expected} bytes per parameter, {expected // 4} float32 numbers for each weight.")


def check_checkpoint_segments(answer, *, layers: int = 16):
    """Chapter 8: the number of checkpointed segments that keeps the fewest activations of ``layers``
    equal layers alive (segment boundaries are kept all along; one segment is recomputed at a time)."""
    if not isinstance(layers, int) or layers < 1:
        raise ValueError(f"layers must be a positive int, got {layers!r}")
    if _pending(answer, f"into how many segments should a chain of {layers} equal layers be cut to keep "
                        "the fewest activations alive?"):
        return
    cost = {k: k + math.ceil(layers / k) for k in range(1, layers + 1)}  # boundaries + one segment's inside
    best = min(cost.values())
    assert isinstance(answer, int) and answer in cost and cost[answer] == best, (
        f"{answer} is not right. Count what is alive at the peak: one saved input per segment, plus the "
        "activations of the one segment being recomputed. Which number of segments makes that sum smallest?"
    )
    print(f"Correct: {answer} segments keep {best} layers' activations instead of {layers}: about "
          f"2 sqrt(n) = {2 * math.sqrt(layers):.1f}, for one extra forward pass.")


def check_critical_batch(answer, *, gradient_norm_sq: float = 0.25, trace_covariance: float = 40.0):
    """Chapter 8: B_simple = tr(Sigma) / |G|^2 from the two estimates."""
    if _pending(answer, f"what is B_simple when |G|^2 = {gradient_norm_sq} and tr(Sigma) = {trace_covariance}?"):
        return
    expected = trace_covariance / gradient_norm_sq
    assert isinstance(answer, (int, float)) and math.isclose(answer, expected, rel_tol=1e-3), (
        f"{answer} is not right. B_simple is the batch at which the mini-batch noise, tr(Sigma) / B, is as "
        "large as the squared gradient |G|^2."
    )
    print(f"Correct: B_simple = {expected:g} samples. Well below it, doubling the batch nearly halves the "
          "steps; well above it, a larger batch saves few steps.")
