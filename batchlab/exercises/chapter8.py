"""Chapter 8 (tuning): optimizer memory per parameter, checkpoint segments, the critical batch size."""

from __future__ import annotations

import math

from .turn import your_turn

# Bytes per parameter that an fp32 training step keeps between steps and at its end: the weight, its
# gradient and the optimizer's state (SGD: none; momentum: one buffer; Adam and AdamW: two moments).
_FP32_BYTES_PER_PARAMETER = {"sgd": 4 + 4, "momentum": 4 + 4 + 4, "adam": 4 + 4 + 8, "adamw": 4 + 4 + 8}


def check_bytes_per_parameter(answer, *, optimizer: str = "adam"):
    """Chapter 8: bytes per parameter of fp32 weights + gradients + ``optimizer``'s state."""
    if optimizer not in _FP32_BYTES_PER_PARAMETER:
        names = ", ".join(repr(n) for n in _FP32_BYTES_PER_PARAMETER)
        raise ValueError(f"optimizer must be one of {names}, got {optimizer!r}")
    if your_turn(f"how many bytes per parameter do the fp32 weights, gradients and {optimizer}'s state take?", answer):
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
    if your_turn(
        f"into how many segments should a chain of {layers} equal layers be cut to keep the fewest activations alive?",
        answer,
    ):
        return
    cost = {k: k + math.ceil(layers / k) for k in range(1, layers + 1)}  # boundaries + one segment's inside
    best = min(cost.values())
    assert isinstance(answer, int) and answer in cost and cost[answer] == best, (
        f"{answer} is not right. Count what is alive at the peak: one saved input per segment, plus the "
        "activations of the one segment being recomputed. Which number of segments makes that sum smallest?"
    )
    print(
        f"Correct: {answer} segments keep {best} layers' activations instead of {layers}: about "
        f"2 sqrt(n) = {2 * math.sqrt(layers):.1f}, for one extra forward pass."
    )


def check_critical_batch(answer, *, gradient_norm_sq: float = 0.25, trace_covariance: float = 40.0):
    """Chapter 8: B_simple = tr(Sigma) / |G|^2 from the two estimates."""
    if your_turn(f"what is B_simple when |G|^2 = {gradient_norm_sq} and tr(Sigma) = {trace_covariance}?", answer):
        return
    expected = trace_covariance / gradient_norm_sq
    assert isinstance(answer, (int, float)) and math.isclose(answer, expected, rel_tol=1e-3), (
        f"{answer} is not right. B_simple is the batch at which the mini-batch noise, tr(Sigma) / B, is as "
        "large as the squared gradient |G|^2."
    )
    print(
        f"Correct: B_simple = {expected:g} samples. Well below it, doubling the batch nearly halves the "
        "steps; well above it, a larger batch saves few steps."
    )
