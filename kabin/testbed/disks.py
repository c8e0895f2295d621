"""The nodes' disks: sparse files on loop devices, with real partitions.

This kernel does not scan loop devices for partitions (no partition parsers),
so ``partx -a`` tells it about them: /dev/loopN gets /dev/loopNpK, which the
node sees as /dev/sda and /dev/sdaK (device nodes in its own /dev).
"""

import logging
import os
import subprocess
from pathlib import Path

from ..errors import SystemRequirementError

log = logging.getLogger(__name__)

SECTOR = 512
TIMEOUT = 60


def _run(argv, check=True, **kwargs):
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)
    except FileNotFoundError:
        raise SystemRequirementError(f"{argv[0]} is missing (package util-linux or fdisk)") \
            from None
    except subprocess.TimeoutExpired:
        raise SystemRequirementError(f"{' '.join(argv)} did not finish in {TIMEOUT} s") from None
    if check and done.returncode != 0:
        raise SystemRequirementError(f"{' '.join(map(str, argv))} failed: "
                                     f"{done.stderr.strip() or done.returncode}")
    return done


def make_template(path, size, partition_script):
    """A sparse disk image partitioned by the cluster's own partition script."""
    with open(path, "wb") as handle:
        handle.truncate(size)
    env = dict(os.environ, KADEPLOY_BLOCK_DEVICE=str(path))
    _run(["sh", str(partition_script)], env=env)


def make_disk(path, template):
    """A node's disk: a sparse copy of the template (only its partition table is data)."""
    size = os.path.getsize(template)
    with open(template, "rb") as source:
        table = source.read(SECTOR)
    with open(path, "wb") as handle:
        handle.write(table)
        handle.truncate(size)


def attach(path):
    """Put the image on a free loop device and add its partitions; the device's name."""
    device = _run(["losetup", "--find", "--show", str(path)]).stdout.strip()
    try:
        _run(["partx", "--add", device])
    except SystemRequirementError:
        detach(Path(device).name)
        raise
    return Path(device).name


def detach(loop):
    """Drop the partitions of /dev/``loop`` and free it (a no-op if it is gone)."""
    device = f"/dev/{loop}"
    _run(["partx", "--delete", device], check=False)
    done = _run(["losetup", "--detach", device], check=False)
    if done.returncode != 0:
        log.warning("cannot detach %s: %s", device, done.stderr.strip())


def loops_under(directory):
    """{loop name: backing file} of the loop devices whose image is in ``directory``."""
    listing = _run(["losetup", "--list", "--noheadings", "--raw", "--output", "NAME,BACK-FILE"],
                   check=False).stdout
    prefix = str(directory).rstrip("/") + "/"
    found = {}
    for line in listing.splitlines():
        name, _, backing = line.partition(" ")
        backing = backing.strip().replace(" (deleted)", "")
        if backing.startswith(prefix):
            found[Path(name).name] = backing
    return found


def device_number(loop):
    """(major, minor) of /dev/``loop``."""
    major, minor = Path(f"/sys/block/{loop}/dev").read_text().strip().split(":")
    return int(major), int(minor)


def partitions(loop):
    """{partition number: (major, minor)} as the kernel knows them now."""
    found = {}
    for entry in Path(f"/sys/block/{loop}").glob(f"{loop}p*"):
        try:
            major, minor = (entry / "dev").read_text().strip().split(":")
        except OSError:
            continue
        found[int(entry.name[len(loop) + 1:])] = (int(major), int(minor))
    return found


def active_partition(loop):
    """The partition the MBR's boot code starts (the active one), or None."""
    try:
        with open(f"/dev/{loop}", "rb") as handle:
            mbr = handle.read(SECTOR)
    except OSError:
        return None
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        return None
    for number in range(4):
        entry = mbr[446 + 16 * number: 446 + 16 * (number + 1)]
        if entry[0] == 0x80 and entry[4] != 0:
            return number + 1
    return None


def find_partition(loop, tag):
    """The partition of /dev/``loop`` whose file system has ``tag`` (UUID=..., LABEL=...)."""
    for number in sorted(partitions(loop)):
        done = _run(["blkid", "--match-token", tag, f"/dev/{loop}p{number}"], check=False)
        if done.returncode == 0:
            return number
    return None
