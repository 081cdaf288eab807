"""batchlab: the helper package of the course on training PyTorch models in batches under a memory budget.

Each module matches an idea a chapter teaches; the names learners use are re-exported here.
"""

from . import datasets, exercises, widgets
from .accumulation import (
    GhostBatchNorm,
    GradientComparison,
    accumulate_weighted,
    compare_gradients,
    profile_accumulation,
    replace_batchnorm,
)
from .batching import LoaderStats, iter_batches, loader_sweep, loader_throughput
from .batchsize import gradient_noise, step_times
from .budget import BatchSizeSearch, find_batch_size, memory_budget
from .course import setup
from .distributed import RankError, launch, train_ddp
from .estimate import CUDA_CONSTANTS, estimate_memory, max_batch_size
from .leaks import LeakReport, leak_check
from .memory import MemoryReport, gpu_reference, process_memory, profile_step, track_memory
from .memory_plots import plot_leak_checks, plot_peak_breakdown, plot_step_timeline
from .models import MODEL_NAMES, build_model, count_parameters
from .plots import plot_histories
from .training import History, evaluate, train
from .widgets import BatchSizeExplorer

__version__ = "0.1.0"

__all__ = [
    "GhostBatchNorm",
    "GradientComparison",
    "accumulate_weighted",
    "accumulation",
    "compare_gradients",
    "profile_accumulation",
    "replace_batchnorm",
    "BatchSizeExplorer",
    "BatchSizeSearch",
    "CUDA_CONSTANTS",
    "estimate_memory",
    "find_batch_size",
    "max_batch_size",
    "memory_budget",
    "RankError",
    "launch",
    "train_ddp",
    "LeakReport",
    "MemoryReport",
    "gpu_reference",
    "leak_check",
    "plot_leak_checks",
    "plot_peak_breakdown",
    "plot_step_timeline",
    "process_memory",
    "profile_step",
    "track_memory",
    "LoaderStats",
    "batching",
    "iter_batches",
    "loader_sweep",
    "loader_throughput",
    "MODEL_NAMES",
    "History",
    "build_model",
    "gradient_noise",
    "step_times",
    "exercises",
    "widgets",
    "count_parameters",
    "datasets",
    "evaluate",
    "plot_histories",
    "setup",
    "train",
]
