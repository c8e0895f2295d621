"""Benchmark: ka-chaincast against the ideal S/B and against sending to each node in turn.

    python bench/chaincast.py [--tier netns|loopback] [--size-mb 128] [--rate 100mbit]
                              [--nodes 2,8,16] [--big 32] [--big-rate 40mbit]
                              [--serial 4] [--instance h6] [--keep]

Image: S MB of tar.zst (mostly incompressible files, as an OS image with its
packages already compressed), built in a temporary directory.

Tiers:
  netns     ``ka-testbed up --netns --link-rate RATE`` (instance ``--instance``,
            brought down at the end unless --keep): one network namespace per
            node, every link shaped (tbf) to B; the sender runs in the frontend's
            namespace, the agents over SSH on the nodes, extracting into their
            /mnt/dest. Also measured: one plain TCP stream on a shaped link
            (what B really carries, S/B_tcp). The killed node: the testbed's
            fault die-after-bytes=S/2.
  loopback  agents as local processes on 127.0.72.X writing under /dev/shm; the
            links are not shaped, so the source is paced at B instead (only the
            first hop is shaped: what is measured is the pipeline's overhead and
            whether 2 CPUs keep up with N relays at that rate).

Netns tier, first: the floor of this machine for the largest N, what a relay
that only forwards (no disk, no hash, no tar) costs here: SSH to every node plus
python's start, then the image through a chain of such relays.

For each N (same run): T(N) (agents' start over SSH included, shown apart),
the ideal S/B, T(N) / (S/B), T(N) / T(2); the serial baseline (N one-node
broadcasts; ``--serial K`` measures K of them and scales to N); one node killed
at 50 % of the image (T / fault-free T); then the same at ``--big`` nodes and
``--big-rate``. Per relay: CPU seconds per MB (its decompressing command
included) and peak memory (VmHWM), as the agents report them.
Targets (issue 6): T(16) <= 1.10 S/B; T(16)/T(2) <= 1.10; serial / T(16) >= 10;
killed at 50 %: T <= 1.25 x fault-free. Same targets at 32 nodes, 40 Mbit/s.
"""

import argparse
import io
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import zstandard

from kabin import records
from kabin.chaincast import Broadcast, Options, open_image
from kabin.chaincast.launch import LocalLauncher

MB = 1 << 20
PORTS = (25400, 25499)


def parse_rate(text):
    """'100mbit' -> bytes per second."""
    units = {"kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8}
    for unit, factor in units.items():
        if text.lower().endswith(unit):
            return float(text[:-len(unit)]) * factor
    raise SystemExit(f"bad rate {text!r} (e.g. 100mbit)")


def make_image(directory, size_mb):
    """A tar.zst of about ``size_mb`` MB: a few big random files and many small ones."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        for i in range(size_mb // 8):
            _add(archive, f"usr/lib/blob{i}", os.urandom(8 * MB))
        for i in range(500):
            _add(archive, f"etc/conf{i}", (f"key{i} = value\n" * 40).encode())
    path = Path(directory) / "image.tar.zst"
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(raw.getvalue()))
    return open_image(path, "tar")


def _add(archive, name, data):
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    archive.addfile(info, io.BytesIO(data))


class Loopback:
    """Agents as local processes; the source paced at B."""

    name = "loopback"

    def __init__(self, image, verify="written"):
        self.image, self.verify = image, verify
        self.root = Path(tempfile.mkdtemp(prefix="kabin-bench-", dir="/dev/shm"))

    def run(self, count, rate, victim=None):
        names = [f"node-{i}" for i in range(1, count + 1)]
        addresses = {n: f"127.0.72.{i}" for i, n in enumerate(names, 1)}
        job = Broadcast(self.image, LocalLauncher(), addresses.get, lambda n: str(self.root / n),
                        PORTS, Options(max_rate=rate, timeout=3600, stall_timeout=10,
                                       verify=self.verify))
        if victim:
            job.observer = _kill_at_half(job, victim)
        try:
            return _timed(job, names)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def close(self):
        shutil.rmtree(self.root, ignore_errors=True)


def _kill_at_half(job, victim):
    def observe(snapshot):
        if snapshot["nodes"].get(victim, 0) >= snapshot["size"] / 2 and not fired:
            fired.append(victim)
            os.kill(job.nodes[victim].handle.proc.pid, signal.SIGKILL)
    fired = []
    return observe


class Netns:
    """The testbed's netns tier, from inside its frontend namespace: agents over SSH."""

    name = "netns"
    DEST = "/mnt/dest/bench"

    def __init__(self, image, instance, verify="written"):
        from kabin.testbed.instance import Testbed

        self.image, self.testbed, self.verify = image, Testbed(instance), verify
        self.config = self.testbed.config

    def run(self, count, rate, victim=None):
        from kabin.chaincast import new_broadcast

        names = [f"node-{i}" for i in range(1, count + 1)]
        if victim:  # the testbed crashes it once it has received half the image
            self.testbed.fault(victim, f"die-after-bytes={self.image.size // 2}")
        job = new_broadcast(self.image, self.config, dest=self.DEST,
                            options=Options(timeout=3600, stall_timeout=10,
                                            verify=self.verify))
        try:
            return _timed(job, names)
        finally:
            job.launcher.close()
            if victim:
                self.testbed.clear(victim)
                self.testbed.power(victim, "cycle")
                self.testbed.wait_booted(victim, "deploy")
            self._clean(names)

    def tcp_rate(self, size):
        """Bytes per second of one plain TCP stream from here to node-1 (the shaped link's B)."""
        import socket

        port = PORTS[1]
        receiver = (f"import socket\ns = socket.create_server(('', {port}))\nc, _ = s.accept()\n"
                    "while c.recv(1 << 20):\n    pass\nc.close()\n")
        argv = self.testbed.ssh_argv("node-1", f"exec python3 -c \"{receiver}\"")
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            sock = _connect_retrying((self.testbed.address("node-1"), port), timeout=20)
            start = time.monotonic()
            with open(self.image.path, "rb") as image:
                sock.sendfile(image, 0, size)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)  # the receiver closes once it has read everything
            return size / (time.monotonic() - start)
        finally:
            proc.wait(timeout=30)

    def floor(self, count):
        """(start, stream) seconds of the least any relay costs here, on ``count`` nodes.

        start: SSH to every node at once and run ``python3 -c pass`` there (kabin's pool).
        stream: the image through a chain of relays that only forward (recv, send: no
        disk, no hash, no tar), started beforehand, from the first byte sent to the
        tail's last one.
        """
        import socket
        from concurrent.futures import ThreadPoolExecutor

        from kabin.ssh import SshPool

        names = [f"node-{i}" for i in range(1, count + 1)]
        start = time.monotonic()
        with SshPool(self.config) as pool, ThreadPoolExecutor(count) as threads:
            assert all(r.ok for r in threads.map(lambda n: pool.run(n, "python3 -c pass", 60),
                                                  names))
        started = time.monotonic() - start
        relays = [self._forwarder(name, names[i + 1] if i + 1 < count else None)
                  for i, name in reversed(list(enumerate(names)))]  # the tail listens first
        try:
            sock = socket.create_connection((self.testbed.address(names[0]), PORTS[1]), 20)
            start = time.monotonic()
            with open(self.image.path, "rb") as image:
                sock.sendfile(image, 0, self.image.size)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)  # node-1 closes once the whole chain has everything
            return started, time.monotonic() - start
        finally:
            for proc in relays:
                proc.wait(timeout=30)

    def _forwarder(self, name, following):
        argv = self.testbed.ssh_argv(name, f"exec python3 -c '{FORWARDER}' {PORTS[1]} "
                                           f"{self.testbed.address(following) if following else '-'}")
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        proc.stdout.readline()  # listening
        return proc

    def _clean(self, names):
        for name in names:
            self.testbed.ssh(name, f"rm -rf {self.DEST}")

    def close(self):
        pass


# A relay that only forwards: python3 -c FORWARDER PORT NEXT|-
FORWARDER = """import socket, sys
server = socket.create_server(("", int(sys.argv[1])))
print(flush=True)
down = None if sys.argv[2] == "-" else socket.create_connection((sys.argv[2], int(sys.argv[1])))
up, view = server.accept()[0], memoryview(bytearray(1 << 20))
while True:
    count = up.recv_into(view)
    if not count:
        break
    if down:
        down.sendall(view[:count])
if down:
    down.shutdown(socket.SHUT_WR)
    down.recv(1)
up.close()
"""


def _connect_retrying(address, timeout):
    import socket

    end = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(address, timeout=timeout)
        except ConnectionRefusedError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)  # the receiver is starting over SSH


def _timed(job, names):
    start = time.monotonic()
    results = list(job.run([records.new(n) for n in names]))
    elapsed = time.monotonic() - start
    usage = [n.usage for n in job.nodes.values() if n.usage]
    return elapsed, results, usage, getattr(job, "wired", start) - start


def measure(tier, image, count, rate, serial, label):
    ideal = image.size / rate
    print(f"\n== {label}: S = {image.size / MB:.0f} MB, B = {rate * 8 / 1e6:.0f} Mbit/s, "
          f"S/B = {ideal:.1f} s", flush=True)
    if hasattr(tier, "tcp_rate"):
        tcp = tier.tcp_rate(image.size)
        print(f"one plain TCP stream on a shaped link: {tcp * 8 / 1e6:.1f} Mbit/s, "
              f"S/B_tcp = {image.size / tcp:.1f} s", flush=True)
    if hasattr(tier, "floor"):
        started, stream = tier.floor(count[-1])
        print(f"floor here for {count[-1]} relays that only forward: start {started:.2f} s + "
              f"stream {stream:.2f} s = {started + stream:.2f} s = "
              f"{(started + stream) / ideal:4.2f} S/B", flush=True)
    times, usage = {}, []
    for n in count:
        t, results, used, startup = tier.run(n, rate)
        _check(results, n)
        times[n], usage = t, usage + used
        print(f"T({n:>2}) = {t:6.1f} s   T/(S/B) = {t / ideal:4.2f}   T/T({count[0]}) = "
              f"{t / times[count[0]]:4.2f}   (agents up in {startup:.1f} s, relay peak "
              f"{_peak(used)})", flush=True)
    top = count[-1]
    singles = []
    for _ in range(serial):
        t, _, used, _ = tier.run(1, rate)
        singles.append(t)
        usage += used
    serial_t = statistics.mean(singles) * top
    print(f"serial (each node in turn, {serial} measured, x{top / serial:.0f}): {serial_t:6.1f} s"
          f"   serial / T({top}) = {serial_t / times[top]:4.1f}", flush=True)
    victim = f"node-{top // 2}"
    t, results, used, _ = tier.run(top, rate, victim)
    usage += used
    ko = [r for r in results if r["status"] == "ko"]
    print(f"T({top}) with {victim} killed at 50 %: {t:6.1f} s   / fault-free = "
          f"{t / times[top]:4.2f}   relay peak {_peak(used)}   KO: "
          f"{[(r['node'], r['error']) for r in ko]}", flush=True)
    _check([r for r in results if r["node"] != victim], top - 1)
    per_mb = [u["cpu"] / (image.size / MB) for u in usage]
    print(f"relay CPU: {1000 * statistics.mean(per_mb):.1f} ms per MB (max "
          f"{1000 * max(per_mb):.1f});  relay peak memory: {_peak(usage)}",
          flush=True)
    return {"ideal": ideal, "times": times, "serial": serial_t, "fault": t}


def _peak(usage):
    peaks = [u["peak_mb"] for u in usage if "peak_mb" in u]
    return f"{max(peaks):.0f} MB" if peaks else "?"


def _check(results, count):
    bad = [(r["node"], r.get("error")) for r in results if r["status"] != "ok"]
    if bad or len(results) < count:
        print(f"   !! not all OK: {bad}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tier", choices=["netns", "loopback"], default="netns")
    parser.add_argument("--size-mb", type=int, default=128)
    parser.add_argument("--rate", default="100mbit")
    parser.add_argument("--nodes", default="2,8,16")
    parser.add_argument("--big", type=int, default=32, help="0: skip the big run")
    parser.add_argument("--big-rate", default="40mbit")
    parser.add_argument("--serial", type=int, default=4)
    parser.add_argument("--instance", default="h6")
    parser.add_argument("--keep", action="store_true", help="Keep the testbed instance up.")
    parser.add_argument("--verify", choices=["written", "stream"], default="written",
                        help="What the nodes check (ka-chaincast --verify).")
    parser.add_argument("--inside", metavar="IMAGE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    counts = [int(x) for x in args.nodes.split(",")]
    if args.inside:  # in the frontend's namespace: measure one rate
        image = open_image(args.inside, "tar")
        tier = Netns(image, args.instance, args.verify)
        measure(tier, image, counts, parse_rate(args.rate), args.serial,
                f"netns, links shaped to {args.rate}")
        return
    with tempfile.TemporaryDirectory(prefix="kabin-bench-") as tmp:
        image = make_image(tmp, args.size_mb)
        runs = [(counts, args.rate)] + ([([2, args.big], args.big_rate)] if args.big else [])
        if args.tier == "loopback":
            tier = Loopback(image, args.verify)
            try:
                for nodes, rate in runs:
                    measure(tier, image, nodes, parse_rate(rate), args.serial,
                            f"loopback, source paced at {rate}")
            finally:
                tier.close()
        else:
            for nodes, rate in runs:
                netns_run(args, image, nodes, rate)


def netns_run(args, image, counts, rate):
    """Bring up the netns tier shaped at ``rate``, measure inside its frontend, bring it down."""
    from kabin.testbed.instance import Testbed, exec_argv

    testbed = Testbed(args.instance)
    testbed.up(max(counts), netns=True, link_rate=rate)
    try:
        argv = [sys.executable, __file__, "--inside", str(image.path), "--instance", args.instance,
                "--nodes", ",".join(map(str, counts)), "--rate", rate,
                "--serial", str(args.serial), "--verify", args.verify]
        subprocess.run(exec_argv(args.instance, argv), env=testbed.env, check=True)
    finally:
        if not args.keep:
            testbed.down()


if __name__ == "__main__":
    main()
