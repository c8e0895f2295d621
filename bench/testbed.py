"""Benchmark: ka-testbed up and down: time, memory per node, scale.

    python bench/testbed.py [--instance bt] [--nodes 100] [--scale 500]
                            [--netns-nodes 100] [--skip-scale] [--skip-netns]

Measures, each on a fresh instance brought down at the end:

  - ``ka-testbed up -n NODES`` (loopback tier): wall time until every node has
    booted (target, issue 3: <= 10 s for 100), then ``down``'s time;
  - memory per node: the PSS of the instance's node processes (launcher,
    init, sshd) divided by the nodes, the supervisor's RSS (BMCs included), and
    the drop of MemAvailable (what the kernel adds: namespaces, loop devices);
  - ``up -n SCALE`` (500 fit): time, and every node's sshd answers (its banner);
  - ``up -n NETNS --netns`` (target <= 30 s for 100), then ``down``.
"""

import argparse
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kabin.testbed.layout import Layout

STATE = Path("/var/lib/kabin/testbed")


def run(argv, timeout=1800):
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return done


def timed(argv):
    start = time.monotonic()
    run(argv)
    return time.monotonic() - start


def mem_available():
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def memory(instance):
    """(PSS of the node processes, RSS of the supervisor), bytes."""
    directory = str(STATE / instance).encode()
    nodes = supervisor = 0
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
            if not any(w == directory or w.startswith(directory + b"/")
                       for w in argv.replace(b" ", b"\0").split(b"\0")):
                continue
            rollup = (entry / "smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in rollup[1:]}
        if b"kabin.testbed.supervisor" in argv:
            supervisor += fields.get("Rss", 0)
        else:
            nodes += fields.get("Pss", 0)
    return nodes, supervisor


def banner(address):
    with socket.create_connection((address, 22), timeout=30) as sock:
        return sock.recv(64).startswith(b"SSH-2.0")


def all_answer(instance, size):
    state = json.loads((STATE / instance / "testbed.json").read_text())
    lay = Layout(instance, state["slot"], size, state["netns"])
    with ThreadPoolExecutor(64) as pool:
        return sum(pool.map(banner, (lay.node_address(i) for i in range(size))))


def up_down(instance, size, netns=False, check_all=False):
    before = mem_available()
    argv = ["ka-testbed", "up", "-q", "--instance", instance, "-n", str(size)]
    up_time = timed(argv + (["--netns"] if netns else []))
    nodes_mem, supervisor_mem = memory(instance)
    drop = before - mem_available()
    answering = all_answer(instance, size) if check_all and not netns else None
    down_time = timed(["ka-testbed", "down", "--instance", instance])
    tier = "netns" if netns else "loopback"
    print(f"{tier:8} n={size:4}  up {up_time:6.1f} s  down {down_time:5.1f} s  "
          f"node processes {nodes_mem / size / 2**20:5.2f} MiB/node (PSS)  "
          f"supervisor {supervisor_mem / 2**20:6.1f} MiB (RSS)  "
          f"MemAvailable -{drop / size / 2**20:5.2f} MiB/node"
          + (f"  sshd answering {answering}/{size}" if answering is not None else ""),
          flush=True)
    return up_time


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instance", default="bench-testbed")
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--scale", type=int, default=500)
    parser.add_argument("--netns-nodes", type=int, default=100)
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--skip-netns", action="store_true")
    args = parser.parse_args()
    up_time = up_down(args.instance, args.nodes)
    print(f"target up -n {args.nodes} <= 10 s: {'met' if up_time <= 10 else 'MISSED'}")
    if not args.skip_scale:
        up_down(args.instance, args.scale, check_all=True)
    if not args.skip_netns:
        up_time = up_down(args.instance, args.netns_nodes, netns=True)
        print(f"target up -n {args.netns_nodes} --netns <= 30 s: "
              f"{'met' if up_time <= 30 else 'MISSED'}")


if __name__ == "__main__":
    main()
