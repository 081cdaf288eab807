"""Argument checks shared by every public function.

Each check raises ``ValueError`` or ``TypeError`` with a message that names the argument, shows the
value that was given and says what would work, so a learner can fix the call without reading code.
"""

from __future__ import annotations

import numbers


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


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


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
        unit = text[len(number):] or "b"
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
    return size
