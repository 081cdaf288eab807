"""batchlab: the helper package of the course on training PyTorch models in batches under a memory budget.

Each module matches an idea a chapter teaches; the names learners use are re-exported here.
"""

from . import datasets, exercises, widgets
from .batchsize import gradient_noise, step_times
from .course import setup
from .models import MODEL_NAMES, build_model, count_parameters
from .plots import plot_histories
from .training import History, evaluate, train

__version__ = "0.1.0"

__all__ = [
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
