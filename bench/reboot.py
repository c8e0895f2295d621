"""Benchmark: ka-reboot on a testbed instance: power status, and reboots under windows.

    python bench/reboot.py [--instance h5] [--nodes 200] [--reboot-nodes 100]
                           [--window 25] [--sleep 2] [--level hard] [--rounds 3]
                           [--no-up] [--keep]

Brings up a testbed instance of ``--nodes`` nodes and measures, in one run:

  - ``ka-reboot power status`` on every node's BMC (whole command, median of
    ``--rounds``). Target (issue 4): <= 5 s for 200 BMCs.
  - ``ka-reboot --level LEVEL --wait any`` of one node (median of ``--rounds``):
    the time one reboot takes, t1.
  - the same on ``--reboot-nodes`` nodes with reboot windows of ``--window``
    nodes every ``--sleep`` s (a copy of the instance's configuration with these
    windows). Its lower bound is the window schedule's (the last group cannot
    start before (ceil(n / size) - 1) * sleep) plus t1. Reported: time, bound,
    ratio; and, from the BMC journal (hard levels), the actions grouped in time
    beside the window schedule.

Always runs ``ka-testbed down --instance NAME`` at the end unless --keep.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

STATE = Path("/var/lib/kabin/testbed")


def run(argv, env=None, check=True, timeout=900):
    done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)
    if check and done.returncode != 0:
        sys.exit(f"{' '.join(argv[:4])}...: exit {done.returncode}\n{done.stderr[-3000:]}")
    return done


def timed(argv, env):
    start = time.monotonic()
    done = run(argv, env)
    return time.monotonic() - start, [json.loads(line) for line in done.stdout.splitlines()]


def windowed_config(source, directory, size, sleep):
    """A copy of the instance's configuration with other reboot windows."""
    target = Path(directory) / "config"
    shutil.copytree(source, target)
    server = yaml.safe_load((target / "server.yml").read_text())
    server.setdefault("windows", {})["reboot"] = {"size": size, "sleep_time": sleep}
    (target / "server.yml").write_text(yaml.safe_dump(server, sort_keys=False))
    return target


def journal_groups(journal, since, nodes):
    """BMC actions on ``nodes`` after ``since``, grouped: [(start relative to the first, count)].

    A group is a run of actions less than 0.5 s apart.
    """
    starts = sorted(e["time"] for e in map(json.loads, Path(journal).read_text().splitlines())
                    if e["time"] >= since and e["node"] in nodes and e["action"] != "bootdev")
    groups = []
    for t in starts:
        if groups and t - groups[-1][2] < 0.5:
            groups[-1][1] += 1
            groups[-1][2] = t
        else:
            groups.append([t, 1, t])
    return [(start - starts[0], count) for start, count, _ in groups]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instance", default="h5")
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--reboot-nodes", type=int, default=100)
    parser.add_argument("--window", type=int, default=25)
    parser.add_argument("--sleep", type=float, default=2.0)
    parser.add_argument("--level", default="hard")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-up", action="store_true", help="The instance is up already.")
    parser.add_argument("--keep", action="store_true", help="Leave the instance up.")
    args = parser.parse_args()
    if not args.no_up:
        run(["ka-testbed", "up", "-n", str(args.nodes), "--instance", args.instance])
    try:
        bench(args)
    finally:
        if not args.keep:
            run(["ka-testbed", "down", "--instance", args.instance], check=False)


def bench(args):
    from kabin import config, nodes, reboot

    source = STATE / args.instance / "config"
    cfg = config.Config(source)
    names = sorted(cfg.nodes, key=lambda n: int(n.rsplit("-", 1)[1]))
    env = dict(os.environ, KABIN_CONFIG=str(source))
    everyone = nodes.fold(names[:args.nodes])
    status = [timed(["ka-reboot", "power", "status", "-m", everyone, "-q"], env)
              for _ in range(args.rounds)]
    assert all(r["status"] == "ok" for _, out in status for r in out), "a power status failed"
    status_time = statistics.median(t for t, _ in status)

    one = [timed(["ka-reboot", "-m", names[0], "--level", args.level, "--wait", "any", "-q"],
                 env)[0] for _ in range(args.rounds)]
    t1 = statistics.median(one)

    with tempfile.TemporaryDirectory(prefix="kabin-bench-reboot-") as tmp:
        windowed = windowed_config(source, tmp, args.window, args.sleep)
        env_w = dict(env, KABIN_CONFIG=str(windowed))
        group = names[:args.reboot_nodes]
        since = time.time()
        total, out = timed(["ka-reboot", "-m", nodes.fold(group), "--level", args.level,
                            "--wait", "any", "-q"], env_w)
    ko = [r["node"] for r in out if r["status"] != "ok"]
    schedule = reboot.schedule_lower_bound(len(group), args.window, args.sleep)
    bound = schedule + t1
    journal = STATE / args.instance / "bmc.log"
    groups = journal_groups(journal, since, set(group)) if journal.exists() else []

    print(f"power status, {args.nodes} BMCs: {status_time:.2f} s (median of {args.rounds}; "
          f"target <= 5 s: {'met' if status_time <= 5 else 'NOT met'})")
    print(f"reboot --level {args.level} of 1 node: t1 = {t1:.2f} s (median of {args.rounds})")
    print(f"reboot --level {args.level} of {len(group)} nodes, windows {args.window} nodes / "
          f"{args.sleep:g} s: {total:.2f} s; lower bound {bound:.2f} s "
          f"(schedule {schedule:.2f} s + t1); ratio {total / bound:.2f}; KO: {len(ko)}")
    if groups:
        print(f"BMC journal: {sum(c for _, c in groups)} actions in {len(groups)} groups "
              f"(start s, actions): " + ", ".join(f"({s:.2f}, {c})" for s, c in groups)
              + f"; the schedule: {reboot.window_schedule(len(group), args.window, args.sleep)}")


if __name__ == "__main__":
    main()
