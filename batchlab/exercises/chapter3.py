"""The checks of chapter 3's exercises: a padding ``collate_fn``, your own loader measurements, persistent workers.

* :func:`check_padding_collate` - a ``collate_fn`` that pads the sequences of
  :func:`batchlab.datasets.token_sequences` and returns a mask;
* :func:`check_best_num_workers` - the fastest ``num_workers`` in *your* measurements;
* :func:`check_persistent_prediction` - two predictions about a
  :class:`batchlab.datasets.SharedGeneratorDataset` with persistent workers, checked by running it
  (:func:`persistent_worker_numbers`).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from .. import loaders
from ..batching import iter_batches
from ..datasets import PAD, SharedGeneratorDataset, token_sequences
from ..loaders import LoaderSweep
from .turn import your_turn


def check_padding_collate(collate_fn) -> None:
    """Check a learner's padding ``collate_fn`` (the chapter 3 exercise), as the other ``check_...`` helpers do.

    ``None`` (the notebook's placeholder) prints the task; a wrong function raises ``AssertionError``
    saying which case failed and what was expected; a right one prints what was checked.

    The function receives a list of ``(tokens, label)`` samples, ``tokens`` a 1-D int64 tensor of any
    length, and must return ``(padded, mask, labels)``:

    * ``padded``: int64, shape (batch, longest sequence *in this batch*), each row the sequence
      followed by ``PAD`` (0) tokens;
    * ``mask``: bool, same shape, True at real tokens and False at padding;
    * ``labels``: int64, shape (batch,).

    Checks a mixed batch, a batch of one, a batch that needs no padding, and every batch of a
    ``DataLoader`` that uses the function.
    """
    if your_turn("write pad_collate(samples) -> (padded, mask, labels) and pass the function here.", collate_fn):
        return
    if not callable(collate_fn):
        raise TypeError(f"collate_fn must be a function from a list of samples to a batch, got {collate_fn!r}")
    data = token_sequences(40, max_length=9, seed=3)
    cases = [
        ("a batch of sequences of different lengths", [data[i] for i in range(8)]),
        ("a batch of one sequence", [data[5]]),
        ("a batch whose sequences all have the same length", _same_length(data)),
    ]
    for name, samples in cases:
        problem = _padding_problem(collate_fn, samples)
        assert problem is None, f"{name}: {problem}"
    loader = DataLoader(data, batch_size=6, collate_fn=collate_fn)
    try:
        batches = list(loader)
    except Exception as error:  # the learner's code: say what happened, as an AssertionError
        raise AssertionError(f"in a DataLoader, it raised {type(error).__name__}: {error}") from error
    for number, (batch, samples) in enumerate(zip(batches, iter_batches(data, 6, collate_fn=list))):
        problem = _padding_problem(lambda _, b=batch: b, samples)
        assert problem is None, f"batch {number} of DataLoader(data, batch_size=6, collate_fn=...): {problem}"
    print(
        "Correct:\n"
        + "\n".join(f"  ✓ {name}" for name, _ in cases)
        + f"\n  ✓ all {len(batches)} batches of a DataLoader over {len(data)} sequences, each padded to "
        "its own longest"
    )


def _same_length(data):
    by_length = {}
    for i in range(len(data)):
        tokens, label = data[i]
        by_length.setdefault(len(tokens), []).append((tokens, label))
    return max(by_length.values(), key=len)[:3]


def _padding_problem(collate_fn, samples) -> str | None:
    """What is wrong with ``collate_fn(samples)`` as a padding collate, or None."""
    try:
        result = collate_fn([(tokens.clone(), label) for tokens, label in samples])
    except Exception as error:  # the learner's code
        return f"it raised {type(error).__name__}: {error}"
    if not isinstance(result, (tuple, list)) or len(result) != 3:
        got = (
            f"a {type(result).__name__} of {len(result)}"
            if isinstance(result, (tuple, list))
            else (f"a {type(result).__name__}")
        )
        return f"expected (padded, mask, labels), got {got}"
    padded, mask, labels = result
    for name, value in (("padded", padded), ("mask", mask), ("labels", labels)):
        if not isinstance(value, torch.Tensor):
            return f"{name} should be a tensor, got {type(value).__name__}"
    longest = max(len(tokens) for tokens, _ in samples)
    expected_shape = (len(samples), longest)
    if tuple(padded.shape) != expected_shape:
        return f"padded should have shape (batch, longest in this batch) = {expected_shape}, got {tuple(padded.shape)}"
    if padded.dtype != torch.int64:
        return f"padded should keep the tokens' dtype torch.int64, got {padded.dtype}"
    if mask.dtype != torch.bool or tuple(mask.shape) != expected_shape:
        return f"mask should be a torch.bool tensor of shape {expected_shape}, got {mask.dtype} {tuple(mask.shape)}"
    if labels.dtype != torch.int64 or tuple(labels.shape) != (len(samples),):
        return f"labels should be torch.int64 of shape ({len(samples)},), got {labels.dtype} {tuple(labels.shape)}"
    for row, (tokens, label) in enumerate(samples):
        length = len(tokens)
        if not torch.equal(padded[row, :length], tokens):
            return f"row {row} of padded should start with sample {row}'s tokens {tokens.tolist()}"
        if (padded[row, length:] != PAD).any():
            return f"row {row} of padded should end with padding {PAD} after its {length} tokens"
        if not mask[row, :length].all() or mask[row, length:].any():
            return f"row {row} of mask should be True for its {length} tokens and False after them"
        if int(labels[row]) != label:
            return f"labels[{row}] should be sample {row}'s label {label}, got {int(labels[row])}"
    return None


def check_best_num_workers(answer, measured, *, batch_size: int = 64) -> None:
    """Check exercise 2 of chapter 3: the ``num_workers`` that delivered the most samples/s at ``batch_size``.

    ``measured`` is what *you* measured: a :class:`LoaderSweep`, or the explorer's ``state["measured"]``
    (a dict from ``(batch_size, num_workers)`` to samples per second). It must hold every ``num_workers``
    from 0 to one more than the usable cores at ``batch_size``, so that the settings beyond the cores
    are compared too. The right answer is the fastest setting in those measurements, not a number
    fixed in advance: on a busy machine it changes from run to run. ``None`` prints the task.
    """
    if your_turn(
        f"measure num_workers from 0 to one more than your usable cores at batch size {batch_size}, "
        "then give the num_workers that delivered the most samples per second.",
        answer,
    ):
        return
    rates = _rates_at(measured, batch_size)
    cores = loaders.usable_cores()
    missing = [n for n in range(cores + 2) if n not in rates]
    assert not missing, (
        f"measure num_workers={', '.join(map(str, missing))} at batch size {batch_size} first: this machine "
        f"has {cores} usable cores, so compare 0 to {cores + 1} workers (move the explorer's sliders, or run "
        f"loader_sweep(images, num_workers=range({cores + 2}), batch_size={batch_size}))"
    )
    assert isinstance(answer, int) and not isinstance(answer, bool), (
        f"the answer should be a number of workers (an int), got {answer!r}"
    )
    best = max(rates, key=rates.get)
    assert answer == best, (
        f"num_workers={answer} is not the fastest in your measurements at batch size {batch_size}: "
        "compare the samples per second of every setting"
    )
    print(
        f"Correct: num_workers={best} delivered {rates[best]:,.0f} samples/s, "
        f"{rates[best] / rates[0]:.2f}x num_workers=0; this machine has {cores} usable cores."
    )
    if best > cores:
        print(
            "More workers than cores came out on top: they cannot add CPU, so the settings from "
            f"{cores} workers up differ by noise. Measure again with more repeats to see it."
        )
    elif best == 0:
        print(
            "No workers came out on top: the cores were busy with other work, so the workers had no "
            "spare CPU and only added their costs. Measure again when the machine is idle."
        )


def _rates_at(measured, batch_size: int) -> dict:
    """``{num_workers: samples/s}`` at ``batch_size`` from a :class:`LoaderSweep` or a ``state["measured"]`` dict."""
    if isinstance(measured, LoaderSweep):
        pairs = {(s.batch_size, s.num_workers): s.samples_per_second for s in measured.stats}
    elif isinstance(measured, dict):
        pairs = measured
    else:
        raise TypeError(
            "measured must be a LoaderSweep or the explorer's state['measured'] (a dict from "
            f"(batch_size, num_workers) to samples/s), got {type(measured).__name__}"
        )
    return {workers: rate for (size, workers), rate in pairs.items() if size == batch_size}


def persistent_worker_numbers(epochs: int = 2) -> list:
    """The numbers a :class:`SharedGeneratorDataset` of 8 items gives with 2 *persistent* workers.

    No ``worker_init_fn``, batches of 2: one list of 4 batches per epoch, each batch the 2 numbers
    drawn for it (batches 0 and 2 come from worker 0, batches 1 and 3 from worker 1).
    """
    loader = DataLoader(
        SharedGeneratorDataset(8),
        batch_size=2,
        num_workers=2,
        persistent_workers=True,
        generator=torch.Generator().manual_seed(0),
    )
    # The persistent workers stop when the loader, which holds their iterator, is freed on return.
    return [[[round(r, 3) for r in batch[1].tolist()] for batch in loader] for _ in range(epochs)]


def check_persistent_prediction(epoch_2_repeats_epoch_1, workers_draw_the_same) -> None:
    """Check exercise 3 of chapter 3: two predictions (True or False) about ``persistent_workers=True``.

    Without a ``worker_init_fn``, with 2 persistent workers, does epoch 2 of a
    :class:`SharedGeneratorDataset` repeat epoch 1's numbers, and do the two workers still draw the
    same numbers as each other? The check runs it (:func:`persistent_worker_numbers`) and compares.
    ``None`` prints the task.
    """
    if your_turn(
        "predict, True or False, whether epoch 2 repeats epoch 1 and whether the two workers draw the "
        "same numbers, with persistent_workers=True and no worker_init_fn.",
        epoch_2_repeats_epoch_1,
        workers_draw_the_same,
    ):
        return
    for name, value in (
        ("epoch_2_repeats_epoch_1", epoch_2_repeats_epoch_1),
        ("workers_draw_the_same", workers_draw_the_same),
    ):
        assert isinstance(value, bool), f"{name} should be True or False, got {value!r}"
    first, second = persistent_worker_numbers(epochs=2)
    repeats = first == second
    same = all(epoch[0] == epoch[1] and epoch[2] == epoch[3] for epoch in (first, second))
    hint = (
        "run numbers_per_epoch with persistent_workers=True added to its DataLoader and compare the "
        "batches; remember which copy of the data set each worker uses"
    )
    assert epoch_2_repeats_epoch_1 == repeats, f"not what happens for epoch 2 against epoch 1: {hint}"
    assert workers_draw_the_same == same, f"not what happens for the two workers: {hint}"
    print(f"Correct. epoch 1: {first}\n         epoch 2: {second}")
    print(
        "Persistent workers keep their copy of the data set, generator included, from one epoch to the "
        "next, so each copy moves on"
        + (
            " - but both copies started in the same state, so the workers "
            "still agree with each other: only a worker_init_fn gives each its own generator."
            if same
            else "."
        )
    )
