"""The chaincast relay agent: one per node, sent over SSH and run with the node's python3.

It needs only Python's standard library (3.7+), plus the ``zstandard`` module for
zstd images when present (else the ``zstd`` command). The sender starts it with
a tiny bootstrap that reads it from stdin (see ``launch.agent_start``); after it,
stdin carries commands and stdout carries events, one JSON object per line:

- the job (token, size, kind, compression, dest, ports, ...) comes with the
  agent itself (see ``launch.agent_start``), or as the first line in;
- out: ``ready`` (port, pid), then ``state`` every ``interval`` seconds (the
  offsets and idle times the sender needs to find a stalled node), ``child-lost``,
  ``cannot-serve``, ``sink-failed``, ``done`` (bytes, sha256, written, time), ``fatal``;
- in: ``children`` (the nodes to forward to: every node gets it, leaves an empty
  list, and until then its ring keeps all it receives); EOF on stdin ends the agent.

Data (plain TCP, ports from the configured range): a parent connects to its child
and sends ``MAGIC token name``; the child answers with its offset (8 bytes), the
number of bytes it already has, and the parent streams from there. So a node
whose predecessor died resumes from its own offset with any new parent.

Memory: received data lives in one ring of ``ring`` bytes whatever the image
size. A byte is overwritten only when the sink and every child have consumed
it: a slow disk or a slow child slows the reader, hence the whole chain
(backpressure). The ring also keeps the last ``ring`` bytes for repairs.
Each data link has 4 MB of kernel buffer at both ends (``SOCKET_BUFFER``): a
relay the scheduler holds back for a moment does not leave its child's link
idle, and nothing waits in them while the chain keeps pace.

What a node does with the data (decompress, extract, write) is in ``sinks``, how
it reads back what it wrote in ``written``, the data links' handshake in
``links``: all are sent ahead of this file in the same script (see
``launch.agent_source``).
"""

import functools
import mmap
import os
import socket
import sys
import threading
import time

try:  # in the package; on a node, sinks.py and written.py come first in the same script
    from .sinks import (
        Aborted,
        decompressed,
        drain,
        extract_tar,
        store_file,
        write_blocks,
    )
    from .written import BlockReadBack, TreeReadBack, read_back
    from .receivers import receive_bittorrent, receive_multicast
    from .spawn import launch_children
    from .links import (
        HANDSHAKE_TIMEOUT,
        IO_TICK,
        MAGIC,
        OFFSET,
        SOCKET_BUFFER,
        connect_child,
        connect_control,
        read_exact,
        read_line,
        reason,
        set_low_mark,
        shutdown,
    )
except ImportError:
    pass

CHUNK = 256 * 1024          # most bytes moved by one recv/send
SINK_BATCH = 1 << 20        # the sink wakes up for this much data (or the end), not every segment
# The ring keeps every byte until the sender names our children (if any): data may
# arrive before that command does, and the children will start from byte 0.
HOLD = "(children not known yet)"


# ---------------------------------------------------------------- the ring


class Ring:
    """The last ``size`` bytes of the stream and the cursors of its consumers.

    Offsets are absolute positions in the stream. ``head`` is the number of
    bytes received; a consumer's cursor is the number of bytes it has used.
    Each waiter has its own condition, woken only when what it waits for is
    there: a consumer reading in big batches (the sink) is not woken at every
    segment the relay receives.
    """

    def __init__(self, size, total):
        self.size, self.total = size, total
        # Anonymous memory: its pages are taken as data lands. A bytearray would be
        # zeroed whole at start-up (16 ms of CPU for 16 MB: a tenth of a node's start).
        self.view = memoryview(mmap.mmap(-1, size))
        self.head = 0
        self.reserved = 0               # bytes being received into the ring right now
        self.cursors, self.progress = {}, {}
        self.lock = threading.Lock()
        self.room = threading.Condition(self.lock)   # the receiver waits for room
        self.waiters = {}               # consumer -> (its condition, the head it waits for)
        self.aborted = False

    def start(self):
        """The oldest offset still held (the ring may be overwriting it right now)."""
        return max(0, self.head + self.reserved - self.size)

    def _room(self):
        oldest = min(self.cursors.values(), default=self.head)
        return self.size - (self.head - oldest)

    def _wait(self, cond, ready, timeout):
        end = time.monotonic() + timeout
        while not ready():
            if self.aborted:
                raise Aborted()
            left = end - time.monotonic()
            if left <= 0:
                return False
            cond.wait(left)
        return True

    def _wake_consumers(self, everyone=False):
        for cond, target in self.waiters.values():
            if everyone or self.head >= target:
                cond.notify()

    def slot(self, timeout):
        """A writable view after ``head`` (None if the ring stayed full for ``timeout``)."""
        with self.lock:
            if not self._wait(self.room, lambda: self._room() > 0, timeout):
                return None
            pos = self.head % self.size
            length = min(self._room(), self.size - pos, CHUNK, self.total - self.head)
            self.reserved = length
            return self.view[pos:pos + length]

    def commit(self, count):
        with self.lock:
            self.head += count
            self.reserved = 0
            self._wake_consumers()

    def add(self, name, offset=None):
        """A new consumer; without an offset it holds everything kept until set."""
        with self.lock:
            self.cursors[name] = self.start() if offset is None else offset
            self.progress[name] = time.monotonic()

    def remove(self, name):
        with self.lock:
            self.cursors.pop(name, None)
            self.progress.pop(name, None)
            self.room.notify()
            if name in self.waiters:
                self.waiters[name][0].notify()

    def place(self, name, offset):
        """Move a new consumer to ``offset``; False if the ring no longer holds it."""
        with self.lock:
            if name not in self.cursors or offset < self.start():
                self.cursors.pop(name, None)
                self.room.notify()
                return False
            self.cursors[name] = offset
            self.progress[name] = time.monotonic()
            return True

    def read(self, name, limit, timeout, batch=1):
        """A view of the bytes after ``name``'s cursor, once ``batch`` bytes are there (or
        the end); b"" at the end or once removed, None on timeout."""
        with self.lock:
            cursor = self.cursors.get(name, self.total)
            if cursor >= self.total:
                return b""
            target = min(cursor + batch, self.total)
            if self.head < target:
                self.waiters[name] = (threading.Condition(self.lock), target)
                try:
                    if not self._wait(self.waiters[name][0], lambda: self.head >= target
                                      or name not in self.cursors, timeout):
                        return None
                finally:
                    del self.waiters[name]
            cursor = self.cursors.get(name, self.total)
            if cursor >= self.total:
                return b""
            pos = cursor % self.size
            length = min(self.head - cursor, self.size - pos, limit)
            return self.view[pos:pos + length]

    def advance(self, name, count):
        with self.lock:
            if name not in self.cursors:
                return
            self.cursors[name] += count
            self.progress[name] = time.monotonic()
            self.room.notify()

    def idle(self, name, now):
        """Seconds ``name`` has had data to take without taking any (0 when caught up
        or waiting for a batch)."""
        cursor = self.cursors.get(name)
        if cursor is None or cursor >= self.head or name in self.waiters:
            return 0.0
        return now - self.progress[name]

    def abort(self):
        with self.lock:
            self.aborted = True
            self.room.notify_all()
            self._wake_consumers(everyone=True)


class RingReader:
    """The sink's file-like view of the stream, for the decompressors and tarfile."""

    def __init__(self, ring, name="sink", batch=SINK_BATCH):
        self.ring, self.name = ring, name
        self.batch = max(1, min(batch, ring.size // 4))  # a batch must fit beside the others

    def readable(self):
        return True

    def read(self, size=-1):
        size = CHUNK if size is None or size < 0 else size
        while True:
            view = self.ring.read(self.name, size, IO_TICK, self.batch)
            if view is not None:
                data = bytes(view)
                self.ring.advance(self.name, len(data))
                return data

    def readinto(self, buffer):
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


# ---------------------------------------------------------------- the agent


class Agent:
    """Receives the stream from a parent, writes it, forwards it to children."""

    def __init__(self, job, out):
        self.job, self.out = job, out
        self.total = job["size"]
        self.ring = Ring(min(job["ring"], max(self.total, 1)), self.total)
        self.ring.add("sink", 0)
        self.ring.add(HOLD, 0)              # until the children are known (see set_children)
        self.digest = None                  # made by the receiving thread (imports cost start-up time)
        self.started = time.monotonic()
        self.last_recv = self.started
        self.upstream, self.generation = None, 0
        self.up_cond = threading.Condition()
        self.children = {}                  # name -> Forwarder
        self.sink_error, self.sink_done, self.received = None, False, False
        self.written = None                 # the written data's digest, read back (job "verify")
        self.timeline = {}                  # when the stream was received, written (seconds)
        self.lock = threading.Lock()
        self.done_sent = False
        self.closing = threading.Event()
        self.fetched = None                 # bytes a bittorrent download has on disk so far
        self.cleanups = []                  # what the receivers leave running, ended at the end
        self.listener = self._listen()

    # -------------------------------------------------------- events

    def emit(self, event, **fields):
        fields["ev"] = event
        self._write(_json().dumps(fields) + "\n")

    def emit_ready(self):
        """The first event, written by hand: json is imported once the sender knows we are up."""
        port = self.listener.getsockname()[1]
        via = (os.environ.get("SSH_CONNECTION") or "-").split()[0]   # who started us
        self._write(f'{{"ev": "ready", "port": {port}, "pid": {os.getpid()}, "via": "{via}"}}\n')

    def _write(self, line):
        with self.lock:
            try:
                self.out.write(line)
                self.out.flush()
            except (OSError, ValueError):
                pass  # the sender is gone: stdin EOF ends us

    # -------------------------------------------------------- listening and upstreams

    def _listen(self):
        first, last = self.job["ports"]
        for address in (self.job.get("bind") or "", ""):
            for port in range(first, last + 1):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
                try:
                    sock.bind((address, port))
                except OSError as exc:
                    sock.close()
                    if exc.errno == 99:  # EADDRNOTAVAIL: not our address, listen on all
                        break
                    continue
                sock.listen(16)
                return sock
        raise OSError(f"no free port in {first}-{last}")

    def accept_loop(self):
        while True:
            conn, _ = self.listener.accept()
            threading.Thread(target=self._handshake, args=(conn,), daemon=True).start()

    def _handshake(self, conn):
        """Check a new parent, then make it the upstream and tell it our offset."""
        try:
            conn.settimeout(HANDSHAKE_TIMEOUT)
            line = read_line(conn, 200)
            magic, token = (line.split(b" ") + [b"", b""])[:2]
            if magic != MAGIC or token.decode() != self.job["token"]:
                conn.close()
                return
        except (OSError, UnicodeDecodeError):
            conn.close()
            return
        with self.up_cond:
            old, self.upstream = self.upstream, conn
            self.generation += 1
            if old is not None:
                shutdown(old)
            try:
                conn.sendall(OFFSET.pack(self.ring.head))
            except OSError:
                self.upstream = None
                conn.close()
            self.up_cond.notify_all()

    def receive_loop(self):
        """Read the stream into the ring until the end; hash it on the way."""
        import hashlib

        self.digest = hashlib.sha256()
        if self.job.get("multicast"):
            receive_multicast(self, self.job["multicast"])
        elif self.job.get("bittorrent"):
            receive_bittorrent(self, self.job["bittorrent"])
            self.fetched = None
        batched = (None, 0)
        while self.ring.head < self.total:
            with self.up_cond:
                if self.upstream is None:
                    self.up_cond.wait(IO_TICK)
                    continue
                sock, generation = self.upstream, self.generation
            view = self.ring.slot(IO_TICK)
            if view is None:
                continue
            try:
                batched = set_low_mark(sock, self.total - self.ring.head, batched)
                count = sock.recv_into(view)
            except socket.timeout:  # noqa: UP041 (not TimeoutError before Python 3.10)
                self.ring.commit(0)
                continue
            except OSError:
                count = 0
            with self.up_cond:
                current = generation == self.generation
                if current and count:
                    self.ring.commit(count)
                else:
                    self.ring.commit(0)
                if current and not count:
                    self.upstream = None
                    sock.close()
                    self.emit("upstream-lost", offset=self.ring.head)
            if current and count:
                self.digest.update(view[:count])
                self.last_recv = time.monotonic()
        self.received = True
        self.timeline["received"] = self._elapsed()
        self._maybe_done()

    # -------------------------------------------------------- sink

    def sink_loop(self):
        job, raw = self.job, RingReader(self.ring)
        try:
            verify = job.get("verify") == "written"
            if job["store"]:
                store_file(raw, job["dest"])
                check = functools.partial(read_back, job["dest"])
            else:
                stream = decompressed(raw, job["compression"])
                if job["kind"] == "tar":
                    os.makedirs(job["dest"], exist_ok=True)
                    tree = TreeReadBack(os.path.realpath(job["dest"])) if verify else None
                    extract_tar(stream, job["dest"], tree)
                    check = tree and tree.digest
                else:
                    blocks = BlockReadBack(job["dest"]) if verify else None
                    size = write_blocks(stream, job["dest"], blocks)
                    check = blocks and functools.partial(blocks.digest, size)
                drain(stream)  # to the end: the decompressor checks the stream's trailer
            drain(raw)
            self.timeline["written"] = self._elapsed()
            if verify:
                self.written = check()
        except Aborted:
            return
        except Exception as exc:  # noqa: BLE001 (any failure of this node's disk or image:
            # report it and keep relaying for the others)
            self.sink_error = reason(exc)
            self.ring.remove("sink")
            self.emit("sink-failed", reason=self.sink_error)
            return
        self.sink_done = True
        self._maybe_done()

    def _maybe_done(self):
        with self.lock:
            if not (self.received and self.sink_done) or self.done_sent:
                return
            self.done_sent = True
        written = {"written": self.written} if self.written else {}
        self.emit("done", bytes=self.ring.head, sha256=self.digest.hexdigest(), **written,
                  time=self._elapsed(), timeline=self.timeline, **_usage())

    def _elapsed(self):
        return round(time.monotonic() - self.started, 3)

    # -------------------------------------------------------- children

    def set_children(self, wanted):
        wanted = {c[0]: c for c in wanted}
        for name in list(self.children):
            if name not in wanted:
                self.children.pop(name).stop()
        for name, (_, address, port) in wanted.items():
            if name not in self.children or self.children[name].finished:
                self.children[name] = Forwarder(self, name, address, port)
        self.ring.remove(HOLD)

    def state(self):
        now = time.monotonic()
        ring = self.ring
        with ring.lock:
            full = ring._room() <= 0
            fwd = {name: [ring.cursors.get(name, 0), round(ring.idle(name, now), 1)]
                   for name in list(self.children)}
            sink_idle = ring.idle("sink", now)
        recv_idle = 0.0 if full or ring.head >= self.total else now - self.last_recv
        recv = ring.head if self.fetched is None else self.fetched
        return {"recv": recv, "recv_idle": round(recv_idle, 1),
                "sink_idle": round(sink_idle, 1), "fwd": fwd}

    def report_loop(self):
        while True:
            self.emit("state", **self.state())
            if self.closing.wait(self.job["interval"]):
                return


class Forwarder:
    """Streams the ring to one child from the child's own offset."""

    def __init__(self, agent, name, address, port):
        self.agent, self.name, self.ring = agent, name, agent.ring
        self.stopped = self.finished = False
        self.ring.add(name)  # hold what the ring keeps until the child tells its offset
        self.sock = None
        threading.Thread(target=self.run, args=(address, port), daemon=True).start()

    def stop(self):
        self.stopped = True
        if self.sock is not None:
            shutdown(self.sock)
        self.ring.remove(self.name)

    def run(self, address, port):
        try:
            self.sock = connect_child(address, port, self.agent.job["token"], self.agent.job["name"])
            offset = OFFSET.unpack(read_exact(self.sock, OFFSET.size))[0]
            if not self.ring.place(self.name, offset):
                if not self.stopped:
                    self.agent.emit("cannot-serve", child=self.name, offset=offset)
                return
            self._stream()
        except Aborted:
            return
        except OSError as exc:
            if not self.stopped:
                self.agent.emit("child-lost", child=self.name, reason=reason(exc))
        finally:
            self.finished = True
            if self.sock is not None:
                self.sock.close()
            self.ring.remove(self.name)

    def _stream(self):
        self.sock.settimeout(IO_TICK)
        while not self.stopped:
            view = self.ring.read(self.name, CHUNK, IO_TICK)
            if view is None:
                continue
            if not view:
                self.sock.shutdown(socket.SHUT_WR)
                return
            try:
                sent = self.sock.send(view)
            except socket.timeout:  # noqa: UP041 (not TimeoutError before Python 3.10)
                continue
            self.ring.advance(self.name, sent)


def _usage():
    """CPU seconds (with the decompressing command, if any) and peak memory (MB) so far."""
    try:
        import resource
    except ImportError:
        return {}
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    usage = {"cpu": round(own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime, 3)}
    try:  # VmHWM: ru_maxrss would include the peak of whatever process exec'd us
        with open("/proc/self/status") as status:
            peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        usage["peak_mb"] = round(peak / 1024, 1)
    except (OSError, StopIteration, ValueError):
        pass
    return usage


def _json():
    import json  # here, not at the top: the agent is ready sooner (see Agent.emit_ready)
    return json


def _start(target):
    threading.Thread(target=target, daemon=True).start()


def run(stdin, stdout, job=None, program=None):
    """Serve one job (read from the first line if not given), then the commands, until EOF.

    With a tree launch (job ``control``), commands and events go over a connection to
    the frontend, and the agents of the job's launch children are started from here
    with ``program`` (see ``spawn``)."""
    if job is None:
        job = _json().loads(stdin.readline())
    if job.get("control"):
        try:
            control = connect_control(job["control"], job["token"], job["name"])
        except OSError as exc:
            sys.exit(f"kabin chaincast agent: cannot reach the frontend: {reason(exc)}")
        stdin = control.makefile("r", encoding="utf-8")
        stdout = control.makefile("w", encoding="utf-8")
    try:
        agent = Agent(job, stdout)
    except OSError as exc:
        stdout.write(_json().dumps({"ev": "fatal", "reason": reason(exc)}) + "\n")
        stdout.flush()
        return 3
    timer = threading.Timer(job["deadline"], os._exit, args=(4,))
    timer.daemon = True
    timer.start()
    agent.emit_ready()
    if program is not None:
        launch_children(job, program, agent.emit)
    for target in (agent.accept_loop, agent.receive_loop, agent.sink_loop, agent.report_loop):
        _start(target)
    decode = _json().loads
    for line in stdin:  # until the sender closes our stdin (or goes away)
        command = decode(line)
        if command["cmd"] == "children":
            agent.set_children(command["children"])
    agent.closing.set()
    agent.ring.abort()
    for cleanup in agent.cleanups:
        cleanup()
    return 0


def main():
    stdin = os.fdopen(0, "r", buffering=1, closefd=False)
    code = run(stdin, sys.stdout, globals().get("KABIN_JOB"),  # given by launch's bootstrap
               globals().get("KABIN_PROGRAM"))
    sys.stdout.flush()
    os._exit(code)  # daemon threads may be blocked in I/O: do not wait for them


if __name__ == "__main__":
    main()
