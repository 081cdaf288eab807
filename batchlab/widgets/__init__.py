"""Interactive explorers for the chapter notebooks (ipywidgets), one module per explorer.

Model / view split: the computation is an ordinary function elsewhere in batchlab
(:func:`batchlab.train`, :mod:`batchlab.explorer`, :mod:`batchlab.explorer_runs`,
:func:`batchlab.loaders.loader_throughput`); a widget only wires controls to it and draws. Every explorer is
built from the same three parts:

* :class:`Explorer`, the base: controls whose changes call the widget's ``_changed``, ``set(**values)``
  (move the controls as a learner would and return when the panels have updated), ``state`` (what
  is shown now) and a short, stable ``text/plain`` for nbval;
* :class:`Panel`: a matplotlib figure rendered to PNG into a ``widgets.Image``, with a line of text
  in a ``widgets.HTML`` under it, never an ``Output`` widget, so the notebooks stay stable under
  nbval and update live in JupyterLab;
* :class:`Jobs`: runs a widget's work one job at a time, in a background thread or inline. A newer
  job cancels the older one, and only the newest job may draw, one drawing at a time.
"""

from .accumulation import AccumulationExplorer
from .base import BATCH_SIZES, Explorer, Panel
from .batch_size import BatchSizeExplorer
from .convergence import ConvergenceExplorer
from .jobs import Job, Jobs
from .loader import LoaderExplorer

__all__ = [
    "AccumulationExplorer",
    "BATCH_SIZES",
    "BatchSizeExplorer",
    "ConvergenceExplorer",
    "Explorer",
    "Job",
    "Jobs",
    "LoaderExplorer",
    "Panel",
]
