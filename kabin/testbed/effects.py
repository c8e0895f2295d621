"""What the faults do to a running node: its processes, its sockets, its file systems.

A node's processes are found from its launcher (the ``unshare`` the supervisor
started): its child is the node's init, whose children are sshd and the like.
Work on the node's own files runs in its mount namespace (nsenter).
"""

import logging
import os
import re
import signal
import subprocess
from pathlib import Path

from . import disks

log = logging.getLogger(__name__)



def children(pid):
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def init_pid(launcher_pid):
    """The host pid of the node's init (pid 1 of its namespace), or None."""
    kids = children(launcher_pid)
    return kids[0] if kids else None


def sshd_pids(init):
    found = []
    for pid in children(init):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "sshd":
                found.append(pid)
        except OSError:
            continue
    return found


def freeze_sshd(init, frozen):
    """Stop (or resume) the node's sshd listener: connections open, nothing answers."""
    for pid in sshd_pids(init):
        try:
            os.kill(pid, signal.SIGSTOP if frozen else signal.SIGCONT)
        except ProcessLookupError:
            continue


# ---------------------------------------------------------------- bytes received over TCP

def tcp_received(address, netns=None, timeout=5):
    """{(local, peer): bytes received} of the established TCP sockets on ``address``."""
    argv = ["ss", "--tcp", "--info", "--no-header", "--oneline", "state", "established"]
    if netns:
        argv = ["nsenter", f"--net=/run/netns/{netns}"] + argv
    try:
        listing = subprocess.run(argv, capture_output=True, text=True, timeout=timeout).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("ss failed: %s", exc)
        return {}
    counts = {}
    for line in listing.splitlines():
        words = line.split()
        if len(words) < 4 or words[2].rpartition(":")[0] != address:
            continue
        match = re.search(r"\bbytes_received:(\d+)", line)
        counts[(words[2], words[3])] = int(match.group(1)) if match else 0
    return counts


# ---------------------------------------------------------------- full file systems

def disk_full(init, node_dir, on, loop):
    """Fill (or empty) the node's file systems: node/diskfull.sh in its mount namespace,
    or, on a node that does not run, on the host with its loop partitions."""
    script = str(Path(node_dir).parents[1] / "bin" / "diskfull.sh")
    numbers = sorted(disks.partitions(loop))
    if init:
        argv = ["nsenter", "-t", str(init), "--mount", "--pid", "sh", script]
        devices = [f"/dev/sda{n}" for n in numbers]
    else:
        argv = ["sh", script]
        devices = [f"/dev/{loop}p{n}" for n in numbers]
    argv += ["fill"] if on else ["unfill"] + devices
    try:
        subprocess.run(argv, capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("disk-full: %s failed: %s", " ".join(argv), exc)
