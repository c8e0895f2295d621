"""The netboot kernel cache: environments' kernels and initrds copied into the PXE tree.

A file is stored once by content, as ``kabin-cache/<sha256 prefix>-<basename>``
under pxe_root, so every node booting the same kernel names the same file and a
changed kernel never overwrites one a node may be reading. The cache is bounded by
``server.pxe_cache_size``: past the bound the least recently used files go first,
never one that a profile in the tree still names or that this run added.
"""

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path

from ..errors import SystemRequirementError
from .naming import METHOD_FILES

log = logging.getLogger(__name__)

CACHE_DIR = "kabin-cache"
_CHUNK = 1 << 20
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
_REFERENCE = re.compile(re.escape(CACHE_DIR) + r"/([A-Za-z0-9._+-]+)")


class KernelCache:
    def __init__(self, pxe_root, size_bound):
        self.root = Path(pxe_root)
        self.dir = self.root / CACHE_DIR
        self.bound = size_bound
        self.added = set()

    def add_stream(self, stream, basename):
        """Store what ``stream`` holds; return its path relative to pxe_root."""
        try:
            name = self._store(stream, basename)
        except OSError as exc:
            raise SystemRequirementError(f"cannot store {basename} in {self.dir}: "
                                         f"{exc.strerror or exc}") from None
        self.added.add(name)
        self._evict()
        return f"{CACHE_DIR}/{name}"

    def add_file(self, path):
        path = Path(path)
        try:
            with open(path, "rb") as stream:
                return self.add_stream(stream, path.name)
        except OSError as exc:
            raise SystemRequirementError(f"cannot read {path}: {exc.strerror}") from None

    def _store(self, stream, basename):
        self.dir.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".ka-pxe-")
        try:
            with os.fdopen(fd, "wb") as out:
                os.fchmod(out.fileno(), 0o644)  # the TFTP server reads it as another user
                while chunk := stream.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            name = f"{digest.hexdigest()[:24]}-{_UNSAFE.sub('_', basename)}"
            final = self.dir / name
            if final.exists():
                os.unlink(tmp)
                os.utime(final)  # recently used
            else:
                os.replace(tmp, final)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        log.debug("cached %s as %s", basename, name)
        return name

    def _evict(self):
        entries = []
        for path in self.dir.iterdir():
            if not path.name.startswith("."):
                stat = path.stat()
                entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        if total <= self.bound:
            return
        keep = self.added | referenced(self.root)
        for _, size, path in sorted(entries):
            if total <= self.bound:
                break
            if path.name not in keep:
                path.unlink(missing_ok=True)
                total -= size
                log.info("PXE cache: evicted %s (%d bytes)", path.name, size)
        if total > self.bound:
            log.warning("the PXE kernel cache holds %d MiB, above its bound of %d MiB: every "
                        "file left is in use (raise paths.pxe_cache_size_mb)",
                        total >> 20, self.bound >> 20)


def referenced(pxe_root):
    """The names of the cache files the profiles in the tree name."""
    names = set()
    for pattern in METHOD_FILES.values():
        directory, _, prefix = pattern.rpartition("/")
        folder = Path(pxe_root) / directory
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.name.startswith(prefix.replace("{}", "")) and path.is_file():
                names.update(_REFERENCE.findall(path.read_text(encoding="utf-8",
                                                               errors="replace")))
    return names
