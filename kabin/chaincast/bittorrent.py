"""The bittorrent method (Kadeploy's Bittorrent variant): a swarm of aria2c on the nodes.

The frontend makes the torrent (one file, ``receivers.TORRENT_NAME``), runs a
tracker (opentracker, which serves only the torrents of its whitelist: this
one) and a seeder (aria2c on the image file itself). Each node's agent runs
aria2c into a spool file, seeding what it has to the other nodes, then pours
the file into its ring, sink and digests as the chain does (see
``receivers.receive_bittorrent``). A node that cannot fetch the image is
repaired by a unicast pass from the source; robust to churn, slower than the
chain at small scale (the image is written only once it is all there).
"""

import base64
import hashlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from ..errors import KabinError
from ..parallel import Deadline
from .receivers import ARIA2C, TORRENT_NAME, peer_ports

log = logging.getLogger(__name__)

TRACKER = "opentracker"
TRACKER_START = 10.0        # seconds for the tracker to listen


class BittorrentError(KabinError):
    """The tracker or the seeder cannot run."""


def bencode(value):
    """BitTorrent's encoding of ints, strings, lists and dicts (keys sorted)."""
    if isinstance(value, int):
        return b"i%de" % value
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return b"%d:%s" % (len(value), value)
    if isinstance(value, list):
        return b"l" + b"".join(map(bencode, value)) + b"e"
    return b"d" + b"".join(bencode(key) + bencode(value[key]) for key in sorted(value)) + b"e"


def piece_length(size):
    """1 MiB pieces, 4 MiB past 2 GiB (a torrent of a few thousand pieces at most)."""
    return 1 << 20 if size <= 2 << 30 else 4 << 20


def make_torrent(path, announce):
    """(torrent file bytes, info-hash hex) of the file ``path``, private to ``announce``."""
    length, pieces = piece_length(os.path.getsize(path)), []
    size = 0
    with open(path, "rb") as data:
        while piece := data.read(length):
            size += len(piece)
            pieces.append(hashlib.sha1(piece).digest())
    info = {"name": TORRENT_NAME, "length": size, "piece length": length,
            "pieces": b"".join(pieces), "private": 1}
    torrent = bencode({"announce": announce, "info": info})
    return torrent, hashlib.sha1(bencode(info)).hexdigest()


class Swarm:
    """The tracker and the seeder of ``path`` on ``address`` (the frontend's, towards
    the nodes): the tracker on ``ports[0]``, aria2c on the rest of the range."""

    def __init__(self, path, address, ports, seed_seconds):
        self.dir = Path(tempfile.mkdtemp(prefix="kabin-bt-"))
        self.dir.chmod(0o755)       # opentracker reads its whitelist as user nobody
        self.procs = []
        try:
            self.torrent, info_hash = make_torrent(path, f"http://{address}:{ports[0]}/announce")
            (self.dir / "whitelist").write_text(info_hash + "\n")
            (self.dir / "whitelist").chmod(0o644)
            (self.dir / "torrent").write_bytes(self.torrent)
            (self.dir / TORRENT_NAME).symlink_to(Path(path).resolve())
            self._start([TRACKER, "-i", address, "-p", str(ports[0]), "-P", str(ports[0]),
                         "-w", str(self.dir / "whitelist")], "Debian package opentracker")
            _wait_listening(address, ports[0], self.procs[0])
            self._start([*ARIA2C, f"--dir={self.dir}", f"--listen-port={peer_ports(ports)}",
                         "--bt-seed-unverified=true", f"--seed-time={seed_seconds / 60:.2f}",
                         str(self.dir / "torrent")], "Debian package aria2")
        except BaseException:
            self.close()
            raise
        log.info("bittorrent: tracker on %s:%d, seeder started", address, ports[0])

    def job(self):
        """The torrent as the agents' job carries it."""
        return base64.b64encode(self.torrent).decode()

    def _start(self, argv, package):
        log.debug("bittorrent: %s", " ".join(argv))
        try:
            self.procs.append(subprocess.Popen(argv, cwd=self.dir, stdin=subprocess.DEVNULL,
                                               stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL))
        except OSError as exc:
            raise BittorrentError(f"cannot start {argv[0]}: {exc.strerror or exc} "
                                  f"({package})") from None

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _wait_listening(address, port, proc):
    """Until the tracker accepts: nodes that find no tracker retry only minutes later."""
    deadline = Deadline(TRACKER_START)
    while not deadline.expired:
        try:
            socket.create_connection((address, port), timeout=deadline.remaining()).close()
            return
        except OSError:
            try:        # a bounded wait on the tracker's end, not a sleep
                code = proc.wait(0.05)
            except subprocess.TimeoutExpired:
                continue
            raise BittorrentError(f"{TRACKER} exited with {code} "
                                  f"(port {port} of {address} in use?)") from None
    raise BittorrentError(f"{TRACKER} not listening on {address}:{port} "
                          f"after {TRACKER_START:.0f} s")
