"""Run one setup step on every node at once, a bounded number at a time."""

import threading

from ..parallel import Executor


def run_all(fn, items, fanout=16, timeout=300):
    """``fn(item)`` for every item, ``fanout`` at once; results in input order.

    The first error raised by ``fn`` is raised once every item is done.
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

    executor = Executor(fanout)
    for index in range(len(items)):
        executor.submit(call, index, on_done=on_done)
    with finished:
        if not finished.wait_for(lambda: done[0] == len(items), timeout=timeout):
            raise TimeoutError(f"{len(items) - done[0]} of {len(items)} steps not done "
                               f"in {timeout} s")
    if errors:
        raise errors[0]
    return results
