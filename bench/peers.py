"""ka-chaincast's peers, run by hand the way their users run them (for bench/chaincast.py).

Each peer sends the image (a tar.zst) from here, the testbed's frontend namespace, to
the nodes ``names`` of testbed ``bed`` and returns T: the seconds from its first
command to every node having the image extracted under ``DEST`` (``zstd -dc | tar -x``),
its start over SSH included. A peer that fails raises ``PeerError`` with the reason.
Every wait is bounded by ``timeout``; at the end, every process the peer started here
is killed, and so is whatever is left on the nodes (all but their init and sshd), with
``DEST``.

    netcat_chain   Kadeploy's first chain: nc -l | tee >(nc NEXT) | extract on each
                   node, started from the last to the first; nc from here to the first
    udpcast        udp-sender here, udp-receiver | extract on each node
    aria2          opentracker and a seeding aria2c here, aria2c on each node (into a
                   file, extracted by its download-complete hook while it goes on seeding)
    taktuk         taktuk -s broadcast exec [ extract ] ; broadcast input file [ image ]
"""

import collections
import contextlib
import functools
import math
import os
import queue
import shlex
import signal
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kabin.testbed.instance import SSH_OPTIONS

DEST = "/mnt/dest/peer"
SCRATCH = "/tmp/peer"                 # a node's own tmpfs: aria2's downloaded file
EXTRACT = f"zstd -dc | tar -x -C {DEST}"
NC_PORT, UDP_PORTBASE, TRACKER_PORT, BT_PORT = 25600, 25610, 25620, 25621
RENDEZVOUS = "224.0.0.1"              # the testbed's interfaces have no broadcast address
ARIA2 = ["--enable-dht=false", "--bt-enable-lpd=false", f"--listen-port={BT_PORT}",
         "--console-log-level=warn", "--summary-interval=0", "--show-console-readout=false"]
# kill what is left on a node: every process but its init, its sshd and this sweep
SWEEP = (f"rm -rf {DEST} {SCRATCH}; ps -eo pid=,ppid=,comm= | awk -v me=$$ "
         "'$1 != 1 && $1 != me && $2 != me && $3 != \"sshd\" {print $1, $3}' | "
         "while read pid comm; do kill -9 $pid 2>/dev/null && echo $comm; done")


class PeerError(Exception):
    """A peer did not bring the image to every node: why."""


class Node:
    """``script`` run by bash on a node over SSH; its output lines (stdout and stderr) queued."""

    def __init__(self, bed, name, script, stdin=None):
        self.name = name
        argv = bed.ssh_argv(name, f"exec bash -c {shlex.quote(script)}")
        self.proc = subprocess.Popen(argv, stdin=stdin or subprocess.DEVNULL, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines, self.tail = queue.Queue(), collections.deque(maxlen=4)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.tail.append(line.strip())
            self.lines.put(line.strip())
        self.lines.put(None)

    def expect(self, word, deadline):
        """Wait until the node prints the line ``word``."""
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise PeerError(f"{self.name}: no {word!r} in time ({self.why()})") from None
            if line is None:
                raise PeerError(f"{self.name} ended before {word!r}: {self.why()}")
            if line == word:
                return

    def wait(self, deadline):
        try:
            code = self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise PeerError(f"{self.name}: not done in time ({self.why()})") from None
        if code:
            raise PeerError(f"{self.name}: exit {code}: {self.why()}")

    def why(self):
        return " | ".join(self.tail) or "no output"


class Run:
    """One peer's run: its clock, its deadline, its processes (all ended on exit)."""

    def __init__(self, bed, names, timeout, workdir):
        self.bed, self.names, self.workdir = bed, names, Path(workdir)
        self.start = time.monotonic()
        self.deadline = self.start + timeout
        self.nodes, self.local = [], []

    def node(self, name, script, stdin=None):
        node = Node(self.bed, name, script, stdin)
        self.nodes.append(node)
        return node

    def spawn(self, argv, log, **kwargs):
        """Start ``argv`` here, in a session of its own, its output into ``log`` (a name)."""
        with open(self.workdir / log, "wb") as out:
            proc = subprocess.Popen([str(a) for a in argv], stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, **kwargs)
        self.local.append(proc)
        return proc

    def log_tail(self, log):
        lines = (self.workdir / log).read_text(errors="replace").strip().splitlines()
        return " | ".join(lines[-3:]) or "no output"

    def wait_nodes(self):
        for node in self.nodes:
            node.wait(self.deadline)
        return time.monotonic() - self.start

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for proc in self.local:
            if proc.poll() is None:
                _kill_group(proc)
        for node in self.nodes:
            if node.proc.poll() is None:
                node.proc.kill()
            node.proc.wait(10)
        with ThreadPoolExecutor(min(16, len(self.names))) as threads:
            left = dict(zip(self.names, threads.map(self._sweep, self.names)))
        left = {name: words for name, words in left.items() if words}
        if left:
            print(f"   (killed what was left on the nodes: {left})", flush=True)

    def _sweep(self, name):
        done = subprocess.run(self.bed.ssh_argv(name, SWEEP), capture_output=True, text=True,
                              timeout=60)
        return done.stdout.split()


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def netcat_chain(bed, image, names, timeout, workdir):
    """On each node, from the last to the first, ``nc -l | tee >(nc NEXT) | extract`` (each
    one listening before the one before it starts); then ``nc -N FIRST < image`` here."""
    with Run(bed, names, timeout, workdir) as run:
        for i in reversed(range(len(names))):
            following = names[i + 1] if i + 1 < len(names) else None
            tee = f"tee >(nc -N {bed.address(following)} {NC_PORT}) | " if following else ""
            script = (f"set -o pipefail; mkdir -p {DEST} && "
                      f"{{ nc -l -d {NC_PORT} | {tee}{EXTRACT}; }} & "
                      f"until ss -Hltn 'sport = :{NC_PORT}' | grep -q .; do sleep 0.02; done; "
                      "echo listening; wait $!")
            run.node(names[i], script).expect("listening", run.deadline)
        with open(image.path, "rb") as data:
            run.spawn(["nc", "-N", bed.address(names[0]), NC_PORT], "nc.log", stdin=data)
        return run.wait_nodes()


def udpcast(bed, image, names, timeout, workdir, bitrate):
    """``udp-receiver | extract`` on each node; ``udp-sender`` here, starting once all have
    joined, sending at ``bitrate`` bits per second at most."""
    from kabin.chaincast.multicast import interface_towards

    common = ["--nokbd", "--no-progress", "--portbase", str(UDP_PORTBASE),
              "--mcast-rdv-address", RENDEZVOUS]
    wait = int(timeout / 2)
    with Run(bed, names, timeout, workdir) as run:
        for name in names:
            receiver = shlex.join(["udp-receiver", *common, "--interface", bed.address(name),
                                   "--start-timeout", str(wait), "--receive-timeout", "20"])
            run.node(name, f"set -o pipefail; mkdir -p {DEST} && {receiver} | {EXTRACT}")
        run.spawn(["udp-sender", *common, "--file", image.path, "--min-receivers", len(names),
                   "--max-wait", wait, "--interface", interface_towards(bed.address(names[0])),
                   "--max-bitrate", f"{bitrate / 1e6:g}m"], "udp-sender.log")
        return run.wait_nodes()


def aria2(bed, image, names, timeout, workdir):
    """opentracker here (serving only the image's torrent: ``-w`` whitelist), a torrent made
    by mktorrent, aria2c seeding it here; on each node aria2c downloads into a file, which
    its download-complete hook extracts (it goes on seeding until the end)."""
    frontend = bed.layout.frontend_address
    torrent = Path(workdir) / "image.torrent"
    torrent.unlink(missing_ok=True)
    _checked(["mktorrent", "-a", f"http://{frontend}:{TRACKER_PORT}/announce", "-o", torrent,
              image.path])
    hook = f'#!/bin/sh\nzstd -dc "$3" | tar -x -C {DEST} && echo extracted\n'
    node_script = (f"mkdir -p {DEST} {SCRATCH} && cat > {SCRATCH}/image.torrent && "
                   f"printf %s {shlex.quote(hook)} > {SCRATCH}/hook && chmod +x {SCRATCH}/hook && "
                   + shlex.join(["exec", "aria2c", *ARIA2, f"--seed-time={math.ceil(timeout / 60)}",
                                 "-d", SCRATCH, f"--on-bt-download-complete={SCRATCH}/hook",
                                 f"{SCRATCH}/image.torrent"]))
    with _tracker_dir(torrent) as whitelist, Run(bed, names, timeout, workdir) as run:
        run.spawn(["opentracker", "-i", frontend, "-p", TRACKER_PORT, "-P", TRACKER_PORT,
                   "-w", whitelist], "opentracker.log", cwd=whitelist.parent)
        _wait_listening(frontend, TRACKER_PORT, run.deadline,
                        lambda: run.log_tail("opentracker.log"))
        run.spawn(["aria2c", *ARIA2, "--seed-ratio=0.0", "--check-integrity=true",
                   "--bt-seed-unverified=true", "-d", Path(image.path).parent, torrent],
                  "aria2c-seed.log")
        for name in names:
            with open(torrent, "rb") as data:
                run.node(name, node_script, stdin=data)
        for node in run.nodes:
            node.expect("extracted", run.deadline)
        return time.monotonic() - run.start


@contextlib.contextmanager
def _tracker_dir(torrent):
    """The whitelist of ``torrent``'s info-hash, in a directory of its own: opentracker, run
    as root, chroots to its working directory and reads the list as user nobody (it
    refuses -u root), so that directory must be readable by all."""
    with tempfile.TemporaryDirectory(prefix="kabin-tracker-") as directory:
        os.chmod(directory, 0o755)
        whitelist = Path(directory) / "whitelist"
        whitelist.write_text(_info_hash(torrent) + "\n")
        whitelist.chmod(0o644)
        yield whitelist


def taktuk(bed, image, names, timeout, workdir):
    """``taktuk -s -c SSH -l root -m NODE... broadcast exec [ extract ] ; broadcast input
    file [ image ] ; broadcast input close``: TakTuk's tree carries the image to every
    command's input."""
    ssh = bed.config.server.ssh
    connector = shlex.join(["ssh", "-i", str(ssh.key), *SSH_OPTIONS, "-p", str(ssh.port)])
    machines = [word for name in names for word in ("-m", bed.address(name))]
    argv = ["taktuk", "-s", "-c", connector, "-l", ssh.user, *machines,
            "broadcast", "exec", "[", f"mkdir -p {DEST} && {EXTRACT}", "]", ";",
            "broadcast", "input", "file", "[", image.path, "]", ";", "broadcast", "input", "close"]
    with Run(bed, names, timeout, workdir) as run:
        proc = run.spawn(argv, "taktuk.log")
        try:
            code = proc.wait(timeout=max(0.0, run.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise PeerError(f"not done in time: {run.log_tail('taktuk.log')}") from None
        elapsed = time.monotonic() - run.start
        said = (run.workdir / "taktuk.log").read_text(errors="replace")
        done = said.count("status > Exited with status 0")
        if code or done < len(names):
            raise PeerError(f"exit {code}, {done}/{len(names)} nodes extracted: "
                            f"{run.log_tail('taktuk.log')}")
        return elapsed


def _checked(argv):
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise PeerError(f"{argv[0]} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def _info_hash(torrent):
    """The torrent's info-hash, in hex (as aria2c -S shows it)."""
    for line in _checked(["aria2c", "-S", torrent]).splitlines():
        if line.startswith("Info Hash:"):
            return line.split(":", 1)[1].strip()
    raise PeerError(f"no info-hash in aria2c -S {torrent}")


def _wait_listening(host, port, deadline, why):
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise PeerError(f"nothing listens on {host}:{port}: {why()}") from None
            time.sleep(0.05)


def all_peers(bitrate):
    """(label, peer) of every peer: each one called as peer(bed, image, names, timeout, workdir);
    udp-sender sends at ``bitrate`` bits per second at most."""
    return [("netcat+tee chain", netcat_chain),
            (f"udpcast --max-bitrate {bitrate / 1e6:g}m",
             functools.partial(udpcast, bitrate=bitrate)),
            ("aria2c+opentracker", aria2), ("taktuk broadcast", taktuk)]
