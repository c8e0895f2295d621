"""Benchmark: kadeploy onto the VM tier, time per macro-step, for 2 and 4 machines.

    python bench/deploy_vm.py [--sizes 2,4] [--firmware mixed] [--env realenv-tzst]
                              [--no-kexec] [--instance vmd]

For each size, brings up a VM-tier instance (QEMU under TCG: the machines share
this host's 2 CPUs, so the times grow with their number where real servers'
would not), builds the real test environments (``mkenv --real``), runs one
kadeploy and reports, from the records, the slowest node's time in each
macro-step (SetDeploymentEnv, BroadcastEnv, BootNewEnv) and the whole run.
Each instance is brought down at the end.
"""

import argparse
import json
import subprocess
import sys
import time

MACROS = ("SetDeploymentEnv", "BroadcastEnv", "BootNewEnv")


def run(argv, timeout=1800, check=True):
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)
    if check and done.returncode not in (0, 1):
        sys.exit(f"{' '.join(argv[:6])}...: exit {done.returncode}\n{done.stderr[-2000:]}")
    return done


def measure(instance, size, firmware, env, no_kexec):
    run(["ka-testbed", "down", "--instance", instance], check=False)
    start = time.monotonic()
    run(["ka-testbed", "up", "--vm", "-n", str(size), "--firmware", firmware,
         "--instance", instance, "-q"])
    up = time.monotonic() - start
    run(["ka-testbed", "mkenv", "--real", "--instance", instance, "-q"])
    argv = ["ka-testbed", "exec", "--instance", instance, "--", "kadeploy", "-e", env,
            "-m", f"node-[1-{size}]", "--format", "json"] + (["--no-kexec"] if no_kexec else [])
    start = time.monotonic()
    done = run(argv)
    total = time.monotonic() - start
    records = [json.loads(line) for line in done.stdout.splitlines()]
    steps = {m: max((h["time"] for r in records for h in r["history"] if h["step"] == m),
                    default=0.0) for m in MACROS}
    ok = sum(r["status"] == "ok" for r in records)
    variants = sorted({r.get("variant", {}).get("BootNewEnv", "-") for r in records})
    run(["ka-testbed", "down", "--instance", instance], check=False)
    return {"size": size, "up": up, "total": total, "ok": ok, "boot": ",".join(variants),
            **steps}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2,4")
    parser.add_argument("--firmware", default="mixed", choices=["bios", "uefi", "mixed"])
    parser.add_argument("--env", default="realenv-tzst")
    parser.add_argument("--no-kexec", action="store_true")
    parser.add_argument("--instance", default="vmd")
    args = parser.parse_args()
    print(f"{'VMs':>3} {'up':>6} {'SetDeploymentEnv':>17} {'BroadcastEnv':>13} "
          f"{'BootNewEnv':>11} {'kadeploy':>9}  ok  BootNewEnv variant")
    for size in map(int, args.sizes.split(",")):
        row = measure(args.instance, size, args.firmware, args.env, args.no_kexec)
        print(f"{row['size']:3d} {row['up']:5.1f}s {row['SetDeploymentEnv']:16.1f}s "
              f"{row['BroadcastEnv']:12.1f}s {row['BootNewEnv']:10.1f}s {row['total']:8.1f}s "
              f"{row['ok']:3d}  {row['boot']}", flush=True)


if __name__ == "__main__":
    main()
