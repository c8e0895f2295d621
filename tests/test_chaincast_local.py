"""ka-chaincast end to end with real agents as local processes on 127.0.71.X and real TCP.

Each node's agent writes into its own directory; kills, freezes, full disks and
stalled writes are real (signals, /dev/full, a FIFO nobody reads).
"""

import hashlib
import io
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
from chaincast_support import make_tree, tree_digest, write_image

from kabin import records
from kabin.chaincast import Broadcast, Options, open_image
from kabin.chaincast.launch import LocalLauncher
from kabin.chaincast.sender import Source

PORTS = (25400, 25420)
HERE = Path(__file__).parent
FAST = {"stall_timeout": 3.0, "interval": 0.2, "timeout": 90.0, "start_timeout": 30.0}


def address(i):
    return f"127.0.71.{i}"


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("source") / "root"
    make_tree(root)
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w", format=tarfile.GNU_FORMAT) as archive:
        archive.add(root, arcname=".")
    return root, data.getvalue()


def broadcast(tmp_path, image, count=4, dest_of=None, items=None, python=None, observe=None,
              store=False, ports=PORTS, **options):
    """Run one broadcast; ``observe(job, snapshot)`` is called at every tick."""
    names = [f"node-{i}" for i in range(1, count + 1)]
    addresses = {name: address(i) for i, name in enumerate(names, 1)}
    dest_of = dest_of or (lambda node: str(tmp_path / "nodes" / node))
    job = Broadcast(image, LocalLauncher(python), addresses.get, dest_of, ports,
                    Options(**{**FAST, **options}), store=store)
    if observe:
        job.observer = lambda snapshot: observe(job, snapshot)
    out = list(job.run(items if items is not None else [records.new(n) for n in names]))
    assert len(out) == len({r["node"] for r in out})
    return {r["node"]: r for r in out}, job


def assert_all_ok(results, image, written_sha256=None):
    sha = hashlib.sha256(image.path.read_bytes()).hexdigest()
    for node, record in results.items():
        assert record["status"] == "ok", (node, record.get("error"))
        assert record["bytes"] == image.size and record["sha256"] == sha
        assert record["step"] == "chaincast" and record["history"][-1]["status"] == "ok"
        assert len(record["written_sha256"]) == 64     # read back from the disk, and compared
        if written_sha256:
            assert record["written_sha256"] == written_sha256


@pytest.mark.parametrize("compression", ["gzip", "xz", "zstd", "bzip2", "none"])
def test_tar_arrives_identical_on_every_node(tmp_path, source_tree, compression):
    root, raw = source_tree
    image = open_image(write_image(tmp_path, raw, compression), "tar")
    assert image.compression == compression
    results, _ = broadcast(tmp_path, image)
    assert_all_ok(results, image)
    expected = tree_digest(root)
    for node in results:
        assert tree_digest(tmp_path / "nodes" / node) == expected


@pytest.mark.skipif(not os.path.exists("/usr/bin/python3"), reason="needs a second python3")
def test_zstd_on_nodes_whose_python_lacks_zstandard(tmp_path, source_tree):
    root, raw = source_tree
    image = open_image(write_image(tmp_path, raw, "zstd"), "tar")
    results, _ = broadcast(tmp_path, image, count=3, python="/usr/bin/python3")
    assert_all_ok(results, image)
    assert tree_digest(tmp_path / "nodes/node-3") == tree_digest(root)


def test_tree_method(tmp_path, source_tree):
    root, raw = source_tree
    image = open_image(write_image(tmp_path, raw, "gzip"), "tar")
    results, job = broadcast(tmp_path, image, count=7, method="tree", fanout=2)
    assert_all_ok(results, image)
    assert job.topology.children[None] == ["node-1", "node-2"]
    assert tree_digest(tmp_path / "nodes/node-7") == tree_digest(root)


def test_dd_writes_the_decompressed_image(tmp_path):
    disk = os.urandom(1 << 20) + bytes(3 << 20)
    image = open_image(write_image(tmp_path, disk, "xz"), "dd")
    results, _ = broadcast(tmp_path, image, count=3, dest_of=lambda n: str(tmp_path / f"{n}.disk"))
    assert_all_ok(results, image, written_sha256=hashlib.sha256(disk).hexdigest())
    for node in results:
        assert (tmp_path / f"{node}.disk").read_bytes() == disk


@pytest.fixture
def corrupting_disk(tmp_path):
    """A disk (a file in a FUSE file system) that flips a bit in every write it takes."""
    pytest.importorskip("fuse", reason="needs fusepy (and libfuse2)")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    server = subprocess.Popen([sys.executable, str(HERE / "corrupting_disk.py"), str(mountpoint),
                               str(8 << 20)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline() == "ready\n"
        yield mountpoint / "disk"
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)
        server.wait(timeout=30)


def test_a_disk_that_corrupts_what_it_writes_is_ko(tmp_path, corrupting_disk):
    """The write and the sync succeed, the stream arrived intact: reading it back tells."""
    image = open_image(write_image(tmp_path, os.urandom(1 << 20), "zstd"), "dd")
    results, _ = broadcast(tmp_path, image, count=1, dest_of=lambda n: str(corrupting_disk))
    record = results["node-1"]
    assert record["status"] == "ko", record
    assert record["error"] == "checksum mismatch: the disk gave back other data than the image's"
    assert record["sha256"] == hashlib.sha256(image.path.read_bytes()).hexdigest()
    results, _ = broadcast(tmp_path, image, count=1, dest_of=lambda n: str(corrupting_disk),
                           verify="stream")
    assert results["node-1"]["status"] == "ok" and "written_sha256" not in results["node-1"]


def test_store_keeps_the_image_as_it_is(tmp_path, source_tree):
    image = open_image(write_image(tmp_path, source_tree[1], "zstd"), "tar")
    results, _ = broadcast(tmp_path, image, count=3, store=True,
                           dest_of=lambda n: str(tmp_path / n / "copy.tar.zst"))
    assert_all_ok(results, image)
    for node in results:
        assert (tmp_path / node / "copy.tar.zst").read_bytes() == image.path.read_bytes()


def test_ko_records_pass_through_unchanged_and_first(tmp_path, source_tree):
    image = open_image(write_image(tmp_path, source_tree[1], "gzip"), "tar")
    failed = {"node": "node-2", "status": "ko", "error": "earlier step", "extra": 1}
    items = [records.new("node-1"), dict(failed), records.new("node-3")]
    names = []
    job = Broadcast(image, LocalLauncher(), {"node-1": address(1), "node-3": address(3)}.get,
                    lambda n: str(tmp_path / n), PORTS, Options(**FAST))
    for record in job.run(iter(items)):
        names.append(record["node"])
        if record["node"] == "node-2":
            assert record == failed
    assert names[0] == "node-2" and sorted(names) == ["node-1", "node-2", "node-3"]


def test_malicious_tar_does_not_escape(tmp_path):
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as archive:
        info = tarfile.TarInfo("../../escaped")
        info.size = 4
        archive.addfile(info, io.BytesIO(b"evil"))
    image = open_image(write_image(tmp_path, data.getvalue(), "gzip"), "tar")
    results, _ = broadcast(tmp_path, image, count=2,
                           dest_of=lambda n: str(tmp_path / "a" / "b" / n))
    for record in results.values():
        assert record["status"] == "ko" and "leaves the destination" in record["error"]
    assert not list(tmp_path.rglob("escaped"))


def test_a_full_disk_fails_that_node_only_and_it_keeps_relaying(tmp_path):
    disk = os.urandom(2 << 20)
    image = open_image(write_image(tmp_path, disk, "zstd"), "dd")
    dest = {"node-2": "/dev/full"}
    results, job = broadcast(tmp_path, image, count=4,
                             dest_of=lambda n: dest.get(n, str(tmp_path / f"{n}.disk")))
    assert results["node-2"]["status"] == "ko"
    assert "No space left on device" in results["node-2"]["error"]
    assert_all_ok({n: r for n, r in results.items() if n != "node-2"}, image)
    assert job.topology.children["node-2"] == ["node-3"]  # still in the chain


def _paced_image(tmp_path, megabytes=24):
    disk = os.urandom(megabytes << 20)
    return open_image(write_image(tmp_path, disk, "none"), "dd"), disk


def _signal(job, node, sig):
    os.kill(job.nodes[node].handle.proc.pid, sig)


def _killer(victim, at, sig, done):
    def observe(job, snapshot):
        if not done and snapshot["nodes"].get(victim, 0) > snapshot["size"] * at:
            done.append(victim)
            _signal(job, victim, sig)
    return observe


@pytest.mark.parametrize("sig, reason", [(signal.SIGKILL, "killed by signal 9"),
                                         (signal.SIGSTOP, "not responding|stalled")])
def test_a_node_dying_mid_stream_is_ko_and_the_others_complete(tmp_path, sig, reason):
    image, disk = _paced_image(tmp_path)
    done = []
    results, _ = broadcast(tmp_path, image, count=5, max_rate=8 << 20,
                             dest_of=lambda n: str(tmp_path / f"{n}.disk"),
                             observe=_killer("node-3", 0.3, sig, done))
    assert done == ["node-3"]
    assert results["node-3"]["status"] == "ko" and re.search(reason, results["node-3"]["error"])
    assert "% of the image" in results["node-3"]["error"]
    assert_all_ok({n: r for n, r in results.items() if n != "node-3"}, image)
    for node in ("node-4", "node-5"):
        assert (tmp_path / f"{node}.disk").read_bytes() == disk


def test_stalled_writes_are_routed_around(tmp_path):
    image, disk = _paced_image(tmp_path, 8)
    fifo = tmp_path / "nobody-reads-this"
    os.mkfifo(fifo)  # opening it for writing blocks forever: a disk that hangs
    dest = {"node-2": str(fifo)}
    results, _ = broadcast(tmp_path, image, count=4, ring=1 << 20,
                           dest_of=lambda n: dest.get(n, str(tmp_path / f"{n}.disk")))
    assert results["node-2"]["status"] == "ko"
    assert "writes made no progress" in results["node-2"]["error"]
    assert_all_ok({n: r for n, r in results.items() if n != "node-2"}, image)
    assert (tmp_path / "node-4.disk").read_bytes() == disk


def test_repair_from_the_source_when_the_ring_no_longer_holds_the_offset(tmp_path, caplog):
    """node-3 freezes, node-2 runs ahead of it by more than a ring, then node-2 dies."""
    image, disk = _paced_image(tmp_path, 32)
    steps = []

    def observe(job, snapshot):
        got = snapshot["nodes"]
        if not steps and got.get("node-3", 0) > 2 << 20:
            _signal(job, "node-3", signal.SIGSTOP)
            steps.append(got["node-3"])
        elif len(steps) == 1 and got.get("node-2", 0) > steps[0] + (3 << 20):
            _signal(job, "node-2", signal.SIGKILL)
            _signal(job, "node-3", signal.SIGCONT)
            steps.append("killed")

    caplog.set_level(logging.INFO, logger="kabin.chaincast")
    # a ring far smaller than the socket buffers between the nodes: whatever node-3 still
    # reads from its own buffers, its offset cannot be in node-1's ring any more
    results, _ = broadcast(tmp_path, image, count=4, ring=64 << 10, max_rate=16 << 20,
                           stall_timeout=10.0, dest_of=lambda n: str(tmp_path / f"{n}.disk"),
                           observe=observe)
    assert steps[1:] == ["killed"]
    assert results["node-2"]["status"] == "ko"
    assert_all_ok({n: r for n, r in results.items() if n != "node-2"}, image)
    assert "node-3: resumes from the source" in caplog.text
    assert (tmp_path / "node-4.disk").read_bytes() == disk


def test_a_wrong_source_digest_makes_every_node_ko(tmp_path, source_tree):
    image = open_image(write_image(tmp_path, source_tree[1], "gzip"), "tar", sha256="0" * 64)
    results, _ = broadcast(tmp_path, image, count=2)
    for record in results.values():
        assert record["status"] == "ko" and "checksum mismatch" in record["error"]
        assert record["sha256"] == hashlib.sha256(image.path.read_bytes()).hexdigest()


def test_a_node_without_a_free_port_is_ko(tmp_path, source_tree):
    image = open_image(write_image(tmp_path, source_tree[1], "gzip"), "tar")
    busy = socket.socket()
    busy.bind((address(1), 25430))
    busy.listen()
    try:
        results, _ = broadcast(tmp_path, image, count=1, ports=(25430, 25430))
    finally:
        busy.close()
    assert results["node-1"]["status"] == "ko"
    assert "no free port in 25430-25430" in results["node-1"]["error"]


@pytest.mark.parametrize("args, message", [
    (["--env", "x", "--image", "y"], "exactly one of --env NAME or --image IMAGE"),
    ([], "exactly one of --env NAME or --image IMAGE"),
    (["--image", "/nonexistent.tar.gz"], "cannot read the image /nonexistent.tar.gz"),
    (["--image", "/etc/hostname", "--store"], "--store needs --to FILE"),
])
def test_usage_errors(args, message):
    done = subprocess.run(["ka-chaincast", "-m", "node-1", *args], capture_output=True,
                          text=True, check=False, timeout=30)
    assert done.returncode == 2
    assert message in done.stderr and done.stdout == ""


def test_a_relay_keeps_every_byte_until_its_children_are_named(tmp_path):
    """Data may reach a relay before the command naming its child: the child still gets
    the stream from byte 0 from that relay (not from the source)."""
    image, disk = _paced_image(tmp_path, 1)
    ring, token, events = 64 << 10, "t" * 32, queue.Queue()
    names = ["node-1", "node-2"]
    handles = {name: LocalLauncher().start(name, {
        "name": name, "token": token, "size": image.size, "kind": "dd", "compression": "none",
        "store": False, "dest": str(tmp_path / f"{name}.disk"), "ports": list(PORTS),
        "bind": address(i), "ring": ring, "interval": 0.1, "deadline": 60}, events, 10)
        for i, name in enumerate(names, 1)}
    ports = dict(_events_until(events, lambda name, ev: ev["ev"] == "ready",
                               lambda seen: len(seen) == 2, key="port"))
    source = Source(image.path, image.size, token, events, threading.Event())
    try:
        source.set_children([["node-1", address(1), ports["node-1"]]])
        _events_until(events, lambda name, ev: ev["ev"] == "state" and ev["recv"] >= ring,
                      lambda seen: "node-1" in seen, key="recv")
        handles["node-1"].send({"cmd": "children",
                                "children": [["node-2", address(2), ports["node-2"]]]})
        handles["node-2"].send({"cmd": "children", "children": []})
        done = _events_until(events, lambda name, ev: ev["ev"] in ("done", "cannot-serve"),
                             lambda seen: len(seen) == 2, key="ev")
    finally:
        source.close()
        for handle in handles.values():
            handle.close()
    assert done == {"node-1": "done", "node-2": "done"}
    assert (tmp_path / "node-2.disk").read_bytes() == disk


def _events_until(events, wanted, enough, key, timeout=30.0):
    """{node: event[key]} of the ``wanted`` events, once ``enough`` of them (or fail)."""
    seen, end = {}, time.monotonic() + timeout
    while not enough(seen):
        name, event = events.get(timeout=max(0.0, end - time.monotonic()))
        if event["ev"] in ("fatal", "exit", "child-lost", "sink-failed"):
            pytest.fail(f"{name}: {event}")
        if wanted(name, event):
            seen[name] = event[key]
    return seen
