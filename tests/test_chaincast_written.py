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
