"""What a relay agent does with the stream: decompress it, extract or write it.

Standard library only (3.7+), plus ``zstandard`` when present (else the
``zstd`` command): this file is sent to the nodes ahead of ``agent.py``.

Tar extraction uses Python's tarfile with our own checks (``MemberGuard``)
rather than the node's tar: the checks are explicit and tested, and do not
depend on which tar (GNU, busybox) the deployment environment ships. Absolute
names are made relative (as GNU tar does), names leaving the destination are
refused, nothing is ever written through a symlink leading out of it, hard
links must point inside it, and an existing file is replaced, never written
through. Ownership (numeric ids), modes (setuid included) and times are kept.
An unsafe member fails the node (the node keeps relaying). What tarfile does
not restore: extended attributes (file capabilities, SELinux labels).
"""

import functools
import os
import stat
import threading

CHUNK = 256 * 1024


class Aborted(Exception):
    """The agent is shutting down."""


class UnsafeMember(Exception):
    """A tar member that would be written outside the destination."""


def drain(stream):
    """Read ``stream`` to its end."""
    while stream.read(1 << 20):
        pass


# ---------------------------------------------------------------- decompression


def decompressed(raw, compression):
    """A file-like object giving the decompressed stream of ``raw``."""
    if compression == "none":
        return raw
    if compression == "gzip":
        import gzip
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "bzip2":
        import bz2
        return bz2.BZ2File(raw)
    if compression == "xz":
        import lzma
        return lzma.LZMAFile(raw)
    if compression == "zstd":
        try:
            import zstandard
        except ImportError:
            return CommandReader(raw, ["zstd", "-dc"])
        reader = zstandard.ZstdDecompressor(max_window_size=1 << 31)
        try:
            return reader.stream_reader(raw, read_across_frames=True)
        except TypeError:  # zstandard < 0.17 reads one frame only: use the command
            return CommandReader(raw, ["zstd", "-dc"])
    raise ValueError(f"unknown compression {compression!r}")


class CommandReader:
    """Decompress through an external command (zstd without the python module)."""

    def __init__(self, raw, argv):
        import subprocess
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE)
        except OSError as exc:
            raise OSError(f"cannot run {argv[0]} (and no python zstandard module): "
                          f"{exc.strerror}") from None
        self.argv = argv
        threading.Thread(target=self._feed, args=(raw,), daemon=True).start()

    def _feed(self, raw):
        try:
            for data in iter(lambda: raw.read(CHUNK), b""):
                self.proc.stdin.write(data)
        except (OSError, Aborted):
            pass  # the command failed: read() reports its status
        finally:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def read(self, size=-1):
        data = self.proc.stdout.read(size if size and size > 0 else CHUNK)
        if not data and self.proc.wait() != 0:
            err = self.proc.stderr.read().decode("utf-8", "replace").strip()
            why = err.splitlines()[-1] if err else f"exit code {self.proc.returncode}"
            raise OSError(f"{self.argv[0]} failed: {why}")
        return data


# ---------------------------------------------------------------- sinks


def _inside(path, root):
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class MemberGuard:
    """Checks each tar member just before it is extracted under ``root`` (a real path).

    The checks run against the tree as extracted so far, so links made by
    earlier members are taken into account. A directory found real all the way
    from ``root`` (no link on its path) is remembered: extraction never removes
    a directory (see ``_clear``), so it stays safe to write into, and the next
    members there cost no walk of their path.
    """

    def __init__(self, root):
        self.root = root
        self.real_dirs = {root}

    def check(self, member):
        """Returns ``member`` ready to extract (leading '/' removed); raises UnsafeMember."""
        root = self.root
        name = member.name.lstrip("/") or "."
        target = os.path.normpath(os.path.join(root, name))
        if not _inside(target, root) or (target == root and not member.isdir()):
            raise UnsafeMember(f"member {member.name!r} leaves the destination")
        if target != root and not self._inside_parent(os.path.dirname(target)):
            raise UnsafeMember(f"member {member.name!r} would be written through a link "
                               "leading out of the destination")
        if member.islnk():
            linkname = member.linkname.lstrip("/")
            if not _inside(os.path.realpath(os.path.join(root, linkname)), root):
                raise UnsafeMember(f"hard link {member.name!r} points out of the destination "
                                   f"({member.linkname!r})")
            member.linkname = linkname
        member.name = name
        if target != root and os.path.lexists(target):
            _clear(target, member)
        return member

    def _inside_parent(self, parent):
        if parent in self.real_dirs:
            return True
        real = os.path.realpath(parent)
        if real == parent and os.path.isdir(parent):
            self.real_dirs.add(parent)
        return _inside(real, self.root)


def _clear(target, member):
    """Remove what is at ``target`` so extraction never writes through it."""
    is_dir = stat.S_ISDIR(os.lstat(target).st_mode)
    if is_dir and not member.isdir():
        raise UnsafeMember(f"member {member.name!r} would replace a directory")
    if not is_dir:
        os.unlink(target)


def extract_tar(stream, dest, readback=None):
    """Extract a tar stream into ``dest`` with ``MemberGuard`` checks; returns the names
    extracted. ``readback`` (a ``written.TreeReadBack``) is told each name once it is
    extracted, and reads back what each periodic sync wrote."""
    import tarfile  # here, not at the top: the agent is ready sooner

    os.makedirs(dest, exist_ok=True)
    root = os.path.realpath(dest)
    guard, names = MemberGuard(root), set()

    def checked(archive):
        done = None   # the member extractall asked for before this one: now extracted
        for member in archive:
            if len(names) % 1024 == 1023:  # extractall keeps its own list of directories
                del archive.members[:]
            member = guard.check(member)
            if readback and done:
                readback.extracted(done)
            done = os.path.normpath(member.name)
            names.add(done)
            yield member
        if readback and done:
            readback.extracted(done)

    def sync():
        sync_filesystem(root)

    # Mode "r:" over a forward-only reader: tarfile then copies each member's data
    # straight from the decompressor to its file ("r|" buffers and re-slices it all).
    with tarfile.open(fileobj=ForwardReader(stream), mode="r:") as archive, \
            Flusher(functools.partial(readback.sync_and_read, sync) if readback else sync):
        archive.copybufsize = 1 << 20
        options = {"numeric_owner": True}
        if hasattr(tarfile, "fully_trusted_filter"):  # our checks replace tarfile's filters
            options["filter"] = "fully_trusted"
        archive.extractall(root, members=checked(archive), **options)
    sync_filesystem(root)
    return names


class ForwardReader:
    """A stream that can only be read forward, seekable forward (what tarfile's "r:" needs)."""

    def __init__(self, stream):
        self.stream, self.position = stream, 0

    def tell(self):
        return self.position

    def seek(self, offset, whence=os.SEEK_SET):
        if whence != os.SEEK_SET or offset < self.position:
            import tarfile
            raise tarfile.StreamError("this tar archive needs seeking backwards "
                                      "(a hard link to a file that is not there?)")
        while self.position < offset:
            if not self.read(min(offset - self.position, 1 << 20)):
                break
        return self.position

    def read(self, size=-1):
        """``size`` bytes (fewer only at the end of the stream)."""
        if size is None or size < 0:
            size = 1 << 20
        data = self.stream.read(size)
        if 0 < len(data) < size:
            parts, got = [data], len(data)
            while got < size:
                more = self.stream.read(size - got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        self.position += len(data)
        return data


def write_blocks(stream, dest, readback=None):
    """Write the stream to a block device or a file (``dd``); returns the bytes written.
    ``readback`` (a ``written.BlockReadBack``) reads back what each periodic sync wrote."""
    existing = os.stat(dest).st_mode if os.path.exists(dest) else 0
    flags = os.O_WRONLY
    if not (stat.S_ISBLK(existing) or stat.S_ISCHR(existing)):
        flags |= os.O_CREAT | os.O_TRUNC
    return _write_file(stream, dest, flags, readback)


def store_file(raw, dest):
    """Store the stream as it is (no decompression), atomically."""
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{dest}.kabin-part"
    _write_file(raw, tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.replace(tmp, dest)


def _write_file(stream, path, flags, readback=None):
    """Copy ``stream`` into ``path`` (written back as it goes), then fsync it."""
    fd = os.open(path, flags, 0o644)
    written = [0]

    def sync():
        os.fdatasync(fd)

    try:
        with Flusher(functools.partial(readback.sync_and_read, sync, lambda: written[0])
                     if readback else sync):
            _copy_to_fd(stream, fd, written)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written[0]


def _copy_to_fd(stream, fd, written):
    """Copy ``stream`` to ``fd``, counting the bytes in ``written[0]``."""
    while True:
        data = stream.read(1 << 20)
        if not data:
            return
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        written[0] += len(data)


class Flusher:
    """Writes the data back to the disk every ``every`` seconds while the stream flows.

    Without it, the kernel keeps a short broadcast's data dirty in memory (for 30 s
    or up to 10 % of the RAM) and the final sync writes it all at once, after the
    network is done: the disk's work then adds to the network's instead of
    overlapping it.
    """

    def __init__(self, sync, every=1.0):
        self.sync, self.every = sync, every
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.thread.join()

    def _run(self):
        while not self.stopped.wait(self.every):
            try:
                self.sync()
            except OSError:
                return  # the final sync reports the disk's errors


def sync_filesystem(path):
    """Flush the filesystem holding ``path`` (syncfs when the C library has it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        syncfs = _syncfs()
        if syncfs is None or syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=1)
def _syncfs():
    """The C library's syncfs (looked up once: the Flusher calls it every second), or None."""
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (ImportError, AttributeError, OSError):
        return None
