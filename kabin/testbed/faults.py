"""The faults a testbed node can be given (``ka-testbed fault NODE KIND``).

=====================  ==============================================================
never-returns          the node does not come back from its next boots
returns-on-boot=N      boots 1 .. N-1 after the fault was set hang; boot N comes back
ssh-dead               the node runs but its sshd is frozen (SIGSTOP): connections
                       open, no SSH banner ever comes (clear: it resumes)
bmc-dead               its BMC answers nothing
bmc-lies               its BMC answers "done" to power actions but does nothing
die-after-bytes=SIZE   the node crashes (all its processes die, it stays powered on,
                       hung) once it has received SIZE bytes over TCP since the
                       fault was set or since it booted: the sum of the
                       ``bytes_received`` of its TCP sockets (``ss``, read every
                       0.05 s, so it may overshoot by what arrives in that time)
disk-full              every file system of its disk mounted read-write is filled
                       (a hidden ``.kabin-disk-full`` file takes every free block):
                       writes fail with ENOSPC. Those mounted when the fault is set,
                       and those 'mount' mounts afterwards, before it returns
                       (node/mount.sh; not /usr/bin/mount called by its path).
                       Clear: the files go
slow-link=RATE         its link is shaped to RATE both ways (netns tier only)
firmware-hang          (VM tier) the machine's firmware finds no boot device at its
                       next boots and waits there
link-down              (VM tier) its NIC loses its carrier
disk-removed           (VM tier) its disk is pulled: every I/O fails; clear: it is
                       plugged back, with what it held
=====================  ==============================================================

A fault stays until cleared (``ka-testbed fault NODE clear``).
"""

from dataclasses import dataclass

from ..errors import UsageError
from . import units

# kind -> parser of its value (None: the kind takes no value)
KINDS = {
    "never-returns": None,
    "returns-on-boot": int,
    "ssh-dead": None,
    "bmc-dead": None,
    "bmc-lies": None,
    "die-after-bytes": units.parse_size,
    "disk-full": None,
    "slow-link": units.parse_rate,
    "firmware-hang": None,
    "link-down": None,
    "disk-removed": None,
}


@dataclass(frozen=True)
class Fault:
    kind: str
    value: object = None
    text: str = ""           # as given, e.g. "die-after-bytes=16M"


def parse(text):
    """``"die-after-bytes=16M"`` -> Fault; an unknown kind or a bad value is a UsageError."""
    kind, sep, raw = str(text).strip().partition("=")
    if kind not in KINDS:
        raise UsageError(f"unknown fault {kind!r}: expected one of {', '.join(KINDS)}")
    parser = KINDS[kind]
    if parser is None:
        if sep:
            raise UsageError(f"fault {kind} takes no value")
        return Fault(kind, None, kind)
    if not raw:
        raise UsageError(f"fault {kind} needs a value: {kind}=VALUE")
    try:
        value = parser(raw)
    except ValueError:
        raise UsageError(f"fault {kind}: invalid value {raw!r}") from None
    if kind == "returns-on-boot" and value < 1:
        raise UsageError("fault returns-on-boot: N must be at least 1")
    return Fault(kind, value, f"{kind}={raw}")
