"""The written-data digest: what a node reads back from its disk against what the frontend
predicts from the image (real archives, real files; a changed byte on the disk is seen)."""

import io
import os
import tarfile

import pytest
from chaincast_support import compress

from kabin.chaincast import sinks, written


def _archive(tmp_path):
    """A tree with every kind of entry, its names written the ways tar writers do."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        def add(name, kind=tarfile.REGTYPE, data=b"", **fields):
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(data)
            for key, value in fields.items():
                setattr(info, key, value)
            tar.addfile(info, io.BytesIO(data))
        add("./", tarfile.DIRTYPE)
        add("./etc", tarfile.DIRTYPE)
        add("./etc/hostname", data=b"node\n")
        add("/etc/big", data=os.urandom(3 << 20))
        add("etc/twice", data=b"first")
        add("etc/twice", data=b"second")          # the last one wins, on the disk too
        add("etc/link", tarfile.LNKTYPE, linkname="./etc/hostname")
        add("lib", tarfile.SYMTYPE, linkname="usr/lib")
        add("empty", tarfile.DIRTYPE)
        if os.geteuid() == 0:
            add("null", tarfile.CHRTYPE, devmajor=1, devminor=3)
    return out.getvalue()


@pytest.fixture
def extracted(tmp_path):
    data = _archive(tmp_path)
    root = tmp_path / "dest"
    names = sinks.extract_tar(io.BytesIO(data), str(root))
    return data, str(root), names


def test_the_tree_read_back_is_the_one_the_archive_predicts(extracted):
    data, root, names = extracted
    assert "etc/hostname" in names and "etc/big" in names and "." in names
    assert written.observed_tree(root, names) == written.expected_tree(io.BytesIO(data))


@pytest.mark.parametrize("change", ["byte", "missing", "symlink", "link-target"])
def test_a_tree_changed_on_the_disk_gives_another_digest(extracted, change):
    data, root, names = extracted
    big = os.path.join(root, "etc/big")
    if change == "byte":           # one byte in the middle of a 3 MB file
        with open(big, "r+b") as handle:
            handle.seek(1 << 20)
            old = handle.read(1)
            handle.seek(1 << 20)
            handle.write(bytes([old[0] ^ 1]))
    elif change == "missing":
        os.unlink(os.path.join(root, "etc/hostname"))
    elif change == "symlink":
        os.unlink(big)
        os.symlink("hostname", big)
    else:
        os.unlink(os.path.join(root, "lib"))
        os.symlink("usr/lib64", os.path.join(root, "lib"))
    assert written.observed_tree(root, names) != written.expected_tree(io.BytesIO(data))


@pytest.mark.parametrize("kind", ["zstd", "gzip", "none"])
def test_a_dd_image_read_back_from_a_file(tmp_path, kind):
    payload = os.urandom(1 << 20) + b"\0" * (3 << 20)
    dest = tmp_path / "disk"
    dest.write_bytes(b"\xff" * (8 << 20))      # a disk longer than the image
    size = sinks.write_blocks(sinks.decompressed(io.BytesIO(compress(kind, payload)), kind),
                              str(dest))
    stream = sinks.decompressed(io.BytesIO(compress(kind, payload)), kind)
    assert size == len(payload)
    assert written.read_back(str(dest), size) == written.expected_stream(stream)[1]


def test_a_disk_shorter_than_what_was_written_is_an_error(tmp_path):
    dest = tmp_path / "disk"
    dest.write_bytes(b"x" * 1000)
    with pytest.raises(OSError, match="24 bytes short"):
        written.read_back(str(dest), 1024)


class _SyncEveryMember(io.RawIOBase):
    """The archive's bytes, with a sync of the disk and a read-back between two
    members (the agent's Flusher does it every second): the extraction then reads back
    as it goes, each name right after it is written."""

    def __init__(self, data, readback, root):
        self.data, self.readback, self.root, self.position = data, readback, root, 0
        self.reads = []

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.position % 512 == 0 and self.position:
            self.readback.sync_and_read(lambda: sinks.sync_filesystem(self.root))
            self.reads.append(len(self.readback.lines))
        count = min(len(buffer), 512, len(self.data) - self.position)
        buffer[:count] = self.data[self.position:self.position + count]
        self.position += count
        return count


def test_reading_back_during_the_extraction_gives_the_predicted_tree(tmp_path):
    """Names are read back while the archive is still extracting; a name extracted
    twice is read again (the second content is the one on the disk and in the digest)."""
    data = _archive(tmp_path)
    root = tmp_path / "dest"
    root.mkdir()
    readback = written.TreeReadBack(str(root))
    stream = _SyncEveryMember(data, readback, str(root))
    sinks.extract_tar(io.BufferedReader(stream, 512), str(root), readback)
    assert readback.digest() == written.expected_tree(io.BytesIO(data))
    assert 0 < max(stream.reads) < len(readback.lines)   # most read during, the last after


def test_a_failed_sync_leaves_its_names_to_the_final_read(tmp_path):
    (tmp_path / "a").write_bytes(b"content")
    readback = written.TreeReadBack(str(tmp_path))
    readback.extracted("a")

    def failing():
        raise OSError(5, "Input/output error")
    with pytest.raises(OSError):
        readback.sync_and_read(failing)
    assert readback.lines == {}
    assert readback.digest() == written.observed_tree(str(tmp_path), {"a"})


def test_a_dd_image_read_back_while_it_is_written(tmp_path):
    """The bytes synced so far are read back at each sync, the rest at the end."""
    dest, data = tmp_path / "disk", os.urandom(3 << 20)
    readback = written.BlockReadBack(str(dest))
    with open(dest, "wb") as disk:
        for start in range(0, len(data), 1 << 20):
            disk.write(data[start:start + (1 << 20)])
            readback.sync_and_read(lambda: (disk.flush(), os.fdatasync(disk.fileno())),
                                   lambda: disk.tell())
            assert readback.offset == disk.tell()
    assert readback.digest(len(data)) == written.expected_stream(io.BytesIO(data))[1]
    short = written.BlockReadBack(str(dest))
    with pytest.raises(OSError, match="short"):
        short.digest(len(data) + 1)
