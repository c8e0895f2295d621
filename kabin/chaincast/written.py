"""What a node wrote, read back from its disk, as one digest the frontend predicts.

The stream's SHA-256 says the node received the image; this says its disk holds
it. After the sink has written and synced, the node drops the written pages
from its cache (``POSIX_FADV_DONTNEED``) and reads them back from the disk:

- dd: the SHA-256 of the bytes written (the decompressed image);
- tar: a tree digest: the SHA-256 of one line per archive entry, sorted by
  name, giving its kind and its content's SHA-256 (files, hard links), its
  target (symlinks) or its device numbers. The node lists what it finds at
  the names it extracted (a missing or changed entry changes the line); the
  frontend computes the same lines from the archive (``expected``);
- a stored file: the SHA-256 of the file (the stream's own).

Ownership, modes and times are not covered: the stream digest and the
extraction's own errors vouch for them. Standard library only: this file is
sent to the nodes with ``sinks.py`` and ``agent.py``.
"""

import os
import stat
import threading

READ = 1 << 20


def entry_name(name):
    """A tar member's name as it lands under the destination ('.' for the root)."""
    return os.path.normpath(name.lstrip("/") or ".")


def tree_digest(lines):
    """The digest of {name: line}: every line, sorted by name."""
    import hashlib  # in the functions: the agent is ready sooner

    digest = hashlib.sha256()
    for name in sorted(lines):
        digest.update(lines[name].encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


def _line(name, kind, detail=""):
    return f"{name}\0{kind}\0{detail}"


# ---------------------------------------------------------------- on the node


def read_back(path, limit=None):
    """SHA-256 of ``path`` (its first ``limit`` bytes) as the disk gives it back, not the cache."""
    return BlockReadBack(path).digest(limit)


class BlockReadBack:
    """The SHA-256 of the bytes written to ``path``, read back while the writing goes on.

    As ``TreeReadBack`` for a dd image: each periodic sync (``sync_and_read``) is
    followed by reading back the bytes written before it began, in order; ``digest``
    reads the rest once the writing has ended and synced.
    """

    def __init__(self, path):
        import hashlib

        self.path, self.sha = path, hashlib.sha256()
        self.offset, self.failed = 0, False

    def sync_and_read(self, sync, written):
        """Run ``sync``, then read back up to what ``written()`` said before it."""
        upto = written()
        sync()
        if not self.failed:
            try:
                self._read(upto)
            except OSError:
                self.failed = True

    def _read(self, upto):
        """Read back from ``offset`` to ``upto`` (None: to the end of the file)."""
        fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            if hasattr(os, "posix_fadvise"):   # length 0: to the end
                os.posix_fadvise(fd, self.offset, 0 if upto is None else upto - self.offset,
                                 os.POSIX_FADV_DONTNEED)
            while upto is None or self.offset < upto:
                want = READ if upto is None else min(READ, upto - self.offset)
                data = os.pread(fd, want, self.offset)
                if not data and upto is None:
                    break
                if not data:
                    raise OSError(f"{self.path}: {upto - self.offset} bytes short of what was "
                                  "written")
                self.sha.update(data)
                self.offset += len(data)
        finally:
            os.close(fd)

    def digest(self, size=None):
        """Read back what is left of the ``size`` bytes written (None: to the end of the
        file); their SHA-256."""
        self.failed = False
        self._read(size)
        return self.sha.hexdigest()


def observed_tree(root, names):
    """The tree digest of what is found under ``root`` at each of ``names``."""
    readback = TreeReadBack(root)
    for name in names:
        readback.extracted(name)
    return readback.digest()


class TreeReadBack:
    """The tree digest of an extraction, read back while it goes on.

    The sink says which names are completely extracted (``extracted``); its periodic
    sync (``sync_and_read``) reads back, once the disk has them, those extracted before
    the sync began: the reading overlaps the stream instead of following it, and only
    the last second's names are left to ``digest``. A name extracted again later is
    read again then (the later line wins). A read that fails leaves its names to
    ``digest``, which raises the error.
    """

    def __init__(self, root):
        self.root = root
        self.lines, self.pending = {}, []
        self.lock = threading.Lock()
        self.failed = False

    def extracted(self, name):
        if name != ".":
            with self.lock:
                self.pending.append(name)

    def sync_and_read(self, sync):
        """Run ``sync`` (the disk gets what was written), then read back what it covered."""
        with self.lock:
            ready, self.pending = self.pending, []
        try:
            sync()
        except OSError:
            self._requeue(ready)
            raise
        if self.failed:
            self._requeue(ready)
            return
        try:
            for index, name in enumerate(ready):
                self.lines[name] = _observe(self.root, name)
        except OSError:
            self.failed = True
            self._requeue(ready[index:])

    def _requeue(self, names):
        with self.lock:
            self.pending[:0] = names

    def digest(self):
        """Read back what is left (the extraction has ended and synced); the tree digest."""
        with self.lock:
            ready, self.pending = self.pending, []
        for name in ready:
            self.lines[name] = _observe(self.root, name)
        return tree_digest(self.lines)


def _observe(root, name):
    """The line of what is found at ``name`` under ``root``."""
    path = os.path.join(root, name)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return _line(name, "missing")
    if stat.S_ISREG(mode):
        return _line(name, "f", read_back(path))
    if stat.S_ISLNK(mode):
        return _line(name, "l", os.readlink(path))
    if stat.S_ISDIR(mode):
        return _line(name, "d")
    return _line(name, _special(mode, os.lstat(path).st_rdev))


def _special(mode, rdev):
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return f"{'c' if stat.S_ISCHR(mode) else 'b'}{os.major(rdev)},{os.minor(rdev)}"
    return "p"


# ---------------------------------------------------------------- on the frontend


def expected_tree(stream):
    """The tree digest a node should find after extracting the tar ``stream``."""
    import tarfile

    lines, contents = {}, {}
    with tarfile.open(fileobj=stream, mode="r|") as archive:
        for member in archive:
            name = entry_name(member.name)
            if name == ".":
                continue
            contents.pop(name, None)
            if member.isreg():
                contents[name] = _content(archive.extractfile(member))
                lines[name] = _line(name, "f", contents[name])
            elif member.islnk():
                contents[name] = contents.get(entry_name(member.linkname), "?")
                lines[name] = _line(name, "f", contents[name])
            elif member.issym():
                lines[name] = _line(name, "l", member.linkname)
            elif member.isdir():
                lines[name] = _line(name, "d")
            elif member.ischr() or member.isblk():
                kind = "c" if member.ischr() else "b"
                lines[name] = _line(name, f"{kind}{member.devmajor},{member.devminor}")
            else:
                lines[name] = _line(name, "p")
    return tree_digest(lines)


def expected_stream(stream):
    """(bytes, SHA-256) of a stream read to its end."""
    import hashlib

    digest, size = hashlib.sha256(), 0
    while True:
        data = stream.read(READ)
        if not data:
            return size, digest.hexdigest()
        digest.update(data)
        size += len(data)


def _content(handle):
    return expected_stream(handle)[1]
