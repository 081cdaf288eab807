"""The background-job machinery of the explorers: one job at a time, the newest one draws.

:class:`Jobs` runs a widget's work one job at a time, in a background thread or inline. A newer job
cancels the older one, and only the newest job may draw, one drawing at a time (:meth:`Job.publish`).
"""

from __future__ import annotations

import atexit
import functools
import threading
import time
import weakref


class Job:
    """One piece of a widget's work; ``publish(draw)`` runs ``draw`` only while this job is the newest."""

    def __init__(self, jobs: Jobs, work):
        self.jobs, self.work = jobs, work
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        """True once a newer job was submitted (or the widget closed): the work should stop."""
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def publish(self, draw) -> bool:
        """Call ``draw()`` if this job is still the newest, holding the drawing lock; say whether it ran."""
        with self.jobs.drawing:
            if self.cancelled or self.jobs.latest is not self:
                return False
            draw()
            return True

    def run(self, previous: threading.Thread | None = None) -> None:
        if previous is not None:
            previous.join()  # one computation at a time: let the cancelled job stop first
        if self.cancelled:
            return
        try:
            self.work(self)
        except Exception as error:  # shown in the widget, never raised into the notebook
            if self.jobs.on_error is None:
                raise
            self.publish(functools.partial(self.jobs.on_error, error))


class Jobs:
    """A widget's work queue of length one: the newest job runs, older ones are cancelled.

    ``background=True`` runs each job in its own short-lived thread, so the controls stay responsive;
    a job that starts waits for the cancelled one before it to stop, so two jobs never compute at
    once. ``background=False`` runs each job at once in the caller's thread (for work that must not
    leave the main thread, such as starting DataLoader worker processes). ``on_error(error)`` shows
    what a background job raised; without it, the error propagates.
    """

    def __init__(self, *, background: bool = True, on_error=None):
        self.background, self.on_error = background, on_error
        self.drawing = threading.RLock()  # held while a job draws: one drawing at a time
        self._lock = threading.Lock()
        self.latest: Job | None = None
        self._thread: threading.Thread | None = None
        _all_jobs.add(self)

    def submit(self, work) -> Job:
        """Cancel the running job and start ``work(job)``."""
        job = Job(self, work)
        with self._lock:
            if self.latest is not None:
                self.latest.cancel()
            self.latest = job
            if self.background:
                previous = self._thread
                self._thread = threading.Thread(target=job.run, args=(previous,), name="batchlab-explorer", daemon=True)
                self._thread.start()
        if not self.background:
            job.run()
        return job

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until no job runs (at most ``timeout`` seconds); True if none does."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                thread = self._thread
            if thread is None or thread is threading.current_thread():
                return True
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                return False
            with self._lock:
                if self._thread is thread:
                    self._thread = None
                    return True

    @property
    def running(self) -> bool:
        with self._lock:
            return self._thread is not None and self._thread.is_alive()

    def cancel(self) -> None:
        with self._lock:
            if self.latest is not None:
                self.latest.cancel()


_all_jobs: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_all_jobs() -> None:
    """When the kernel shuts down, stop the runs in flight rather than kill them in the middle of an op."""
    for jobs in list(_all_jobs):
        jobs.cancel()
    for jobs in list(_all_jobs):
        jobs.wait(timeout=5)
