"""batchlab: the helper package of the course on training PyTorch models in batches under a memory budget.

Each module matches an idea a chapter teaches; the names learners use are re-exported here.
``import batchlab`` loads PyTorch and the package, not the widget and plotting stack: the explorers
(:mod:`batchlab.widgets`, ipywidgets) and the figures (matplotlib) load the first time they are used,
so scripts and ``torchrun`` processes start fast.
"""

import importlib

from . import datasets
from .accumulation import (
    GhostBatchNorm,
    GradientComparison,
    accumulate_weighted,
    compare_gradients,
    profile_accumulation,
    replace_batchnorm,
)
from .batching import iter_batches
from .batchsize import gradient_noise, step_times
from .budget import BatchSizeSearch, memory_budget, probe_batch_size
from .checkpointing import checkpoint_blocks, checkpointed
from .course import setup
from .distributed import train_ddp
from .estimate import CUDA_CONSTANTS, estimate_memory
from .leaks import LeakReport, leak_check
from .max_batch import max_batch_size
from .memory import MemoryReport, profile_step, track_memory
from .models import MODEL_NAMES, build_model, count_parameters
from .oom import OOMReport, explain_oom
from .plan import FitPlan, plan_fit
from .precision import PRECISIONS
from .process import ProcessMemory, process_memory
from .processes import RankError, launch
from .reference import gpu_reference
from .steps import OPTIMIZERS, make_optimizer, train_step
from .training import History, evaluate, train

__version__ = "0.1.0"

# Names that load their module on first use: {name: (module, attribute or None for the module itself)}.
_LAZY = {
    "widgets": ("batchlab.widgets", None),
    "exercises": ("batchlab.exercises", None),
    "BatchSizeExplorer": ("batchlab.widgets", "BatchSizeExplorer"),
    "plot_histories": ("batchlab.plots", "plot_histories"),
    "plot_leak_checks": ("batchlab.memory_plots", "plot_leak_checks"),
    "plot_peak_breakdown": ("batchlab.memory_plots", "plot_peak_breakdown"),
    "plot_step_timeline": ("batchlab.memory_plots", "plot_step_timeline"),
    "LoaderStats": ("batchlab.loaders", "LoaderStats"),
    "loader_sweep": ("batchlab.loaders", "loader_sweep"),
    "loader_throughput": ("batchlab.loaders", "loader_throughput"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'batchlab' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BatchSizeExplorer",
    "BatchSizeSearch",
    "CUDA_CONSTANTS",
    "FitPlan",
    "GhostBatchNorm",
    "GradientComparison",
    "History",
    "LeakReport",
    "LoaderStats",
    "MODEL_NAMES",
    "MemoryReport",
    "OOMReport",
    "OPTIMIZERS",
    "ProcessMemory",
    "PRECISIONS",
    "RankError",
    "accumulate_weighted",
    "build_model",
    "checkpoint_blocks",
    "checkpointed",
    "compare_gradients",
    "count_parameters",
    "datasets",
    "estimate_memory",
    "evaluate",
    "explain_oom",
    "exercises",
    "probe_batch_size",
    "gpu_reference",
    "gradient_noise",
    "iter_batches",
    "launch",
    "leak_check",
    "loader_sweep",
    "loader_throughput",
    "make_optimizer",
    "max_batch_size",
    "memory_budget",
    "plan_fit",
    "plot_histories",
    "plot_leak_checks",
    "plot_peak_breakdown",
    "plot_step_timeline",
    "process_memory",
    "profile_accumulation",
    "profile_step",
    "replace_batchnorm",
    "setup",
    "step_times",
    "track_memory",
    "train",
    "train_ddp",
    "train_step",
    "widgets",
]
