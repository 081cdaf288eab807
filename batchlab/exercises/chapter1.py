"""The checks of chapter 1's exercises: steps per epoch and the linear learning-rate rule.

Chapter 2 uses :func:`check_steps_per_epoch` again (with ``drop_last``), chapter 7 :func:`check_scaled_lr`
(the effective batch of several processes).
"""

from __future__ import annotations

import math

from .turn import your_turn


def check_steps_per_epoch(answer, *, n: int = 1438, batch_size: int = 100, drop_last: bool = False):
    """Chapter 1: optimizer steps in one epoch of ``n`` samples at ``batch_size``."""
    if your_turn(
        f"how many steps is one epoch of {n} samples at batch size {batch_size} (drop_last={drop_last})?", answer
    ):
        return
    expected = n // batch_size if drop_last else math.ceil(n / batch_size)
    assert answer == expected, (
        f"{answer} is not right. Every step uses one batch; think about the last, partial batch "
        f"({n % batch_size} samples) and whether drop_last keeps it."
    )
    print(
        f"Correct: {expected} steps, the last one with {n % batch_size or batch_size} samples"
        + (" (dropped)." if drop_last and n % batch_size else ".")
    )


def check_scaled_lr(answer, *, base_lr: float = 0.05, base_batch: int = 32, batch: int = 256):
    """Chapter 1: the learning rate for ``batch`` by the linear scaling rule."""
    if your_turn(
        f"by the linear scaling rule, what learning rate goes with batch {batch} "
        f"if lr {base_lr} suits batch {base_batch}?",
        answer,
    ):
        return
    expected = base_lr * batch / base_batch
    assert isinstance(answer, (int, float)) and math.isclose(answer, expected, rel_tol=1e-6), (
        f"{answer} is not right. The rule keeps lr / batch size constant."
    )
    print(f"Correct: {expected:g}. Remember it is a starting point: past some batch size the rule breaks.")
