"""From samples to batches by hand (chapter 3): the loop a learner would write, and its collate.

* :func:`iter_batches` - the batching loop: shuffle the indices, slice them into batches, fetch every
  sample (so per-sample transforms see samples), collate, keep or drop the last partial batch.
  Chapter 3 proves it yields the same batches as ``torch.utils.data.DataLoader``; :func:`batch_loop`
  is the loop itself, without the argument checks, as the chapter shows it.
* :func:`collate` - ``default_collate`` with an error that names the field and the shapes that differ
  (:func:`collate_problem` says what is wrong).

Measuring loaders is in :mod:`batchlab.loaders`, the pitfalls and utilities of worker processes in
:mod:`batchlab.workers`, the chapter's data sets in :mod:`batchlab.datasets`.
"""

from __future__ import annotations

import torch
from torch.utils.data import default_collate as torch_default_collate

from .validation import check_bool, check_dataset, check_int, check_seed


def iter_batches(
    dataset, batch_size: int, *, shuffle: bool = False, drop_last: bool = False, seed: int = 0, collate_fn=None
):
    """Yield batches of ``dataset`` the way ``DataLoader(num_workers=0)`` does, written out by hand.

    ``shuffle`` uses the permutation ``torch.randperm(len(dataset), generator=Generator().manual_seed(seed))``,
    the order that ``DataLoader(sampler=RandomSampler(dataset, generator=that generator))`` visits.
    ``drop_last`` skips a last batch smaller than ``batch_size``. ``collate_fn`` turns a list of
    samples into a batch (default: :func:`collate`, i.e. ``default_collate``). Arguments are checked
    when the function is called, before the first batch is asked for.
    """
    check_dataset(dataset, labelled=False)
    check_int("batch_size", batch_size, minimum=1)
    check_seed("seed", seed)
    check_bool("shuffle", shuffle)
    check_bool("drop_last", drop_last)
    if collate_fn is not None and not callable(collate_fn):
        raise TypeError(f"collate_fn must be a function from a list of samples to a batch, got {collate_fn!r}")
    return batch_loop(dataset, batch_size, shuffle, drop_last, seed, collate_fn or collate)


def batch_loop(dataset, batch_size, shuffle, drop_last, seed, collate_fn):
    """The loop of :func:`iter_batches`, without its argument checks: the code chapter 3 shows."""
    n = len(dataset)
    if shuffle:  # one permutation of all indices per pass, from its own seeded generator
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    else:
        order = list(range(n))
    for start in range(0, n, batch_size):
        indices = order[start : start + batch_size]  # the last slice may be shorter ...
        if drop_last and len(indices) < batch_size:
            return  # ... and drop_last skips it
        samples = [dataset[i] for i in indices]  # one sample at a time: per-sample transforms apply here
        yield collate_fn(samples)  # list of (x, y) -> (stacked x, tensor of y)


def collate(samples):
    """``torch.utils.data.default_collate``, with an error that says which field could not be stacked.

    ``default_collate`` stacks tensors of one shape; when the samples disagree its message does not say
    where. This raises ``ValueError`` naming the field (``[0]`` is the first element of each sample)
    and the shapes or types found, with the position in ``samples`` of the first sample of each.
    """
    try:
        return torch_default_collate(samples)
    except (RuntimeError, TypeError) as error:
        problem = collate_problem(samples)
        if problem is None:
            raise
        raise ValueError(f"cannot collate {len(samples)} samples into a batch: {problem}") from error


def collate_problem(samples) -> str | None:
    """Describe why ``samples`` cannot be stacked into one batch (which field, which shapes), or None."""
    return _mismatch(list(samples), "")


def _mismatch(items, where):
    label = f"field {where}" if where else "the samples"
    kinds = {}
    for i, item in enumerate(items):
        kind = "tensor" if isinstance(item, torch.Tensor) else type(item).__name__
        kinds.setdefault(kind, i)
    if len(kinds) > 1 and not set(kinds) <= {"int", "float", "bool"}:
        found = "; ".join(f"samples[{i}] has a {kind}" for kind, i in kinds.items())
        return f"{label} mixes types: {found}"
    first = items[0]
    if isinstance(first, torch.Tensor):
        shapes_seen = {}
        for i, item in enumerate(items):
            shapes_seen.setdefault(tuple(item.shape), i)
        if len(shapes_seen) > 1:
            found = "; ".join(f"samples[{i}] has shape {shape}" for shape, i in list(shapes_seen.items())[:4])
            return (
                f"{label} has tensors of different shapes ({found}). Resize or crop them to one size, "
                "or pass a collate_fn that pads them"
            )
        return None
    if isinstance(first, dict):
        keys = {tuple(sorted(map(str, item))) for item in items}
        if len(keys) > 1:
            return f"{label} has dicts with different keys: {sorted(keys)}"
        for key in first:
            problem = _mismatch([item[key] for item in items], f"{where}[{key!r}]")
            if problem:
                return problem
        return None
    if isinstance(first, (tuple, list)):
        lengths = {len(item) for item in items}
        if len(lengths) > 1:
            return f"{label} has sequences of different lengths {sorted(lengths)}"
        for j in range(len(first)):
            problem = _mismatch([item[j] for item in items], f"{where}[{j}]")
            if problem:
                return problem
    return None
