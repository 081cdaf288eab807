"""The checks of chapter 6's exercises: naming the bug of an accumulation loop, and writing a right one.

A learner's loop is a function ``loop(model, optimizer, inputs, targets, accumulation_steps)`` that
trains on one effective batch ``(inputs, targets)`` in ``accumulation_steps`` micro-batches. The checks
train the digits MLP with it and compare the weights with those of :func:`reference_loop`, the right
loop or the same loop with one of :data:`BUGS`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import default_collate

from ..datasets import digits
from ..models import build_model
from ..validation import check_choice
from .turn import your_turn

BUGS = ("missing loss scaling", "zero_grad in the wrong place", "steps every micro-batch")


def reference_loop(bug: str | None):
    """The right loop (``bug=None``) or the same loop with one of :data:`BUGS`, as the checks run it."""

    def loop(model, optimizer, inputs, targets, accumulation_steps):
        for x, y in zip(inputs.chunk(accumulation_steps), targets.chunk(accumulation_steps)):
            if bug == "zero_grad in the wrong place":
                optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            share = 1.0 if bug == "missing loss scaling" else len(y) / len(targets)
            (loss * share).backward()
            if bug == "steps every micro-batch":
                optimizer.step()
                optimizer.zero_grad()
        if bug != "steps every micro-batch":
            optimizer.step()
            optimizer.zero_grad()

    return loop


def _final_weights(loop, batch_size: int, accumulation_steps: int, *, steps: int, momentum: float) -> torch.Tensor:
    """The MLP's weights after ``loop`` trained it on ``steps`` batches of the digits (all flattened)."""
    data = digits(train=True)
    model = build_model("mlp", in_shape=(1, 8, 8), seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for step in range(steps):
            inputs, targets = default_collate([data[i] for i in range(step * batch_size, (step + 1) * batch_size)])
            loop(model, optimizer, inputs, targets, accumulation_steps)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _diagnose(loop, batch_size: int = 64, accumulation_steps: int = 4, steps: int = 2, momentum: float = 0.0) -> str:
    """Which of "correct" and :data:`BUGS` ``loop`` behaves like (by its weights), or "something else"."""
    mine = _final_weights(loop, batch_size, accumulation_steps, steps=steps, momentum=momentum)
    for bug in (None, *BUGS):
        theirs = _final_weights(reference_loop(bug), batch_size, accumulation_steps, steps=steps, momentum=momentum)
        if torch.allclose(mine, theirs, rtol=1e-4, atol=1e-6):
            return bug or "correct"
    return "something else"


def check_loop_bugs(answers: dict, loops: dict) -> None:
    """Chapter 6, exercise 1: name the bug of each loop (a dict name -> one of :data:`BUGS`).

    Each loop is run on two batches of the digits and its weights compared with those of the right loop
    and of each bug, so the check knows what every loop does without being told.
    """
    if not isinstance(answers, dict) or set(answers) != set(loops):
        raise ValueError(f"answers must be a dict with one answer per loop, for {sorted(loops)}; got {answers!r}")
    if your_turn(f"name the bug of each loop, one of {', '.join(repr(b) for b in BUGS)}.", *answers.values()):
        return
    for name in sorted(loops):
        check_choice(f"answers[{name!r}]", answers[name], BUGS)
        found = _diagnose(loops[name])
        assert answers[name] == found, (
            f"loop {name}: {answers[name]!r} is not its bug. Compare it line by line with train's loop: what is the "
            f"loss multiplied by, when are the gradients zeroed, and how many optimizer steps does one batch make?"
        )
    print("Correct: each loop does what you said (checked by training with it and with the right loop).")


def check_accumulation_loop(loop) -> None:
    """Chapter 6, exercise 2: a loop that matches the full batch even when micro-batches are uneven.

    The loop trains on 3 batches of 50 digits in 4 micro-batches (``chunk`` makes them 13, 13, 13 and
    11 samples), with SGD and momentum; its weights must match 3 full-batch steps to float precision.
    """
    if your_turn("write my_loop so that uneven micro-batches give the full batch's update.", loop):
        return
    if not callable(loop):
        raise TypeError(
            f"loop must be a function (model, optimizer, inputs, targets, accumulation_steps), got {loop!r}"
        )
    mine = _final_weights(loop, 50, 4, steps=3, momentum=0.9)
    full = _final_weights(reference_loop(None), 50, 1, steps=3, momentum=0.9)
    difference = (mine - full).abs().max().item()
    if not torch.allclose(mine, full, rtol=1e-4, atol=1e-6):
        found = _diagnose(loop)
        hint = (
            "With equal micro-batches your loop is right, so look at what changes when they are not: "
            "the last micro-batch here has 11 samples, the others 13."
            if found == "correct"
            else "Even with four equal micro-batches of 16 it does not match the full batch: compare it with "
            "train's loop line by line."
        )
        raise AssertionError(
            f"After 3 batches your weights differ from the full batch's by up to {difference:.2g}. {hint}"
        )
    print(
        f"Correct: after 3 batches of 50 in micro-batches of 13, 13, 13 and 11, your weights match the full batch's "
        f"(largest difference {difference:.1e})."
    )
