"""The background-job machinery of the explorers: one job at a time, the newest one draws.

:class:`Jobs` runs a widget's work one job at a time, in the widget's own background thread or inline.
A newer job cancels the older one, and only the newest job may draw, one drawing at a time
(:meth:`Job.publish`).
"""

from __future__ import annotations

import atexit
import functools
import sys
import threading
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

    def run(self) -> None:
        if self.cancelled:
            return
        try:
            self.work(self)
        except Exception as error:  # shown in the widget, never raised into the notebook
            if self.jobs.on_error is None:
                raise
            self.publish(functools.partial(self.jobs.on_error, error))


class Worker:
    """One thread that runs the jobs handed to it, one at a time, until :meth:`stop`.

    Only the newest job handed over waits to run (an older one not yet started was cancelled anyway).
    One long-lived thread rather than a thread per job: with a new thread for every change, the kernel's
    memory grew by about 30 KiB a change; with one it does not (benchmarks/widget_soak.py).
    """

    def __init__(self):
        self.changed = threading.Condition()
        self.pending: Job | None = None
        self.busy = self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="batchlab-explorer", daemon=True)
        self.thread.start()

    def hand(self, job: Job) -> None:
        with self.changed:
            self.pending = job
            self.changed.notify_all()

    def _loop(self) -> None:
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.pending is not None or self.stopping)
                if self.pending is None:
                    return
                job, self.pending, self.busy = self.pending, None, True
            try:
                job.run()
            except Exception:  # a job without on_error: reported, and the thread goes on with the next one
                sys.excepthook(*sys.exc_info())
            finally:
                job = None  # the thread keeps no finished job (and nothing it refers to) alive
                with self.changed:
                    self.busy = False
                    self.changed.notify_all()

    def idle(self, timeout: float | None = None) -> bool:
        """Wait until no job runs or waits to (at most ``timeout`` seconds); True if so."""
        if threading.current_thread() is self.thread:
            return True  # a job waiting for itself would wait forever
        with self.changed:
            return self.changed.wait_for(lambda: self.pending is None and not self.busy, timeout)

    def stop(self, timeout: float | None = None) -> None:
        """Let the job in flight finish, then end the thread (at most ``timeout`` seconds of waiting)."""
        with self.changed:
            self.stopping = True
            self.changed.notify_all()
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)


class Jobs:
    """A widget's work queue of length one: the newest job runs, older ones are cancelled.

    ``background=True`` runs the jobs in one background thread of the widget's own (started with the
    first job, ended by :meth:`close` or when the widget is garbage collected), so the controls stay
    responsive and two jobs never compute at once. ``background=False`` runs each job at once in the
    caller's thread (for work that must not leave the main thread, such as starting DataLoader worker
    processes). ``on_error(error)`` shows what a job raised; without it, an inline job's error propagates
    and a background job's is printed (``sys.excepthook``), the next job running as usual.
    """

    def __init__(self, *, background: bool = True, on_error=None):
        self.background, self.on_error = background, on_error
        self.drawing = threading.RLock()  # held while a job draws: one drawing at a time
        self._lock = threading.Lock()
        self.latest: Job | None = None
        self._worker: Worker | None = None
        _all_jobs.add(self)

    def submit(self, work) -> Job:
        """Cancel the running job and start ``work(job)``."""
        job = Job(self, work)
        with self._lock:
            if self.latest is not None:
                self.latest.cancel()
            self.latest = job
            if self.background:
                if self._worker is None:
                    self._worker = Worker()
                    weakref.finalize(self, self._worker.stop, 0)  # a widget dropped unclosed ends its thread
                self._worker.hand(job)
        if not self.background:
            job.run()
        return job

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until no job runs (at most ``timeout`` seconds); True if none does."""
        with self._lock:
            worker = self._worker
        return worker is None or worker.idle(timeout)

    @property
    def running(self) -> bool:
        return not self.wait(0)

    def cancel(self) -> None:
        with self._lock:
            if self.latest is not None:
                self.latest.cancel()

    def close(self, timeout: float | None = None) -> bool:
        """Cancel the job in flight, wait for it to stop, end the background thread; True if it ended in time."""
        self.cancel()
        with self._lock:
            worker, self._worker = self._worker, None
        if worker is None:
            return True
        worker.stop(timeout)
        return not worker.thread.is_alive()


_all_jobs: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_all_jobs() -> None:
    """When the kernel shuts down, stop the runs in flight rather than kill them in the middle of an op."""
    for jobs in list(_all_jobs):
        jobs.cancel()
    for jobs in list(_all_jobs):
        jobs.close(timeout=5)
