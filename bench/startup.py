#!/usr/bin/env python3
"""Start-up time of every command's --help (target <= 0.3 s), beside a bare interpreter.

    python3 bench/startup.py [--runs 7]

Reports the median wall time per command and its ratio to `python3 -c pass`
measured in the same run (the machine is shared and noisy: compare ratios).
"""

import argparse
import shutil
import statistics
import subprocess
import sys
import time

COMMANDS = ["ka-pxe", "ka-reboot", "ka-exec", "ka-chaincast", "ka-env", "ka-stats",
            "kadeploy", "ka-testbed"]
TARGET = 0.3


def median_time(argv, runs):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    base = median_time([sys.executable, "-c", "pass"], args.runs)
    print(f"{'command':<14} {'median s':>9} {'x python':>9}  target <= {TARGET} s")
    print(f"{'python3 -c pass':<14} {base:9.3f} {1:9.1f}")
    worst = 0.0
    for name in COMMANDS:
        path = shutil.which(name)
        if not path:
            print(f"{name:<14} not installed")
            continue
        t = median_time([path, "--help"], args.runs)
        worst = max(worst, t)
        print(f"{name:<14} {t:9.3f} {t / base:9.1f}  {'ok' if t <= TARGET else 'SLOW'}")
    print(f"slowest: {worst:.3f} s")


if __name__ == "__main__":
    main()
