"""Benchmark: writing PXE profiles for many nodes.

    python bench/pxe.py [--nodes 1000] [--rounds 5] [--dir /tmp] [--keep]

A temporary configuration (the shipped sample, state in a temporary directory)
with one cluster of N nodes ``n-[1-N]`` at 10.1.X.Y. For each case, the median of
``--rounds`` runs, every file written atomically (temporary file + rename):

  - library, ``set deploy`` (one file per node, PXELINUX, ip_hex naming);
  - library, ``set local`` chainloaded from iPXE to PXELINUX (two files per node);
  - the whole command ``ka-pxe set deploy -m n-[1-N]`` (process start, configuration
    loading and JSON output included), output to /dev/null.

Reported: seconds per run, microseconds and profiles per second. The cost is mostly
the file system's (one create and one rename per file): compare ``--dir /dev/shm``
(tmpfs) with a disk.
"""

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from kabin import config as config_mod
from kabin import paths, pxe


def make_config(base, count, pxe_conf):
    confdir = base / f"etc-{pxe_conf['method']}-{pxe_conf.get('local_method', '')}"
    shutil.copytree(paths.sample_config_dir(), confdir)
    server = yaml.safe_load((confdir / "server.yml").read_text())
    server["paths"]["state_dir"] = str(base / "state")
    (confdir / "server.yml").write_text(yaml.safe_dump(server))
    cluster = yaml.safe_load((confdir / "cluster-local.yml").read_text())
    cluster.pop("topology")
    cluster["pxe"] = pxe_conf
    (confdir / "cluster-local.yml").write_text(yaml.safe_dump(cluster))
    addresses = [f"10.1.{i // 250}.{i % 250 + 1}" for i in range(count)]
    clusters = {"clusters": [{"name": "local", "file": "cluster-local.yml",
                              "nodes": [{"names": f"n-[1-{count}]", "address": addresses}]}]}
    (confdir / "clusters.yml").write_text(yaml.safe_dump(clusters))
    config = config_mod.Config(confdir)
    kernels = config.server.pxe_root / "kernels"
    kernels.mkdir(parents=True, exist_ok=True)
    for name in ("deploy-vmlinuz", "deploy-initrd.img"):
        (kernels / name).touch()
    return config


def time_library(config, request, count, rounds):
    items = [{"node": f"n-{i}", "status": "ok"} for i in range(1, count + 1)]
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        out = list(pxe.set_profiles(config, request, items))
        times.append(time.perf_counter() - start)
        assert all(r["status"] == "ok" for r in out), out[0]
    return statistics.median(times)


def time_command(config, count, rounds):
    cmd = [sys.executable, "-c", "from kabin.cli.pxe import main; main()", "set", "deploy",
           "-m", f"n-[1-{count}]", "--config", str(config.dir), "--format", "json"]
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=600)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(name, seconds, count, files_per_node):
    print(f"{name:<44} {seconds:8.3f} s  {seconds / count * 1e6:8.1f} us/node  "
          f"{count / seconds:9.0f} nodes/s  ({count * files_per_node} files)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default=None, help="Where the temporary tree goes.")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary directory.")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="kabin-bench-pxe-", dir=args.dir))
    try:
        plain = make_config(base, args.nodes, {"method": "pxelinux", "naming": "ip_hex"})
        chained = make_config(base, args.nodes, {"method": "ipxe", "local_method": "pxelinux",
                                                 "naming": "ip_hex"})
        print(f"{args.nodes} nodes, median of {args.rounds} rounds, tree {base / 'state'}")
        report("library: set deploy (pxelinux)",
               time_library(plain, pxe.Request("deploy"), args.nodes, args.rounds), args.nodes, 1)
        report("library: set local (ipxe -> pxelinux chain)",
               time_library(chained, pxe.Request("local"), args.nodes, args.rounds),
               args.nodes, 2)
        report("command: ka-pxe set deploy -m n-[1-N]",
               time_command(plain, args.nodes, args.rounds), args.nodes, 1)
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base)


if __name__ == "__main__":
    main()
