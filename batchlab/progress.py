"""Progress bars where a learner waits: one place that makes them, so that every bar behaves alike.

Every function that runs for more than a few seconds (``train``, ``probe_batch_size``, ``max_batch_size``,
``loader_sweep``, ``launch``, and ``leak_check`` when asked) takes ``progress: bool`` and draws a ``tqdm.auto`` bar:
a widget in Jupyter, text on stderr in a terminal. ``progress=False`` draws nothing. With
``progress=True`` tqdm's own settings still apply: ``TQDM_DISABLE=1`` in the environment (tqdm >= 4.66)
quiets every bar, which is how the test suite stays quiet.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from .validation import check_bool


def progress_bar(progress: bool, **options):
    """A ``tqdm.auto`` bar with ``options`` (``total``, ``desc``, ``unit``, ...), or no bar if not ``progress``.

    The bar is not left behind when it closes (``leave=False``): the cell's own output is the result.
    Without ``progress`` the result only looks like a bar: even a disabled tqdm bar starts tqdm's
    monitor thread, which then runs for as long as the process. ``TQDM_DISABLE`` still turns real bars off.
    """
    check_bool("progress", progress)
    options.setdefault("leave", False)
    return tqdm(**options) if progress else NoBar()


class NoBar:
    """What :func:`progress_bar` returns without ``progress``: the methods of a bar, doing nothing."""

    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass
