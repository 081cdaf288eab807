"""Progress bars where a learner waits: one place that makes them, so that every bar behaves alike.

Every function that runs for more than a few seconds (``train``, ``find_batch_size``, ``max_batch_size``,
``loader_sweep``, ``leak_check``, ``launch``) takes ``progress: bool`` and draws a ``tqdm.auto`` bar:
a widget in Jupyter, text on stderr in a terminal. ``progress=False`` draws nothing. With
``progress=True`` tqdm's own settings still apply: ``TQDM_DISABLE=1`` in the environment (tqdm >= 4.66)
quiets every bar, which is how the test suite stays quiet.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from .validation import check_bool


def progress_bar(progress: bool, **options) -> tqdm:
    """A ``tqdm.auto`` bar with ``options`` (``total``, ``desc``, ``unit``, ...), disabled if not ``progress``.

    The bar is not left behind when it closes (``leave=False``): the cell's own output is the result.
    ``disable`` is only passed when ``progress`` is False, so that ``TQDM_DISABLE`` can still turn a bar off.
    """
    check_bool("progress", progress)
    options.setdefault("leave", False)
    if not progress:
        options["disable"] = True
    return tqdm(**options)
