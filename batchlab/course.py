"""The first cell of every chapter: seeds, a device report, and settings that keep outputs stable."""

from __future__ import annotations

import random

import numpy as np
import torch

from .validation import check_int


def setup(seed: int = 0) -> torch.device:
    """Seed Python, NumPy and torch, ask torch for deterministic kernels, and report the device.

    In a notebook it also makes figures show inline.

    Returns ``torch.device("cuda")`` when a CUDA GPU is present and ``torch.device("cpu")`` otherwise.
    Chapters use the returned device; on a CPU they fall back to the simulated GPU budget, the
    memory estimator and the reference measurements from a real GPU.
    """
    check_int("seed", seed, minimum=0)
    _show_figures_inline()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.cuda.is_available():
        device = torch.device("cuda")
        print(f"Seed {seed}. Device: CUDA GPU ({torch.cuda.get_device_name()}); GPU cells measure it directly.")
    else:
        device = torch.device("cpu")
        print(f"Seed {seed}. Device: CPU (no CUDA GPU here); GPU cells use estimates and reference measurements.")
    return device


def _show_figures_inline() -> None:
    """In a notebook, display a returned ``matplotlib.figure.Figure`` as a PNG image."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None and hasattr(shell, "run_line_magic"):
        shell.run_line_magic("matplotlib", "inline")
