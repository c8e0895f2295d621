"""Benchmark: ka-chaincast's methods against the floor of this machine and against peers.

    python bench/chaincast.py [--tier netns|loopback] [--size-mb 128] [--rate 100mbit]
                              [--nodes 2,8,16] [--big 32] [--big-rate 40mbit]
                              [--serial 4] [--mcast-share 0.95] [--instance h6] [--keep]

Image: S MB of tar.zst (mostly incompressible files, as an OS image with its
packages already compressed), built in a temporary directory.

Tiers:
  netns     ``ka-testbed up --netns --link-rate RATE`` (instance ``--instance``,
            brought down at the end unless --keep): one network namespace per
            node, every link shaped (tbf) to B; the senders run in the frontend's
            namespace, the nodes' side over SSH, extracting into their /mnt/dest.
            Also measured: one plain TCP stream on a shaped link (S/B_tcp).
  loopback  agents as local processes on 127.0.72.X writing under /dev/shm; the
            links are not shaped, so the source is paced at B instead (kabin's
            chain only: the pipeline's overhead, whether 2 CPUs keep up).

For each N, one row per method, T (until every node has the image extracted,
start over SSH included), T / floor, T / (S/B):
  floor       relays that only forward (no disk, no hash, no tar), started
              beforehand: SSH to every node + python's start, then the stream
  kabin       chain, multicast (udp-sender at --mcast-share x B), and bittorrent
              when kabin.chaincast.order.METHODS has it
  peers       bench/peers.py: a netcat-and-tee chain, udpcast alone, aria2c with
              opentracker, TakTuk's broadcast; serial unicast (kabin to one node,
              ``--serial K`` measured, times N)
Then, at the largest N: node N/2 killed at 50 % of the image (the testbed's fault
die-after-bytes=S/2), T / fault-free, for kabin's chain (and bittorrent). Per
relay: CPU seconds per MB and peak memory (VmHWM), as the agents report them.
At the end, every table again and the targets (issue 17): kabin chain T(16) <=
1.05 floor, T(32) <= 1.08 floor (at 40 Mbit/s); kabin's best method ahead of every
peer at N >= 8; T with a node killed at 50 % over the fault-free T.
"""

import argparse
import io
import json
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
from kabin.chaincast.order import METHODS

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402 -- bench/peers.py, next to this file

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
    methods = ("chain",)

    def __init__(self, image, verify="written"):
        self.image, self.verify = image, verify
        self.root = Path(tempfile.mkdtemp(prefix="kabin-bench-", dir="/dev/shm"))

    def run(self, count, rate, victim=None, method="chain", max_rate=None):
        names = [f"node-{i}" for i in range(1, count + 1)]
        addresses = {n: f"127.0.72.{i}" for i, n in enumerate(names, 1)}
        job = Broadcast(self.image, LocalLauncher(), addresses.get, lambda n: str(self.root / n),
                        PORTS, Options(max_rate=rate, timeout=3600, stall_timeout=10,
                                       verify=self.verify, method=method))
        if victim:
            job.observer = _kill_at_half(job, victim)
        try:
            return _timed(job, names)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def peers(self, bitrate):
        return []

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
        self.methods = ["chain", "multicast"] + (["bittorrent"] if "bittorrent" in METHODS else [])

    def peers(self, bitrate):
        return peers.all_peers(bitrate)

    def peer(self, run, count, timeout):
        """T of the peer ``run`` (see bench/peers.py) on node-1 .. node-``count``."""
        names = [f"node-{i}" for i in range(1, count + 1)]
        return run(self.testbed, self.image, names, timeout, Path(self.image.path).parent)

    def run(self, count, rate, victim=None, method="chain", max_rate=None):
        from kabin.chaincast import new_broadcast

        names = [f"node-{i}" for i in range(1, count + 1)]
        if victim:  # the testbed crashes it once it has received half the image
            self.testbed.fault(victim, f"die-after-bytes={self.image.size // 2}")
        job = new_broadcast(self.image, self.config, dest=self.DEST,
                            options=Options(timeout=3600, stall_timeout=10, method=method,
                                            max_rate=max_rate, verify=self.verify))
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


def measure(tier, image, counts, rate, serial, label, share=0.95):
    """Every method at each of ``counts`` nodes, shaped at ``rate``: its tables and the faults."""
    ideal = image.size / rate
    print(f"\n== {label}: S = {image.size / MB:.0f} MB, B = {rate * 8 / 1e6:.0f} Mbit/s, "
          f"S/B = {ideal:.1f} s", flush=True)
    if hasattr(tier, "tcp_rate"):
        tcp = tier.tcp_rate(image.size)
        print(f"one plain TCP stream on a shaped link: {tcp * 8 / 1e6:.1f} Mbit/s, "
              f"S/B_tcp = {image.size / tcp:.1f} s", flush=True)
    usage = []
    single = _attempt("serial: one node", lambda: _kabin(tier, 1, rate, "chain", None, usage,
                                                         repeat=serial))
    tables = []
    for n in counts:
        print(f"-- {n} nodes", flush=True)
        rows = _rows(tier, n, rate, share * rate * 8, usage, ideal)
        rows.append(_serial_row(single, n, serial))
        tables.append((n, rows))
        _print_table(n, rows, rate, ideal)
    faults = _faults(tier, counts[-1], rate, dict(tables)[counts[-1]], usage)
    per_mb = [u["cpu"] / (image.size / MB) for u in usage]
    if per_mb:
        print(f"relay CPU: {1000 * statistics.mean(per_mb):.1f} ms per MB (max "
              f"{1000 * max(per_mb):.1f});  relay peak memory: {_peak(usage)}", flush=True)
    return {"rate": rate, "ideal": ideal, "tables": tables, "faults": faults}


def _rows(tier, n, rate, bitrate, usage, ideal):
    """The floor, kabin's methods and the peers at ``n`` nodes: one row each."""
    rows = []
    if hasattr(tier, "floor"):
        rows.append(_attempt("floor (forward only)", lambda: _floor(tier, n), "floor"))
    for method in tier.methods:
        rows.append(_attempt(f"kabin {method}", lambda: _kabin(tier, n, rate, method,
                                                               bitrate / 8, usage), "kabin"))
    for name, peer in tier.peers(bitrate):
        rows.append(_attempt(name, lambda: (tier.peer(peer, n, 4 * ideal + 60), ""), "peer"))
    return rows


def _attempt(method, measure, kind=None):
    """A row: ``measure()``'s (T, note), or T None and the reason it failed; with the
    machine's busy CPU during the run (every process: nodes, kernel, this one)."""
    before = _busy_cpu()
    try:
        t, note = measure()
    except Exception as exc:  # noqa: BLE001 -- a method that fails is a row, not the end
        t, note = None, f"failed: {type(exc).__name__}: {exc}"
    cpu = _busy_cpu() - before
    if t:
        note = f"machine CPU {cpu:.1f} s ({100 * cpu / (t * os.cpu_count()):.0f} % of " \
               f"{os.cpu_count()} CPUs); " + note
    print(f"   {method:<30} {'failed' if t is None else f'{t:6.1f} s'}   {note}", flush=True)
    return {"method": method, "kind": kind, "t": t, "note": note, "cpu": cpu}


def _busy_cpu():
    """CPU seconds this machine has been busy (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:9]]
    return (sum(fields[:3]) + sum(fields[5:8])) / os.sysconf("SC_CLK_TCK")


def _floor(tier, n):
    started, stream = tier.floor(n)
    return started + stream, f"start {started:.2f} s + stream {stream:.2f} s"


def _kabin(tier, n, rate, method, max_rate, usage, victim=None, repeat=1):
    """Mean T of ``repeat`` kabin broadcasts to ``n`` nodes (multicast: at ``max_rate``)."""
    times = []
    for _ in range(repeat):
        t, results, used, startup = tier.run(n, rate, victim, method,
                                             max_rate if method == "multicast" else None)
        usage += used
        bad = [(r["node"], r.get("error")) for r in results
               if r["status"] != "ok" and r["node"] != victim]
        if bad or len(results) < n:
            raise RuntimeError(f"not all OK: {bad or f'{len(results)} records of {n}'}")
        times.append(t)
    ko = [r["node"] for r in results if r["status"] != "ok"]
    note = f"agents up in {startup:.1f} s, relay peak {_peak(used)}"
    return statistics.mean(times), note + (f", KO: {ko}" if victim else "")


def _serial_row(single, n, measured):
    row = dict(single, method="serial unicast", kind="peer")
    if single["t"] is not None:
        row["t"], row["note"] = single["t"] * n, f"kabin to one node x{n} ({measured} measured)"
    return row


def _faults(tier, n, rate, rows, usage):
    """T with node n/2 killed at 50 % of the image, over the fault-free T (chain, bittorrent)."""
    victim, out = f"node-{n // 2}", []
    for method in [m for m in tier.methods if m in ("chain", "bittorrent")]:
        free = next(r["t"] for r in rows if r["method"] == f"kabin {method}")
        row = _attempt(f"kabin {method}, {victim} killed at 50 %",
                       lambda: _kabin(tier, n, rate, method, None, usage, victim), "fault")
        out.append(dict(row, n=n, ratio=row["t"] / free if row["t"] and free else None))
    return out


def _peak(usage):
    peaks = [u["peak_mb"] for u in usage if "peak_mb" in u]
    return f"{max(peaks):.0f} MB" if peaks else "?"


def _print_table(n, rows, rate, ideal):
    print(f"\n{n} nodes at {rate * 8 / 1e6:.0f} Mbit/s (S/B = {ideal:.1f} s)\n"
          f"  {'method':<34} {'T (s)':>7} {'T/floor':>8} {'T/(S/B)':>8}  note", flush=True)
    floor = _t(rows, "floor (forward only)")
    for row in rows:
        t = row["t"]
        cells = ("failed", "", "") if t is None else (
            f"{t:.1f}", f"{t / floor:.2f}" if floor else "-", f"{t / ideal:.2f}")
        print(f"  {row['method']:<34} {cells[0]:>7} {cells[1]:>8} {cells[2]:>8}  "
              f"{row['note'][:160]}", flush=True)


def _t(rows, method):
    return next((r["t"] for r in rows if r["method"] == method), None)


def report(results):
    """Every table again, then the issue's targets as ratios."""
    print("\n== Summary", flush=True)
    tables = {}
    for result in results:
        for n, rows in result["tables"]:
            _print_table(n, rows, result["rate"], result["ideal"])
            tables[n] = rows
    print("\nTargets (issue 17):")
    for n, target in ((16, 1.05), (32, 1.08)):
        rows = tables.get(n, [])
        chain, floor = _t(rows, "kabin chain"), _t(rows, "floor (forward only)")
        ratio = f"{chain / floor:.3f}" if chain and floor else "not measured"
        met = "" if not (chain and floor) else (" met" if chain / floor <= target else " MISSED")
        print(f"  kabin chain T({n})/floor = {ratio} (target <= {target}){met}")
    for n, rows in sorted(tables.items()):
        if n >= 8:
            print(f"  {n} nodes: {_ahead(rows)}")
    for result in results:
        for row in result["faults"]:
            ratio = f"{row['ratio']:.2f}" if row["ratio"] else row["note"]
            print(f"  {row['method']} ({row['n']} nodes): T / fault-free = {ratio}")


def _ahead(rows):
    """Whether kabin's best method is ahead of every peer, in words."""
    kabin = [r for r in rows if r["kind"] == "kabin" and r["t"]]
    others = [r for r in rows if r["kind"] == "peer" and r["t"]]
    if not kabin:
        return "no kabin method succeeded"
    best = min(kabin, key=lambda r: r["t"])
    rival = min(others, key=lambda r: r["t"]) if others else None
    if rival is None:
        return f"best kabin {best['method']} {best['t']:.1f} s, no peer succeeded"
    verdict = "ahead of every peer" if best["t"] < rival["t"] else "NOT ahead of every peer"
    return (f"best kabin ({best['method']}, {best['t']:.1f} s) {verdict}: best peer "
            f"{rival['method']} {rival['t']:.1f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tier", choices=["netns", "loopback"], default="netns")
    parser.add_argument("--size-mb", type=int, default=128)
    parser.add_argument("--rate", default="100mbit")
    parser.add_argument("--nodes", default="2,8,16")
    parser.add_argument("--big", type=int, default=32, help="0: skip the big run")
    parser.add_argument("--big-rate", default="40mbit")
    parser.add_argument("--serial", type=int, default=4)
    parser.add_argument("--mcast-share", type=float, default=0.95,
                        help="udp-sender's --max-bitrate (kabin multicast's and udpcast's), "
                             "as a share of the link rate")
    parser.add_argument("--instance", default="h6")
    parser.add_argument("--keep", action="store_true", help="Keep the testbed instance up.")
    parser.add_argument("--verify", choices=["written", "stream"], default="written",
                        help="What the nodes check (ka-chaincast --verify).")
    parser.add_argument("--inside", metavar="IMAGE", help=argparse.SUPPRESS)
    parser.add_argument("--results", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    counts = [int(x) for x in args.nodes.split(",")]
    if args.inside:  # in the frontend's namespace: measure one rate
        image = open_image(args.inside, "tar")
        tier = Netns(image, args.instance, args.verify)
        result = measure(tier, image, counts, parse_rate(args.rate), args.serial,
                         f"netns, links shaped to {args.rate}", args.mcast_share)
        Path(args.results).write_text(json.dumps(result))
        return
    with tempfile.TemporaryDirectory(prefix="kabin-bench-") as tmp:
        image = make_image(tmp, args.size_mb)
        runs = [(counts, args.rate)] + ([([2, args.big], args.big_rate)] if args.big else [])
        if args.tier == "loopback":
            tier = Loopback(image, args.verify)
            try:
                results = [measure(tier, image, nodes, parse_rate(rate), args.serial,
                                   f"loopback, source paced at {rate}") for nodes, rate in runs]
            finally:
                tier.close()
        else:
            results = [netns_run(args, image, nodes, rate, Path(tmp) / f"results{i}.json")
                       for i, (nodes, rate) in enumerate(runs)]
        report(results)


def netns_run(args, image, counts, rate, results):
    """Bring up the netns tier shaped at ``rate``, measure inside its frontend, bring it down;
    what was measured (measure's result)."""
    from kabin.testbed.instance import Testbed, exec_argv

    testbed = Testbed(args.instance)
    testbed.up(max(counts), netns=True, link_rate=rate)
    try:
        argv = [sys.executable, __file__, "--inside", str(image.path), "--instance", args.instance,
                "--nodes", ",".join(map(str, counts)), "--rate", rate,
                "--serial", str(args.serial), "--verify", args.verify,
                "--mcast-share", str(args.mcast_share), "--results", str(results)]
        subprocess.run(exec_argv(args.instance, argv), env=testbed.env, check=True)
        return json.loads(results.read_text())
    finally:
        if not args.keep:
            testbed.down()


if __name__ == "__main__":
    main()
