"""Benchmark: how long the VM tier's machines take to boot, per firmware and PXE method.

    python bench/vm_boot.py [--methods grub,ipxe] [--rounds 2] [--instance vmb]

For each method, brings up a VM-tier instance of two machines (node-1 SeaBIOS,
node-2 OVMF; PXELINUX: one BIOS machine), then times ``--rounds`` power cycles
through IPMI and QMP (``ka-reboot --level hard --wait deploy``, one machine at a
time, so the two never share the CPUs): from the BMC's action to the deployment
environment's ports answering. Reports, per firmware and method, the time of
``up`` (both machines at once), the median cycle, and how it splits: the kernel's
own uptime read over SSH right after (kernel and initramfs up to sshd), and the
rest (the firmware, DHCP, the loader and the TFTP transfers).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

FIRMWARES = {"node-1": "bios", "node-2": "uefi"}


def run(argv, check=True, timeout=900):
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)
    if check and done.returncode != 0:
        sys.exit(f"{' '.join(argv[:6])}...: exit {done.returncode}\n{done.stderr[-2000:]}")
    return done


def in_frontend(instance, *argv):
    return run(["ka-testbed", "exec", "--instance", instance, "--", *argv])


def uptime(instance, address):
    """Seconds the running kernel had been up when asked (its own clock)."""
    done = in_frontend(instance, "ssh", "-i", "/var/lib/kabin/testbed/id_ed25519",
                       "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                       "-o", "LogLevel=ERROR", f"root@{address}", "cat /proc/uptime")
    return float(done.stdout.split()[0])


def measure(instance, method, rounds):
    firmware = "bios" if method == "pxelinux" else "mixed"
    size = 1 if method == "pxelinux" else 2
    run(["ka-testbed", "down", "--instance", instance], check=False)
    start = time.monotonic()
    run(["ka-testbed", "up", "--vm", "-n", str(size), "--firmware", firmware,
         "--pxe-method", method, "--instance", instance, "-q"])
    up_time = time.monotonic() - start
    listing = run(["ka-testbed", "status", "--instance", instance, "--format", "json"])
    status = [json.loads(line) for line in listing.stdout.splitlines()]
    rows = []
    for record in status:
        node = record["node"]
        cycles, kernel_part = [], []
        for _ in range(rounds):
            begin = time.monotonic()
            in_frontend(instance, "ka-reboot", "-m", node, "--level", "hard", "--wait",
                        "deploy", "-q")
            cycles.append(time.monotonic() - begin)
            kernel_part.append(uptime(instance, record["address"]))
        rows.append({"method": method, "firmware": FIRMWARES[node], "up": up_time,
                     "cycle": statistics.median(cycles),
                     "kernel_to_ssh": statistics.median(kernel_part)})
    run(["ka-testbed", "down", "--instance", instance], check=False)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="grub,ipxe,pxelinux")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--instance", default="vmb")
    args = parser.parse_args()
    print(f"{'method':9} {'firmware':8} {'up (2 VMs)':>10} {'power cycle':>11} "
          f"{'kernel->ssh':>11} {'firmware+loader':>15}")
    for method in args.methods.split(","):
        for row in measure(args.instance, method, args.rounds):
            print(f"{row['method']:9} {row['firmware']:8} {row['up']:9.1f}s "
                  f"{row['cycle']:10.1f}s {row['kernel_to_ssh']:10.1f}s "
                  f"{row['cycle'] - row['kernel_to_ssh']:14.1f}s", flush=True)


if __name__ == "__main__":
    main()
