"""The one executor: bounded threads, results in order or as they come, bounded waits."""

import threading

import pytest

from kabin import records
from kabin.parallel import Executor


def test_map_keeps_the_input_order_and_the_fanout():
    running, peak, lock = [0], [0], threading.Lock()
    release = threading.Event()

    def work(n):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        release.wait(0.05)
        with lock:
            running[0] -= 1
        return n * n

    assert Executor(3).map(work, range(10), timeout=30) == [n * n for n in range(10)]
    assert peak[0] <= 3


def test_map_raises_the_first_error_once_all_are_done():
    done = []

    def work(n):
        if n == 2:
            raise ValueError("two")
        done.append(n)
        return n

    with pytest.raises(ValueError, match="two"):
        Executor(2).map(work, range(5), timeout=30)
    assert sorted(done) == [0, 1, 3, 4]


def test_map_is_bounded_by_its_timeout():
    never = threading.Event()
    with pytest.raises(TimeoutError, match="1 of 2 steps not done"):
        Executor(2).map(lambda n: never.wait(5) if n else n, [0, 1], timeout=0.2)


def test_map_records_passes_ko_records_through_and_fails_a_node_on_error():
    def work(record):
        if record["node"] == "b":
            raise RuntimeError("boom")
        return records.ok(record, "step", 0.0)

    items = [records.new("a"), records.ko(records.new("x"), "earlier", "down"), records.new("b")]
    out = {r["node"]: r for r in Executor(4).map_records(items, work, "step")}
    assert out["a"]["status"] == "ok" and out["x"]["error"] == "down"
    assert out["b"]["status"] == "ko" and "internal error: RuntimeError: boom" in out["b"]["error"]


def test_imap_yields_as_they_complete_and_stops_waiting_at_its_timeout():
    slow = threading.Event()

    def work(n):
        if n == "slow":
            slow.wait(5)
        if n == "bad":
            raise ValueError("bad")
        return n.upper()

    out = list(Executor(4).imap(work, ["a", "slow", "bad", "b"], timeout=1.0))
    slow.set()
    assert sorted((i, v) for i, v, e in out if e is None) == [("a", "A"), ("b", "B")]
    assert [(i, str(e)) for i, _, e in out if e is not None] == [("bad", "bad")]
