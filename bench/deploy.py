#!/usr/bin/env python3
"""Full deployments on the testbed: scaling, time per macro-step, broadcast rate, memory.

    python3 bench/deploy.py [--sizes 4,16,32] [--rate 40mbit] [--image-mb 64] [--loopback 200]

Netns tier, every link shaped to --rate: a --image-mb MB tar.zst environment is
deployed with kadeploy to N nodes for each N; reported: T(N), T(N)/T(smallest),
the share of each macro-step, the broadcast rate against the link rate, and the
frontend's peak RSS (kadeploy under /usr/bin/time). Then --loopback nodes of the
loopback tier in one run (0 to skip). Targets: T(32)/T(4) <= 1.5, RSS <= 200 MB,
no failure at 200 nodes. Needs root; each instance is brought down afterwards.
"""

import argparse
import json
import os
import re
import subprocess
import tempfile
import time

MACROS = ("SetDeploymentEnv", "BroadcastEnv", "BootNewEnv")


def testbed(*args, check=True, **kwargs):
    return subprocess.run(["ka-testbed", *args], check=check, text=True, capture_output=True,
                          **kwargs)


def env_of(instance):
    out = testbed("env", "--instance", instance).stdout
    env = dict(os.environ)
    env.update(re.findall(r"export (\w+)=(\S+)", out))
    return env


def deploy(instance, count, env):
    """Run kadeploy inside the instance's frontend; (seconds, records, peak RSS in MB)."""
    with tempfile.NamedTemporaryFile("r") as rss:
        argv = ["ka-testbed", "exec", "--instance", instance, "--", "/usr/bin/time", "-f", "%M",
                "-o", rss.name, "kadeploy", "-e", "testenv-tzst", "-m", f"node-[1-{count}]",
                "--format", "json", "-q"]
        start = time.monotonic()
        done = subprocess.run(argv, env=env, text=True, capture_output=True, timeout=3600)
        elapsed = time.monotonic() - start
        peak = int(rss.read().strip().splitlines()[-1]) / 1024
    records = [json.loads(line) for line in done.stdout.splitlines()]
    return elapsed, records, peak, done.stderr


def shares(records):
    """Mean seconds per macro-step over the nodes (the successful try of each)."""
    totals = dict.fromkeys(MACROS, 0.0)
    for record in records:
        for entry in record.get("history", []):
            if entry.get("step") in MACROS and "variant" in entry:
                totals[entry["step"]] += entry.get("time", 0.0)
    return {m: t / max(1, len(records)) for m, t in totals.items()}


def broadcast_rate(records, image_bytes):
    times = [h["time"] for r in records for h in r.get("history", [])
             if h.get("step") == "send_environment" and h.get("status") == "ok"]
    return image_bytes * 8 / 1e6 / max(times) if times else 0.0


def run_size(count, args):
    instance = f"benchdeploy{count}"
    testbed("down", "--instance", instance, check=False)
    up = ["up", "--instance", instance, "-n", str(count)]
    if count != args.loopback_run:
        up += ["--netns", "--link-rate", args.rate]
    testbed(*up, "--disk-size", "1G", timeout=900)
    try:
        env = env_of(instance)
        made = json.loads(testbed("mkenv", "--instance", instance, "--only", "testenv-tzst",
                                  "--pad-size", f"{args.image_mb}M", "--format", "json",
                                  env=env, timeout=900).stdout.splitlines()[0])
        elapsed, records, peak, stderr = deploy(instance, count, env)
    finally:
        testbed("down", "--instance", instance, check=False, timeout=600)
    ok = sum(r["status"] == "ok" for r in records)
    if ok != count:
        print(f"  {count - ok} node(s) KO: " + "; ".join(
            f"{r['node']}: {r.get('error')}" for r in records if r["status"] != "ok")[:500])
    return {"n": count, "time": elapsed, "ok": ok, "rss": peak, "shares": shares(records),
            "rate": broadcast_rate(records, made["size"])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4,16,32")
    parser.add_argument("--rate", default="40mbit")
    parser.add_argument("--image-mb", type=int, default=64)
    parser.add_argument("--loopback", type=int, default=200)
    args = parser.parse_args()
    args.loopback_run = args.loopback
    sizes = [int(s) for s in args.sizes.split(",") if s]
    results = [run_size(n, args) for n in sizes]
    base = results[0]["time"] if results else 1
    print(f"netns tier, links {args.rate}, {args.image_mb} MB tar.zst")
    print(f"{'N':>4} {'T s':>7} {'T/T0':>6} {'ok':>4} {'RSS MB':>7} {'Mbit/s':>7}  "
          + "  ".join(f"{m} %" for m in MACROS))
    for r in results:
        total = sum(r["shares"].values()) or 1
        print(f"{r['n']:>4} {r['time']:7.1f} {r['time'] / base:6.2f} {r['ok']:>4} {r['rss']:7.0f} "
              f"{r['rate']:7.1f}  " + "  ".join(f"{100 * r['shares'][m] / total:>{len(m) + 2}.0f}"
                                                 for m in MACROS))
    if args.loopback:
        r = run_size(args.loopback, argparse.Namespace(**{**vars(args), "image_mb": 1}))
        print(f"loopback tier: {r['n']} nodes in {r['time']:.1f} s, {r['ok']} ok, "
              f"frontend peak RSS {r['rss']:.0f} MB")


if __name__ == "__main__":
    main()
