"""Benchmark: power status / cycle of N BMCs (default 200) served by kabin.testbed.bmc.

    python bench/power.py [--nodes 200] [--fanout 64] [--rounds 3] [--subnet 127.0.251]

Starts N testbed BMCs in a separate process (SUBNET.1-250, then the next subnet,
port 623: run as root), writes a kabin configuration for them in a temporary directory, then
measures, in the same run:
  - ``ka-reboot power status`` (the whole command, process start included);
  - kabin.power.power_status in-process (library only);
  - ``ipmitool -I lanplus power status`` per BMC, FANOUT at a time (what a
    sysadmin's xargs -P / pdsh loop does);
  - kabin.power.run_power(..., "cycle") (chassis control and read-back);
and the BMC process's memory. Target (issue 4): ka-reboot power status on 200 BMCs <= 5 s.
"""

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

USER, PASSWORD = "admin", "bench-Pw.42"


def bmc_addresses(count, subnet):
    """127.0.S.1-250, then 127.0.S+1.1-250, ... for ``subnet`` 127.0.S."""
    prefix, third = subnet.rsplit(".", 1)
    return [f"{prefix}.{int(third) + i // 250}.{i % 250 + 1}" for i in range(count)]


def serve(count, subnet):
    """The BMC process: bind every BMC, say 'ready', serve until SIGTERM."""
    from kabin.testbed import bmc
    entries = [(address, 623, USER.encode(), PASSWORD.encode(), bmc.MemoryNode(on=True),
                f"n-{i + 1}") for i, address in enumerate(bmc_addresses(count, subnet))]
    farm = bmc.BmcFarm(entries)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    try:
        farm.serve(stop)
    finally:
        farm.close()


def write_config(directory, count, subnet, fanout):
    (directory / "bmc.secret").write_text(PASSWORD + "\n")
    (directory / "server.yml").write_text(yaml.safe_dump({"paths": {"state_dir": str(directory)},
                                                          "fanout": fanout}))
    (directory / "clusters.yml").write_text(yaml.safe_dump({"clusters": [{
        "name": "bench", "file": "cluster-bench.yml",
        "bmc": {"user": USER, "password_file": "bmc.secret", "port": 623},
        "nodes": [{"names": f"n-[1-{count}]", "bmc": bmc_addresses(count, subnet)}]}]}))
    (directory / "cluster-bench.yml").write_text(yaml.safe_dump({
        "partitioning": {"partitions": {"deploy": 3}},
        "boot": {"kernels": {"deploy": {"vmlinuz": "k", "initrd": "i"}}},
        "remoteops": {"reboot": [{"name": "hard", "type": "ipmi", "action": "cycle"}],
                      "power_status": [{"name": "hard", "type": "ipmi", "action": "status"}]},
        "automata": {"SetDeploymentEnv": [{"type": "Untrusted", "timeout": 100}],
                     "BroadcastEnv": [{"type": "Chain", "timeout": 100}],
                     "BootNewEnv": [{"type": "Classical", "timeout": 100}]}}))


def timed(fn):
    start = time.monotonic()
    value = fn()
    return time.monotonic() - start, value


def report(label, seconds, extra=""):
    print(f"{label:<44} median {statistics.median(seconds):6.2f} s  "
          f"(min {min(seconds):.2f}, max {max(seconds):.2f}){extra}", flush=True)


def bench_cli(confdir, count, rounds):
    command = ["ka-reboot", "power", "status", "-m", f"n-[1-{count}]", "--config", str(confdir),
               "--format", "json"]
    times = []
    for _ in range(rounds):
        seconds, result = timed(lambda: subprocess.run(command, check=False, capture_output=True,
                                                       text=True))
        ok = sum(json.loads(line)["status"] == "ok" for line in result.stdout.splitlines())
        if result.returncode != 0 or ok != count:
            sys.exit(f"ka-reboot power status failed ({ok}/{count} OK): {result.stderr[-500:]}")
        times.append(seconds)
    report(f"ka-reboot power status ({count} BMCs)", times)


def bench_library(confdir, count, rounds, fanout):
    from kabin import config, power
    cfg = config.Config(confdir)
    names = sorted(cfg.nodes)
    for action in ("status", "cycle"):
        times = []
        for _ in range(rounds):
            operation = "power_status" if action == "status" else None
            seconds, results = timed(lambda a=action, o=operation: power.run_power(
                cfg, names, a, o, fanout=fanout))
            if not all(r.ok for r in results):
                sys.exit(f"power {action}: {[r.error for r in results if not r.ok][:3]}")
            times.append(seconds)
        report(f"kabin.power {action} + read-back, in-process" if action != "status"
               else "kabin.power.power_status, in-process", times)


def bench_ipmitool(count, rounds, fanout, subnet):
    def status(address):
        return subprocess.run(["ipmitool", "-I", "lanplus", "-H", address, "-U", USER,
                               "-P", PASSWORD, "power", "status"], check=False,
                              capture_output=True).returncode
    times = []
    for _ in range(rounds):
        with ThreadPoolExecutor(fanout) as pool:
            seconds, codes = timed(lambda: list(pool.map(status, bmc_addresses(count, subnet))))
        if any(codes):
            sys.exit(f"ipmitool failed on {sum(map(bool, codes))} BMCs")
        times.append(seconds)
    report(f"ipmitool power status x{count}, {fanout} at once", times)


def rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--fanout", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--subnet", default="127.0.251")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.nodes, args.subnet)
    farm = subprocess.Popen([sys.executable, __file__, "--serve", "--nodes", str(args.nodes),
                             "--subnet", args.subnet], stdout=subprocess.PIPE, text=True)
    try:
        if farm.stdout.readline().strip() != "ready":
            sys.exit("the BMC process did not start")
        print(f"{args.nodes} BMCs in one process: {rss_mb(farm.pid):.1f} MB RSS", flush=True)
        with tempfile.TemporaryDirectory(prefix="kabin-bench-power-") as tmp:
            write_config(Path(tmp), args.nodes, args.subnet, args.fanout)
            bench_cli(tmp, args.nodes, args.rounds)
            bench_library(tmp, args.nodes, args.rounds, args.fanout)
            bench_ipmitool(args.nodes, args.rounds, args.fanout, args.subnet)
        print(f"BMC process after the runs: {rss_mb(farm.pid):.1f} MB RSS")
    finally:
        farm.terminate()
        farm.wait(10)


if __name__ == "__main__":
    main()
