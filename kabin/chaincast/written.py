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
    import hashlib

    digest, left = hashlib.sha256(), limit
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        while left is None or left > 0:
            data = os.read(fd, READ if left is None else min(READ, left))
            if not data:
                break
            digest.update(data)
            if left is not None:
                left -= len(data)
    finally:
        os.close(fd)
    if left:
        raise OSError(f"{path}: {left} bytes short of what was written")
    return digest.hexdigest()


def observed_tree(root, names):
    """The tree digest of what is found under ``root`` at each of ``names``."""
    lines = {}
    for name in names:
        if name == ".":
            continue
        path = os.path.join(root, name)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            lines[name] = _line(name, "missing")
            continue
        if stat.S_ISREG(mode):
            lines[name] = _line(name, "f", read_back(path))
        elif stat.S_ISLNK(mode):
            lines[name] = _line(name, "l", os.readlink(path))
        elif stat.S_ISDIR(mode):
            lines[name] = _line(name, "d")
        else:
            lines[name] = _line(name, _special(mode, os.lstat(path).st_rdev))
    return tree_digest(lines)


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
