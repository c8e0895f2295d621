"""Bounded concurrency: one small executor for every per-node job.

Work runs in at most ``fanout`` threads; results come back in completion order,
so one slow node never delays the others' records. Waits are bounded by
deadlines and interruptible through a shared stop event, so no thread ever
needs killing.
"""

import logging
import queue
import threading
import time

from . import records
from .errors import KabinError

log = logging.getLogger(__name__)

_DONE = object()


class Deadline:
    """A point in time; ``remaining()`` never goes below zero."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self):
        return max(0.0, self.end - time.monotonic())

    @property
    def expired(self):
        return time.monotonic() >= self.end


class Executor:
    """Runs callables in at most ``fanout`` threads at once.

    ``stop`` is set when the caller gives up (Ctrl-C, broken pipe): work that
    waits should wait on it (``stop.wait(t)``) rather than ``time.sleep``.
    """

    def __init__(self, fanout=64, stop=None):
        if fanout < 1:
            raise ValueError("fanout must be at least 1")
        self.fanout = fanout
        self.stop = stop or threading.Event()
        self._slots = threading.BoundedSemaphore(fanout)

    def submit(self, fn, *args, on_done):
        """Run ``fn(*args)`` in a thread; ``on_done(result, exc)`` is called from that thread."""
        self._slots.acquire()
        if self.stop.is_set():
            self._slots.release()
            return

        def run():
            try:
                value, error = fn(*args), None
            except BaseException as exc:  # handed to on_done, which decides
                value, error = None, exc
            try:
                on_done(value, error)
            finally:
                self._slots.release()

        threading.Thread(target=run, daemon=True, name=f"kabin-{fn.__name__}").start()

    def map_records(self, items, work, step, passthrough=None):
        """Apply ``work(record) -> record`` to the OK records of ``items``.

        KO records (or those ``passthrough`` selects) come out unchanged at once;
        results come out as soon as they are known. An error raised by the input
        iterator is re-raised after the work already started has been emitted.
        """
        passthrough = passthrough or (lambda r: not records.is_ok(r))
        out = queue.Queue()
        feed_error = []

        def on_done(record):
            def done(value, exc):
                out.put(value if exc is None else _failed(record, step, exc))
            return done

        def feed():
            pending = threading.Semaphore(0)
            submitted = 0
            try:
                for record in items:
                    if self.stop.is_set():
                        break
                    if passthrough(record):
                        out.put(record)
                        continue
                    submitted += 1
                    done = on_done(record)
                    self.submit(work, record, on_done=lambda v, e, d=done: (d(v, e), pending.release()))
            except BaseException as exc:
                feed_error.append(exc)
            for _ in range(submitted):
                pending.acquire()
            out.put(_DONE)

        threading.Thread(target=feed, daemon=True, name="kabin-feed").start()
        finished = False
        try:
            while (item := out.get()) is not _DONE:
                yield item
            finished = True
        finally:
            if not finished:  # the consumer gave up: stop feeding new work
                self.stop.set()
        if feed_error:
            raise feed_error[0]


    def imap(self, fn, items, timeout):
        """``(item, result, error)`` for each item as ``fn(item)`` completes, ``fanout`` at
        once; the wait for them ends after ``timeout`` seconds (the rest are not yielded)."""
        done = queue.SimpleQueue()
        items = list(items)

        def feed():
            for item in items:
                self.submit(fn, item, on_done=lambda value, exc, i=item: done.put((i, value, exc)))
        threading.Thread(target=feed, daemon=True, name="kabin-feed").start()
        deadline = Deadline(timeout)
        for _ in items:
            try:
                yield done.get(timeout=deadline.remaining())
            except queue.Empty:
                return

    def map(self, fn, items, timeout):
        """``fn(item)`` for every item, ``fanout`` at once; the results in input order.

        The first error raised by ``fn`` is raised once every item is done; a
        TimeoutError if they are not all done within ``timeout`` seconds.
        """
        items = list(items)
        results, errors = [None] * len(items), []
        finished = threading.Condition()
        done = [0]

        def call(index):
            return index, fn(items[index])

        def on_done(value, exc):
            with finished:
                if exc is not None:
                    errors.append(exc)
                else:
                    results[value[0]] = value[1]
                done[0] += 1
                finished.notify_all()

        for index in range(len(items)):
            self.submit(call, index, on_done=on_done)
        with finished:
            if not finished.wait_for(lambda: done[0] == len(items), timeout=timeout):
                raise TimeoutError(f"{len(items) - done[0]} of {len(items)} steps not done "
                                   f"in {timeout} s")
        if errors:
            raise errors[0]
        return results


def _failed(record, step, exc):
    """Turn an exception raised by per-node work into that node's KO record."""
    if isinstance(exc, KabinError):
        return records.ko(record, step, str(exc))
    log.error("%s: unexpected error in %s: %s: %s", record["node"], step, type(exc).__name__,
              exc, exc_info=exc)
    return records.ko(record, step, f"internal error: {type(exc).__name__}: {exc}")


class Window:
    """Reboot windows: at most ``size`` actions at once, ``sleep_time`` between groups.

    Kadeploy issues reboot commands by groups of ``size`` nodes and waits
    ``sleep_time`` seconds before starting the next group.
    """

    def __init__(self, size, sleep_time, stop=None):
        self.size, self.sleep_time = size, sleep_time
        self.stop = stop or threading.Event()
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._group_start = None
        self._in_group = 0

    def __enter__(self):
        self._slots.acquire()
        with self._lock:
            if self._in_group >= self.size:
                wait = self._group_start + self.sleep_time - time.monotonic()
                if wait > 0:
                    self.stop.wait(wait)
                self._group_start, self._in_group = None, 0
            if self._group_start is None:
                self._group_start = time.monotonic()
            self._in_group += 1
        return self

    def __exit__(self, *exc):
        self._slots.release()
        return False
