"""A cluster's disk layout: the ``partitioning`` section of its file, and partition names.

``partitions`` numbers the roles (esp, swap, prod, deploy, tmp); with ``sizes``,
partition.sh creates exactly that table (``label`` dos or gpt) from
``Partitioning.layout()``, which kabin exports as KADEPLOY_PARTITIONS.
"""

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Partitioning:
    block_device: str
    partitions: dict
    script: Path | None
    disable_swap: bool
    label: str = "dos"              # dos (MBR) | gpt
    sizes: dict = None              # role -> size (sfdisk's: 64MiB...), the last one may be ""

    def layout(self):
        """'N:role:size' words in partition order (what partition.sh reads), or None."""
        if not self.sizes:
            return None
        numbered = sorted((n, role) for role, n in self.partitions.items() if n is not None)
        return " ".join(f"{n}:{role}:{self.sizes.get(role) or ''}" for n, role in numbered)


PARTITION_ROLES = ("esp", "swap", "prod", "deploy", "tmp")
SIZE = re.compile(r"^\d+(\.\d+)?(KiB|MiB|GiB|TiB|K|M|G|T)?$")


def parse_partitioning(sec, resolve_path):
    """The ``partitioning`` section of a cluster file (``sec``: config's section reader;
    ``resolve_path``: how a relative path in it is read, config's rule)."""
    parts = sec.section("partitions")
    numbers = {k: parts.get(k, int, None) for k in PARTITION_ROLES}
    parts.done()
    if numbers["deploy"] is None:
        raise parts.error("deploy", "is required (the partition number to deploy on)")
    script = sec.get("script", str, None)
    cfg = Partitioning(
        block_device=sec.get("block_device", str, "/dev/sda"),
        partitions=numbers,
        script=resolve_path(script) if script else None,
        disable_swap=sec.get("disable_swap", bool, False),
        label=sec.get("label", str, "dos", ("dos", "gpt")),
        sizes=_sizes(sec, numbers),
    )
    sec.done()
    return cfg


def _sizes(sec, numbers):
    """partitioning.sizes: every numbered partition, numbers 1..N, only the last unsized."""
    sizes = sec.get("sizes", dict, None)
    if sizes is None:
        return None
    used = sorted((n, role) for role, n in numbers.items() if n is not None)
    if [n for n, _ in used] != list(range(1, len(used) + 1)):
        raise sec.error("partitions", "with sizes, the partitions are numbered 1, 2, ... N "
                                      "(partition.sh creates them in that order)")
    for role, size in sizes.items():
        if role not in numbers or numbers[role] is None:
            raise sec.error(f"sizes.{role}", "names no partition of 'partitions'")
        if size not in (None, "rest") and not SIZE.match(str(size)):
            raise sec.error(f"sizes.{role}", f"expected a size such as 64MiB or 2GiB, or "
                                             f"'rest', not {size!r}")
    unsized = [role for _, role in used if sizes.get(role) in (None, "rest")]
    if unsized and unsized != [used[-1][1]]:
        raise sec.error("sizes", f"every partition but the last needs a size "
                                 f"({', '.join(unsized)} have none)")
    return {role: "" if sizes.get(role) in (None, "rest") else str(sizes[role])
            for _, role in used}


def partition_device(block_device, number):
    """/dev/sda + 3 -> /dev/sda3; /dev/nvme0n1 + 3 -> /dev/nvme0n1p3."""
    separator = "p" if block_device[-1:].isdigit() else ""
    return f"{block_device}{separator}{number}"
