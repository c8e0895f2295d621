"""How a node's agent receives the image from another engine than kabin's own links.

- multicast: udpcast's ``udp-receiver`` piped into the ring as it arrives;
- bittorrent: ``aria2c`` fetches the image from the swarm into a spool file (and
  seeds it to the others until the agent ends), then the file goes through the ring.

Either way the data then takes the chain's path: the same ring, sink and digests.
A receiver that ends short says so (event ``upstream-lost`` with its offset): the
sender then repairs the node by a unicast pass from there. Standard library only:
sent ahead of ``agent.py`` (see ``launch.agent_source``).
"""

import os
import time

try:  # in the package; on a node, links.py comes first in the same script
    from .links import IO_TICK, reason
except ImportError:
    pass

TORRENT_NAME = "image"      # the file a torrent describes, as the frontend names it
# aria2c in kabin's swarms (the nodes' and the frontend's seeder): the tracker only, quiet
ARIA2C = ("aria2c", "--enable-dht=false", "--enable-dht6=false", "--bt-enable-lpd=false",
          "--bt-tracker-interval=1", "--seed-ratio=0.0", "--console-log-level=error",
          "--summary-interval=0", "--show-console-readout=false")


def peer_ports(ports):
    """The ports aria2c listens on: the range but its first (the tracker's)."""
    return f"{ports[0] + 1}-{ports[1]}"


def pour(agent, read):
    """Move data from ``read(view) -> count`` into the agent's ring until the end or EOF."""
    ring = agent.ring
    while ring.head < agent.total:
        view = ring.slot(IO_TICK)
        if view is None:
            continue
        count = read(view)
        ring.commit(count)
        if not count:
            return
        agent.digest.update(view[:count])
        agent.last_recv = time.monotonic()


def receive_multicast(agent, multicast):
    """Read udpcast's receiver into the ring; say so if it ends short (no sender, a lost stream)."""
    import subprocess

    argv = ["udp-receiver", "--nokbd", "--portbase", str(multicast["portbase"]),
            "--interface", multicast["interface"],
            "--mcast-rdv-address", multicast["rendezvous"],
            "--start-timeout", str(multicast["start_timeout"]),
            "--receive-timeout", str(multicast["receive_timeout"])]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
    except OSError as exc:
        agent.emit("upstream-lost", offset=0, reason=f"udp-receiver: {reason(exc)}")
        return
    with proc:
        fd = proc.stdout.fileno()
        pour(agent, lambda view: os.readv(fd, [view]))
        if agent.ring.head < agent.total:
            proc.kill()
    if agent.ring.head < agent.total:
        agent.emit("upstream-lost", offset=agent.ring.head,
                   reason=f"the multicast stream ended (udp-receiver exit {proc.returncode})")


def receive_bittorrent(agent, bittorrent):
    """Fetch the image with aria2c, then pour the file into the ring. aria2c seeds
    until the agent ends (``agent.cleanups``) and gives up after ``stall`` seconds
    without data; then the node is repaired from the source."""
    import tempfile

    agent.fetched = 0
    spool = tempfile.mkdtemp(prefix="kabin-bt-", dir=bittorrent["spool"])
    try:
        proc, fifo = _start_aria2c(spool, bittorrent)
    except OSError as exc:
        _remove(spool)
        agent.emit("upstream-lost", offset=0, reason=f"aria2c: {reason(exc)}")
        return
    agent.cleanups.append(lambda: _end_aria2c(proc, spool))
    path = os.path.join(spool, TORRENT_NAME)
    if not _fetched(agent, proc, fifo, path):
        agent.emit("upstream-lost", offset=0,
                   reason=f"the bittorrent download ended short (aria2c exit {proc.returncode})")
        return
    with open(path, "rb") as data:
        pour(agent, data.readinto)


def _start_aria2c(spool, bittorrent):
    """aria2c on the job's torrent, its completion told through a FIFO by its hook."""
    import base64
    import subprocess

    torrent, fifo, hook = (os.path.join(spool, name) for name in ("torrent", "done", "hook"))
    with open(torrent, "wb") as out:
        out.write(base64.b64decode(bittorrent["torrent"]))
    os.mkfifo(fifo, 0o600)
    with open(hook, "w") as out:
        out.write(f"#!/bin/sh\necho done > {fifo}\n")
    os.chmod(hook, 0o700)
    argv = [*ARIA2C, f"--dir={spool}", f"--listen-port={peer_ports(bittorrent['ports'])}",
            f"--seed-time={bittorrent['seed_seconds'] / 60:.2f}",
            f"--bt-stop-timeout={bittorrent['stall']}",
            "--file-allocation=none", "--stream-piece-selector=inorder",
            "--allow-overwrite=true", "--auto-file-renaming=false",
            f"--on-bt-download-complete={hook}", torrent]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    return proc, fifo


def _fetched(agent, proc, fifo, path):
    """Wait for aria2c's hook (True) or its end (False); meanwhile report the bytes on disk."""
    import select

    fd = os.open(fifo, os.O_RDWR)      # read-write: no EOF while the hook has not opened it
    try:
        while proc.poll() is None:
            if select.select([fd], [], [], IO_TICK)[0]:
                return bool(os.read(fd, 64))
            try:
                agent.fetched = min(os.stat(path).st_blocks * 512, agent.total)
            except OSError:
                pass
        return False
    finally:
        os.close(fd)


def _end_aria2c(proc, spool):
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    _remove(spool)


def _remove(spool):
    import shutil

    shutil.rmtree(spool, ignore_errors=True)
