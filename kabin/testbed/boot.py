"""What a testbed node boots: a kexec'd kernel, its boot device, or its PXE profile.

The outcome is a Plan: the deployment environment, the system installed on a
partition of its disk, or nothing (the node hangs, with the reason a console
would show). Kernels are told apart by content: the testbed's deployment kernel
carries ``firmware.DEPLOY_MAGIC``; any other existing file is an environment's
kernel, which boots the system on its ``root=`` partition.
"""

from dataclasses import dataclass
from pathlib import Path

from . import disks, firmware

NETWORK_DEVICES = (None, "network", "pxe", "default")
DISK_DEVICES = ("hd", "disk", "safe")


@dataclass(frozen=True)
class Plan:
    mode: str | None           # "deploy", "system" or None (the node hangs)
    partition: int | None = None
    detail: str = ""


@dataclass(frozen=True)
class Loaded:
    """A kernel loaded with ``kexec -l`` (a copy of it, on the host)."""

    kernel: Path
    cmdline: str
    source: str = ""            # its path on the node


def hang(detail):
    return Plan(None, None, detail)


def plan(loop, pxe_root, http_root, method, name, kexec=None, bootdev=None):
    """The Plan of one boot of the node whose disk is /dev/``loop``."""
    if kexec is not None:
        return _kernel(loop, firmware.Kernel(kexec.kernel, None, kexec.cmdline,
                                             source=f"{kexec.source} (kexec)"))
    if bootdev in DISK_DEVICES:
        return _local(loop, None)
    if bootdev not in NETWORK_DEVICES:
        return hang(f"boot device {bootdev!r}: nothing to boot there")
    outcome = firmware.network_boot(pxe_root, http_root, method, name)
    if isinstance(outcome, firmware.NoBoot):
        return hang(outcome.reason)
    if isinstance(outcome, firmware.LocalBoot):
        return _local(loop, outcome.partition)
    return _kernel(loop, outcome)


def _local(loop, partition):
    if partition is None:
        partition = disks.active_partition(loop)
        if partition is None:
            return hang("local disk: no active partition in the MBR, nothing to boot")
    return _system(loop, partition, f"local disk, partition sda{partition}")


def _system(loop, partition, how):
    if partition not in disks.partitions(loop):
        return hang(f"{how}: the disk has no partition sda{partition}")
    return Plan("system", partition, how)


def _kernel(loop, kernel):
    if kernel.path is None:      # read from the local disk by GRUB
        return _root(loop, kernel, f"kernel {kernel.source} from sda{kernel.partition}")
    if not kernel.path.is_file() or kernel.path.stat().st_size == 0:
        return hang(f"kernel {kernel.source}: not found")
    if kernel.initrd is not None and not kernel.initrd.is_file():
        return hang(f"initrd {kernel.initrd.name}: not found")
    if firmware.is_deploy_kernel(kernel.path):
        return Plan("deploy", None, "the deployment environment")
    return _root(loop, kernel, f"kernel {kernel.source}")


def _root(loop, kernel, how):
    root = firmware.root_of(kernel.cmdline)
    if root is None:
        return hang(f"{how}: no root=/dev/sdaN (or UUID=, LABEL=) in its parameters, "
                    "kernel panic")
    if isinstance(root, str):
        number = disks.find_partition(loop, root)
        if number is None:
            return hang(f"{how}: root={root} is on no partition, kernel panic")
        root = number
    return _system(loop, root, f"{how}, root=/dev/sda{root}")
