"""A newc cpio archive (what the kernel unpacks as its initramfs), built from host files.

Entries are kept by path and written sorted (parents first), owned by root, with
no timestamps: the same inputs give the same archive. ``binary`` adds an ELF
program with every shared library ``ldd`` names for it.
"""

import os
import re
import stat
import subprocess
from pathlib import Path

from ..errors import SystemRequirementError


class Archive:
    def __init__(self):
        self.entries = {}

    def dir(self, path, mode=0o755):
        path = path.strip("/")
        parent = path.rpartition("/")[0]
        if parent and parent not in self.entries:
            self.dir(parent)
        self.entries[path] = (stat.S_IFDIR | mode, b"", (0, 0))

    def file(self, path, data, mode=0o644):
        path = path.strip("/")
        parent = path.rpartition("/")[0]
        if parent and parent not in self.entries:
            self.dir(parent)
        self.entries[path] = (stat.S_IFREG | mode,
                              data if isinstance(data, bytes) else data.encode(), (0, 0))

    def link(self, path, target):
        self.file(path, target)
        self.entries[path.strip("/")] = (stat.S_IFLNK | 0o777, target.encode(), (0, 0))

    def device(self, path, major, minor, mode=0o600):
        self.entries[path.strip("/")] = (stat.S_IFCHR | mode, b"", (major, minor))

    def host_file(self, source, path=None, mode=None):
        """The content of ``source`` (links followed) at ``path`` (default: the same)."""
        source = Path(source)
        self.file(path or str(source), source.read_bytes(),
                  stat.S_IMODE(source.stat().st_mode) if mode is None else mode)

    def host_tree(self, source, path=None, skip=()):
        """Every file under ``source`` (but the directories named in ``skip``)."""
        source = Path(source)
        for item in sorted(source.rglob("*")):
            rel = item.relative_to(source)
            if rel.parts[0] in skip or item.is_dir():
                continue
            self.host_file(item, f"{path or source}/{rel}")

    def binary(self, source, path=None):
        """An ELF program or library, and every shared library ldd names for it."""
        self.host_file(source, path)
        done = subprocess.run(["ldd", str(source)], capture_output=True, text=True, timeout=60)
        if done.returncode != 0 and "not a dynamic executable" in done.stdout + done.stderr:
            return                                       # static: nothing more to add
        if done.returncode != 0:
            raise SystemRequirementError(f"ldd {source}: {done.stderr.strip()}")
        for line in done.stdout.splitlines():
            match = re.search(r"(/\S+)\s+\(0x", line)
            if match and match.group(1).strip("/") not in self.entries:
                self.host_file(os.path.realpath(match.group(1)), match.group(1), 0o755)

    def bytes(self):
        out = bytearray()
        ordered = sorted(self.entries, key=lambda p: (p.count("/"), p))
        for number, path in enumerate(ordered + ["TRAILER!!!"], 1):
            mode, data, rdev = self.entries.get(path, (0, b"", (0, 0)))
            fields = [number, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1],
                      len(path) + 1, 0]
            out += b"070701" + b"".join(b"%08X" % f for f in fields) + path.encode() + b"\0"
            out += b"\0" * (-len(out) % 4) + data
            out += b"\0" * (-len(out) % 4)
        return bytes(out)
