"""The head of a broadcast: serves the image file to its children over TCP.

The source speaks the agents' protocol as a parent (see ``links``): it connects
to a child, learns the child's offset and streams the file from there with
``sendfile`` (no copy through Python). Unlike a relay it can serve any offset,
which is what a repair falls back on when a relay's ring no longer holds the
data a child needs.
"""

import hashlib
import logging
import os
import select
import socket
import threading
import time

from . import links
from .topology import SOURCE

log = logging.getLogger(__name__)

SEND_CHUNK = 4 << 20
TICK = 1.0


class SourceDigest:
    """SHA-256 of the image: known in advance, or computed in the background during the broadcast."""

    def __init__(self, path, stop, known=None):
        self.path, self.stop = path, stop
        self.value, self.error = known, None
        self._done = threading.Event()
        if known:  # recorded with the environment and verified before use
            self._done.set()
        else:
            threading.Thread(target=self._run, daemon=True, name="kabin-chaincast-digest").start()

    def _run(self):
        digest = hashlib.sha256()
        try:
            with open(self.path, "rb") as handle:
                while not self.stop.is_set():
                    data = handle.read(SEND_CHUNK)
                    if not data:
                        self.value = digest.hexdigest()
                        break
                    digest.update(data)
        except OSError as exc:
            self.error = f"cannot read the image: {exc.strerror}"
        finally:
            self._done.set()

    def result(self, timeout):
        """The hex digest, or None if not known within ``timeout`` seconds."""
        self._done.wait(timeout)
        return self.value


class WrittenDigest:
    """What a node's read-back of the written data should give (see ``written``), computed
    in the background from the image during the broadcast."""

    def __init__(self, image, stop):
        self.image, self.stop = image, stop
        self.value, self.error = None, None
        self._done = threading.Event()
        threading.Thread(target=self._run, daemon=True, name="kabin-chaincast-written").start()

    def _run(self):
        from . import sinks, written

        try:
            with open(self.image.path, "rb") as handle:
                stream = _Stoppable(sinks.decompressed(handle, self.image.compression), self.stop)
                if self.image.kind == "tar":
                    self.value = written.expected_tree(stream)
                else:
                    self.value = written.expected_stream(stream)[1]
        except Exception as exc:  # noqa: BLE001 (any unreadable or corrupt image: the nodes
            # cannot be verified, and say why)
            self.error = f"cannot read the image: {exc}"
        finally:
            self._done.set()

    def result(self, timeout):
        """The hex digest, or None if not known within ``timeout`` seconds."""
        self._done.wait(timeout)
        return self.value


class _Stoppable:
    """A stream that ends early once ``stop`` is set (the broadcast is over)."""

    def __init__(self, stream, stop):
        self.stream, self.stop = stream, stop

    def read(self, size=-1):
        if self.stop.is_set():
            raise OSError("the broadcast is over")
        return self.stream.read(size)


class Source:
    """Feeds the image file to the children the broadcast gives it."""

    def __init__(self, path, size, token, events, stop, max_rate=None):
        self.path, self.size, self.token = path, size, token
        self.events, self.stop, self.max_rate = events, stop, max_rate
        self.fd = os.open(path, os.O_RDONLY)
        self.feeders = {}

    def set_children(self, children):
        """``children``: [(name, address, port)], as the agents' ``children`` command."""
        wanted = {c[0]: c for c in children}
        for name in list(self.feeders):
            if name not in wanted:
                self.feeders.pop(name).stop()
        for name, (_, address, port) in wanted.items():
            if name not in self.feeders or self.feeders[name].finished:
                self.feeders[name] = Feeder(self, name, address, port)

    def state(self):
        now = time.monotonic()
        return {"fwd": {name: [f.offset, round(f.idle(now), 1)] for name, f in self.feeders.items()}}

    def close(self):
        for feeder in self.feeders.values():
            feeder.stop()
        self.feeders.clear()
        os.close(self.fd)


class Feeder:
    """Streams the file to one child from the offset the child asks for."""

    def __init__(self, source, name, address, port):
        self.source, self.name = source, name
        self.offset, self.progress = None, time.monotonic()
        self.stopped = self.finished = False
        self.sock = None
        threading.Thread(target=self._run, args=(address, port), daemon=True,
                         name=f"kabin-chaincast-feed-{name}").start()

    def idle(self, now):
        if self.finished or self.offset is None or self.offset >= self.source.size:
            return 0.0
        return now - self.progress

    def stop(self):
        self.stopped = True
        if self.sock is not None:
            links.shutdown(self.sock)

    def _run(self, address, port):
        source = self.source
        try:
            self.sock = links.connect_child(address, port, source.token, "source")
            self.offset = links.OFFSET.unpack(links.read_exact(self.sock, links.OFFSET.size))[0]
            self.progress = time.monotonic()
            self._stream()
        except OSError as exc:
            if not self.stopped:
                source.events.put((SOURCE, {"ev": "child-lost", "child": self.name,
                                            "reason": links.reason(exc)}))
        finally:
            self.finished = True
            if self.sock is not None:
                self.sock.close()

    def _stream(self):
        source, sock = self.source, self.sock
        sock.setblocking(False)
        start, first = time.monotonic(), self.offset
        while self.offset < source.size and not (self.stopped or source.stop.is_set()):
            if not select.select([], [sock], [], TICK)[1]:
                continue
            try:
                sent = os.sendfile(sock.fileno(), source.fd, self.offset,
                                   min(SEND_CHUNK, source.size - self.offset))
            except BlockingIOError:
                continue
            if sent == 0:
                raise OSError("the image file shrank while it was being sent")
            self.offset += sent
            self.progress = time.monotonic()
            if source.max_rate:
                ahead = (self.offset - first) / source.max_rate - (self.progress - start)
                if ahead > 0:
                    source.stop.wait(ahead)
        if self.offset >= source.size:
            sock.shutdown(socket.SHUT_WR)
