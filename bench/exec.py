"""Benchmark: ``ka-exec -- true`` beside clush and pdsh on the same testbed nodes.

    python bench/exec.py [--instance h5] [--sizes 50,100,200] [--fanout 64] [--rounds 3]
                         [--no-up] [--keep]

Brings up a testbed instance of max(sizes) nodes (``ka-testbed up -n N --instance
NAME``), writes a temporary ssh_config pointing at its key and addresses (for the
OpenSSH client that clush and pdsh run per node), then, for each size and in the
same run, times the whole commands (process start included):

  - ``ka-exec -m NODES --fanout F -- true``     (paramiko, one process)
  - ``clush -w NODES -f F -o '-F CFG' true``     (one OpenSSH client per node)
  - ``pdsh -R ssh -f F -w NODES true``           (one OpenSSH client per node)

Each figure is the median of ``--rounds`` runs; the tools run in turns within a
round so load drifts hit them alike. Reported as seconds and as ratios
(tool / ka-exec). Target (issue 4): clush / ka-exec >= 3 at 200 nodes.
Always runs ``ka-testbed down --instance NAME`` at the end unless --keep.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STATE = Path("/var/lib/kabin/testbed")


def run(argv, env=None, check=True, timeout=600):
    # stdin from /dev/null: clush forwards a stdin that is not a terminal to every node
    done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)
    if check and done.returncode != 0:
        sys.exit(f"{' '.join(argv[:4])}...: exit {done.returncode}\n{done.stderr[-2000:]}")
    return done


def timed(argv, env=None):
    start = time.monotonic()
    done = run(argv, env, check=False)
    elapsed = time.monotonic() - start
    if done.returncode != 0:
        sys.exit(f"{argv[0]} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return elapsed


def testbed_config(instance):
    from kabin import config
    return config.Config(STATE / instance / "config")


def write_ssh_config(cfg, names, directory):
    """One Host entry per node: its address, the testbed key, no host key checks."""
    key = cfg.server.ssh.key
    lines = []
    for name in names:
        node = cfg.node(name)
        lines += [f"Host {name}", f"  HostName {node.address}", f"  Port {node.ssh_port}",
                  f"  User {cfg.server.ssh.user}", f"  IdentityFile {key}",
                  "  IdentitiesOnly yes", "  StrictHostKeyChecking no",
                  "  UserKnownHostsFile /dev/null", "  LogLevel ERROR", "  BatchMode yes", ""]
    path = Path(directory) / "ssh_config"
    path.write_text("\n".join(lines))
    return path


def commands(nodeset, fanout, config_dir, ssh_config):
    env = dict(os.environ, KABIN_CONFIG=str(config_dir),
               PDSH_SSH_ARGS=f"-F {ssh_config} %h", PDSH_RCMD_TYPE="ssh")
    return env, {
        "ka-exec": ["ka-exec", "-m", nodeset, "--fanout", str(fanout), "-q", "--format", "json",
                    "--", "true"],
        "clush": ["clush", "-w", nodeset, "-f", str(fanout), "-o", f"-F {ssh_config}", "true"],
        "pdsh": ["pdsh", "-R", "ssh", "-f", str(fanout), "-w", nodeset, "true"],
    }


def measure(cfg, config_dir, sizes, fanout, rounds, tmp):
    from kabin import nodes
    names = sorted(cfg.nodes, key=lambda n: int(n.rsplit("-", 1)[1]))
    ssh_config = write_ssh_config(cfg, names, tmp)
    results = {}
    for size in sizes:
        nodeset = nodes.fold(names[:size])
        env, argvs = commands(nodeset, fanout, config_dir, ssh_config)
        times = {tool: [] for tool in argvs}
        for _ in range(rounds):
            for tool, argv in argvs.items():
                times[tool].append(timed(argv, env))
        results[size] = {tool: statistics.median(t) for tool, t in times.items()}
        print(f"{size:4d} nodes: " + "  ".join(f"{tool} {sec:6.2f} s" for tool, sec in
                                              results[size].items()), flush=True)
    return results


def report(results, fanout):
    print(f"\nka-exec -- true vs clush / pdsh (fanout {fanout}, medians; ratio = tool / ka-exec)")
    print("nodes   ka-exec     clush      pdsh  clush/ka   pdsh/ka")
    for size, r in results.items():
        print(f"{size:5d}  {r['ka-exec']:8.2f}  {r['clush']:8.2f}  {r['pdsh']:8.2f}  "
              f"{r['clush'] / r['ka-exec']:8.2f}  {r['pdsh'] / r['ka-exec']:8.2f}")
    largest = results[max(results)]
    ratio = largest["clush"] / largest["ka-exec"]
    print(f"target clush/ka-exec >= 3 at {max(results)} nodes: {ratio:.2f} "
          f"({'met' if ratio >= 3 else 'NOT met'})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instance", default="h5")
    parser.add_argument("--sizes", default="50,100,200")
    parser.add_argument("--fanout", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-up", action="store_true", help="The instance is up already.")
    parser.add_argument("--keep", action="store_true", help="Leave the instance up.")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if not args.no_up:
        run(["ka-testbed", "up", "-n", str(max(sizes)), "--instance", args.instance])
    try:
        cfg = testbed_config(args.instance)
        with tempfile.TemporaryDirectory(prefix="kabin-bench-exec-") as tmp:
            results = measure(cfg, cfg.dir, sizes, args.fanout, args.rounds, tmp)
        report(results, args.fanout)
    finally:
        if not args.keep:
            run(["ka-testbed", "down", "--instance", args.instance], check=False)


if __name__ == "__main__":
    main()
