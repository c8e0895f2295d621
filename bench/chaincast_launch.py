"""Benchmark: starting ka-chaincast's agents from the frontend (direct) or through a tree.

    python bench/chaincast_launch.py [--nodes 8,32] [--fanout 8] [--repeat 3] [--instance h8]

On the netns tier (one namespace per node, real sshd; brought up, then down unless
--keep), for each N, --repeat times each: a 1 MB image broadcast with
``--launch direct`` and ``--launch tree``. Reported per launch: the time until every
agent is up (the chain is wired then), the whole broadcast, and the frontend's CPU
(this process: paramiko's handshakes, the forwarded agent's signatures), medians.
All nodes share this machine's CPUs: the nodes' own start-up costs (sshd, python, and
with a tree their OpenSSH clients) add up here, where real nodes pay them in parallel.
"""

import argparse
import io
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import zstandard

from kabin import records
from kabin.chaincast import Options, new_broadcast, open_image


def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one(config, image, count, launch, fanout):
    """(agents up, total, frontend CPU) seconds of one broadcast to node-1 .. node-count."""
    job = new_broadcast(image, config, dest="/tmp/bench-launch",
                        options=Options(launch=launch, launch_fanout=fanout, timeout=600))
    start_cpu, start = cpu(), time.monotonic()
    out = list(job.run([records.new(f"node-{i}") for i in range(1, count + 1)]))
    total = time.monotonic() - start
    job.launcher.close()
    bad = [r for r in out if not records.is_ok(r)]
    if bad:
        raise SystemExit(f"{launch} launch: {len(bad)} node(s) KO, e.g. {bad[0]}")
    return job.wired - start, total, cpu() - start_cpu


def inside(args):
    from kabin.testbed.instance import Testbed

    config = Testbed(args.instance).config
    image = open_image(args.inside, "tar")
    print(f"{'N':>4} {'launch':7} {'agents up':>10} {'total':>7} {'frontend CPU':>13}")
    for count in map(int, args.nodes.split(",")):
        for launch in ("direct", "tree"):
            runs = [one(config, image, count, launch, args.fanout) for _ in range(args.repeat)]
            up, total, used = (statistics.median(r[i] for r in runs) for i in range(3))
            print(f"{count:>4} {launch:7} {up:>9.2f}s {total:>6.2f}s {used:>12.2f}s", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="8,32")
    parser.add_argument("--fanout", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--instance", default="h8")
    parser.add_argument("--keep", action="store_true", help="Keep the testbed instance up.")
    parser.add_argument("--inside", metavar="IMAGE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        return inside(args)
    from kabin.testbed.instance import Testbed, exec_argv

    testbed = Testbed(args.instance)
    testbed.up(max(map(int, args.nodes.split(","))), netns=True)
    try:
        with tempfile.TemporaryDirectory(prefix="kabin-bench-") as tmp:
            path = Path(tmp) / "image.tar.zst"
            path.write_bytes(zstandard.ZstdCompressor().compress(_tar(os.urandom(1 << 20))))
            argv = [sys.executable, __file__, "--inside", str(path), "--instance", args.instance,
                    "--nodes", args.nodes, "--fanout", str(args.fanout),
                    "--repeat", str(args.repeat)]
            subprocess.run(exec_argv(args.instance, argv), env=testbed.env, check=True)
    finally:
        if not args.keep:
            testbed.down()


def _tar(data):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        info = tarfile.TarInfo("blob")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return raw.getvalue()


if __name__ == "__main__":
    main()
