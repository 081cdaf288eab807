"""The first cell of every chapter: seeds, a device report, and settings that keep outputs stable."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from .validation import check_seed


def setup(seed: int = 0) -> torch.device:
    """Seed Python, NumPy and torch, ask torch for deterministic kernels, and report the device.

    It also runs torch's CPU operations on one thread. The small operations of the course gain little
    from a second thread, and when other programs share the cores (a Binder session, a busy laptop)
    threads that wait for each other make them many times slower: measured on the course's 2-core
    machine under load, a set of short training runs took 10 s on one thread and 54 s on two. In a
    notebook it also makes figures show inline and quiets the profiler's status lines.

    Returns ``torch.device("cuda")`` when a CUDA GPU is present and ``torch.device("cpu")`` otherwise.
    Chapters use the returned device; on a CPU they fall back to the simulated GPU budget, the
    memory estimator and the reference measurements from a real GPU.
    """
    check_seed("seed", seed)
    _show_figures_inline()
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # torch.profiler: no C++ status lines in the output
    torch.set_num_threads(1)
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
