"""Argument checks shared by every public function, and the units of memory sizes.

Each check raises ``ValueError`` or ``TypeError`` with a message that names the argument, shows the
value that was given and says what would work, so a learner can fix the call without reading code.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn
from torch.utils.data import Dataset

from .losses import DefaultLoss


def check_int(name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` if it is an int within ``[minimum, maximum]``; raise a readable error otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value}")
    return value


def check_float(name: str, value, *, positive: bool = True) -> float:
    """Return ``value`` as a float if it is a (positive) real number; raise a readable error otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value}")
    return float(value)


def check_choice(name: str, value, choices) -> str:
    """Return ``value`` if it is one of ``choices``; raise a readable error listing them otherwise."""
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


MAX_BYTES = 2**50  # 1 PiB: a memory size above it is a typo, not a machine

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(name: str, value) -> int:
    """A memory size in bytes from an int (bytes) or a string such as "4GiB", "4 GB", "512 MiB".

    KiB, MiB, GiB and TiB are powers of 1024 (what ``torch.cuda`` reports); KB, MB, GB and TB are
    powers of 1000. Units are not case-sensitive.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{name} must be a number of bytes or a string like '4GiB', got {value!r}")
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        number = text.rstrip("kmgtib")
        unit = text[len(number) :] or "b"
        try:
            size = float(number)
        except ValueError:
            size = None
        if size is None or unit not in _UNITS or not size == size or size == float("inf"):
            raise ValueError(
                f"{name} {value!r} is not a memory size; write a number and a unit, e.g. '4GiB', '512 MiB', "
                f"'8 GB' or a plain number of bytes (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            )
        size = round(size * _UNITS[unit])
    else:
        size = value
    if size <= 0:
        raise ValueError(f"{name} must be a positive amount of memory, got {value!r}")
    if size > MAX_BYTES:
        raise ValueError(
            f"{name} {value!r} is more memory than any machine has: at most 1 PiB (2**50 bytes), "
            f"e.g. '80GiB' for a large GPU"
        )
    return size


# -- units ----------------------------------------------------------------------------------------

KiB, MiB, GiB = 2**10, 2**20, 2**30


def format_bytes(nbytes: float) -> str:
    """A size for people: ``"1.50 GiB"``, ``"512.0 MiB"``, ``"12.0 KiB"`` or ``"100 B"`` (powers of 1024)."""
    size = abs(nbytes)
    if size >= GiB:
        return f"{nbytes / GiB:.2f} GiB"
    if size >= MiB:
        return f"{nbytes / MiB:.1f} MiB"
    if size >= KiB:
        return f"{nbytes / KiB:.1f} KiB"
    return f"{nbytes:g} B"


# -- the arguments every chapter passes -----------------------------------------------------------


def check_bool(name: str, value) -> bool:
    """Return ``value`` if it is True or False (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_seed(name: str, seed) -> int:
    """A seed that Python, NumPy and torch all accept: an int from 0 to 2**32 - 1."""
    return check_int(name, seed, minimum=0, maximum=2**32 - 1)


def check_model(model, name: str = "model"):
    """Return ``model`` if it is a ``torch.nn.Module``."""
    if not isinstance(model, nn.Module):
        hint = " (build one with batchlab.build_model(name))" if isinstance(model, str) else ""
        raise TypeError(f"{name} must be a torch.nn.Module{hint}, got {type(model).__name__}")
    return model


def check_trainable(model, name: str = "model"):
    """Return ``model`` if it is a ``torch.nn.Module`` with at least one parameter that requires a gradient."""
    check_model(model, name)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            f"{name} has no trainable parameters ({type(model).__name__}): a training step has "
            "nothing to update. Pass a model with weights, e.g. batchlab.build_model('mlp')"
        )
    return model


def device_of(model):
    """The device of ``model``'s first parameter (the CPU for a model without parameters)."""
    tensor = next(iter(model.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def check_device(device, name: str = "device"):
    """``device`` as a ``torch.device`` that can run a training step here.

    A string such as ``"cpu"``, ``"cuda"`` or ``"cuda:1"``, a GPU number, or a ``torch.device``. Refused
    before anything is moved: ``"meta"`` (its tensors have no values, so nothing can train there), a CUDA
    device on a machine without one (or a GPU number past the last GPU), and devices torch does not know.
    """
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(
            f"{name} must be a torch device such as 'cpu' or 'cuda', got {device!r} ({type(device).__name__})"
        )
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a torch device such as 'cpu' or 'cuda', got {device!r}") from error
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "meta":
        raise ValueError(
            f"{name} 'meta' cannot train: meta tensors have shapes but no values. Use 'cpu' or "
            "'cuda' (batchlab.estimate_memory runs a step on the meta device for you)"
        )
    backend = getattr(torch, parsed.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ValueError(
            f"{name} {device!r} is not available on this machine: use 'cpu'"
            f"{' (no CUDA GPU here)' if parsed.type == 'cuda' else ''}"
        )
    count = getattr(backend, "device_count", lambda: 1)()
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(
            f"{name} {device!r} does not exist: this machine has {count} {parsed.type} device(s), numbered from 0"
        )
    return parsed


def check_loss_fn(loss_fn):
    """``loss_fn``, or cross-entropy (the mean over the batch, :class:`batchlab.losses.DefaultLoss`) when None."""
    if loss_fn is None:
        return DefaultLoss()
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (like torch.nn.CrossEntropyLoss()), got {loss_fn!r}")
    return loss_fn


def describe(item) -> str:
    """``a tuple of (Tensor, int)``: what a sample or batch is, for error messages."""
    if isinstance(item, (tuple, list)):
        return f"a {type(item).__name__} of ({', '.join(type(x).__name__ for x in item)})"
    return f"a {type(item).__name__}"


def check_dataset(dataset, name: str = "dataset", *, labelled: bool = True):
    """Return ``dataset`` if it is a non-empty map-style torch ``Dataset`` with a length.

    ``labelled``: its items must also be (input tensor, integer label) pairs, as training needs.
    """
    if not isinstance(dataset, Dataset) or not hasattr(dataset, "__len__"):
        raise TypeError(f"{name} must be a map-style torch Dataset with a length, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError(f"{name} is empty: it must hold at least one sample")
    if labelled:
        item = dataset[0]
        if (
            not isinstance(item, (tuple, list))
            or len(item) != 2
            or not isinstance(item[0], torch.Tensor)
            or not isinstance(item[1], (int, torch.Tensor))
        ):
            raise TypeError(f"{name} must yield (input tensor, integer label) pairs, but item 0 is {describe(item)}")
    return dataset


def check_batch(batch, name: str = "batch", *, keyword_inputs: bool = False):
    """``(inputs, targets)`` from a batch as a DataLoader yields it: two tensors with the same first dimension.

    With ``keyword_inputs`` (the estimator and the planner), ``inputs`` may also be a dict of tensors, the
    keyword inputs of ``model(**inputs)`` (a tokenizer's ``input_ids`` and ``attention_mask``), each with
    the batch as its first dimension.
    """
    keyword = (
        keyword_inputs
        and isinstance(batch, (tuple, list))
        and len(batch) == 2
        and isinstance(batch[0], dict)
        and batch[0]
        and all(isinstance(t, torch.Tensor) for t in batch[0].values())
    )
    if (
        not isinstance(batch, (tuple, list))
        or len(batch) != 2
        or not isinstance(batch[1], torch.Tensor)
        or not (keyword or isinstance(batch[0], torch.Tensor))
    ):
        also = " (inputs may be a dict of tensors, the keyword inputs of model(**inputs))" if keyword_inputs else ""
        raise TypeError(
            f"{name} must be a pair (inputs, targets) of tensors, as a DataLoader yields{also}, got {describe(batch)}"
        )
    inputs, targets = batch
    for shape in [t.shape for t in inputs.values()] if keyword else [inputs.shape]:
        if shape[:1] != targets.shape[:1]:
            raise ValueError(
                f"{name} inputs and targets must have the same number of samples, got "
                f"{shape_of(inputs)} and {tuple(targets.shape)}"
            )
    if len(targets) == 0:
        raise ValueError(f"{name} is empty: it must hold at least one sample")
    return inputs, targets


def batch_length(inputs) -> int:
    """Samples in ``inputs``: a tensor's first dimension, or that of the tensors of a dict of keyword inputs."""
    return len(next(iter(inputs.values()))) if isinstance(inputs, dict) else len(inputs)


def shape_of(inputs, *, per_sample: bool = False):
    """The shape of ``inputs`` for messages: a tuple, or ``{name: shape}`` for keyword inputs.

    ``per_sample``: without the batch dimension.
    """
    start = 1 if per_sample else 0
    if isinstance(inputs, dict):
        return {key: tuple(value.shape[start:]) for key, value in inputs.items()}
    return tuple(inputs.shape[start:])


def inputs_to(inputs, device):
    """``inputs`` (a tensor, or a dict of keyword inputs) moved to ``device``."""
    if isinstance(inputs, dict):
        return {key: value.to(device) for key, value in inputs.items()}
    return inputs.to(device)
