"""The relay agent's parts, in process: safe tar extraction, decompression, the ring."""

import io
import os
import shutil
import tarfile

import pytest
from chaincast_support import compress as _compress

from kabin.chaincast import agent, sinks


def _tar(*members):
    """A tar archive from (TarInfo fields, data) pairs."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for fields, data in members:
            info = tarfile.TarInfo(fields.pop("name"))
            for key, value in fields.items():
                setattr(info, key, value)
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def _file(name, data=b"x", **fields):
    return dict(name=name, **fields), data


def _symlink(name, target):
    return {"name": name, "type": tarfile.SYMTYPE, "linkname": target}, None


def _hardlink(name, target, mode=0o644):
    return {"name": name, "type": tarfile.LNKTYPE, "linkname": target, "mode": mode}, None


def _dir(name, mode=0o755):
    return {"name": name, "type": tarfile.DIRTYPE, "mode": mode}, None


@pytest.fixture
def places(tmp_path):
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"precious")
    return dest, outside


def _extract(data, dest):
    return sinks.extract_tar(io.BytesIO(data), str(dest))


def _untouched(outside):
    assert sorted(os.listdir(outside)) == ["victim"]
    assert (outside / "victim").read_bytes() == b"precious"
    assert oct((outside / "victim").stat().st_mode & 0o7777) == oct(0o644)


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "sub/../../../escape"])
def test_dotdot_members_are_refused(places, name):
    dest, outside = places
    with pytest.raises(sinks.UnsafeMember, match="leaves the destination"):
        _extract(_tar(_file(name)), dest)
    assert not (dest.parent / "escape").exists()
    _untouched(outside)


def test_absolute_names_land_inside(places):
    dest, outside = places
    _extract(_tar(_file(str(outside / "victim"), b"evil")), dest)
    assert (dest / str(outside / "victim").lstrip("/")).read_bytes() == b"evil"
    _untouched(outside)


@pytest.mark.parametrize("target", ["ABS", "../outside", "../../.."])
def test_no_write_through_a_symlink_leading_out(places, target):
    dest, outside = places
    target = str(outside) if target == "ABS" else target
    with pytest.raises(sinks.UnsafeMember, match="through a link"):
        _extract(_tar(_symlink("link", target), _file("link/victim", b"evil")), dest)
    _untouched(outside)


def test_a_file_replaces_a_symlink_instead_of_writing_through_it(places):
    dest, outside = places
    _extract(_tar(_symlink("s", str(outside / "victim")), _file("s", b"mine")), dest)
    assert (dest / "s").read_bytes() == b"mine" and not (dest / "s").is_symlink()
    _untouched(outside)


def test_a_directory_replaces_a_symlink(places):
    dest, outside = places
    _extract(_tar(_symlink("d", str(outside)), _dir("d", 0o777)), dest)
    assert (dest / "d").is_dir() and not (dest / "d").is_symlink()
    _untouched(outside)


def test_a_directory_written_into_cannot_become_a_link_later(places):
    dest, outside = places
    members = [_dir("d"), _file("d/a"), _symlink("d", str(outside)), _file("d/victim", b"evil")]
    with pytest.raises(sinks.UnsafeMember, match="would replace a directory"):
        _extract(_tar(*members), dest)
    _untouched(outside)


def test_a_path_through_an_inside_link_is_checked_again_after_the_link_changes(places):
    dest, outside = places
    members = [_dir("usr/lib"), _symlink("lib", "usr/lib"), _file("lib/a", b"mine"),
               _symlink("lib", str(outside)), _file("lib/victim", b"evil")]
    with pytest.raises(sinks.UnsafeMember, match="through a link"):
        _extract(_tar(*members), dest)
    assert (dest / "usr/lib/a").read_bytes() == b"mine"
    _untouched(outside)


@pytest.mark.parametrize("target", ["../outside/victim", "ABS"])
def test_hard_links_out_are_refused(places, target):
    dest, outside = places
    target = str(outside / "victim") if target == "ABS" else target
    members = [_hardlink("h", target), _file("h", b"evil")]
    with pytest.raises((sinks.UnsafeMember, tarfile.TarError, KeyError, OSError)):
        _extract(_tar(*members), dest)
    _untouched(outside)


def test_hard_link_through_an_outward_symlink_is_refused(places):
    dest, outside = places
    members = [_symlink("s", str(outside / "victim")), _hardlink("h", "s"), _file("h", b"evil")]
    with pytest.raises(sinks.UnsafeMember, match="hard link"):
        _extract(_tar(*members), dest)
    _untouched(outside)


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership needs root")
def test_ownership_modes_links_and_devices_are_kept(places):
    dest, _ = places
    data = _tar(_dir("usr", 0o755), _file("usr/su", b"#!", mode=0o4755, uid=0, gid=0),
                _file("usr/own", b"o", mode=0o640, uid=1234, gid=4321),
                _dir("tmp", 0o1777), _symlink("lib", "/usr/lib"), _hardlink("usr/su2", "usr/su", 0o4755),
                ({"name": "null", "type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3, "mode": 0o666}, None))
    assert len(_extract(data, dest)) == 7
    assert (dest / "usr/su").stat().st_mode & 0o7777 == 0o4755
    own = (dest / "usr/own").stat()
    assert (own.st_uid, own.st_gid, own.st_mode & 0o777) == (1234, 4321, 0o640)
    assert (dest / "tmp").stat().st_mode & 0o7777 == 0o1777
    assert os.readlink(dest / "lib") == "/usr/lib"
    assert (dest / "usr/su2").stat().st_ino == (dest / "usr/su").stat().st_ino
    assert os.major((dest / "null").stat().st_rdev) == 1


def test_a_long_archive_keeps_hard_links_and_directory_modes(places):
    """Thousands of members (the member list is trimmed on the way): links and modes still right."""
    dest, _ = places
    members = [_dir("etc", 0o700), _file("etc/first", b"1")]
    members += [_file(f"etc/f{i}", b"%d" % i) for i in range(2500)]
    members += [_hardlink("etc/again", "etc/first")]
    assert len(_extract(_tar(*members), dest)) == 2503
    assert (dest / "etc/again").stat().st_ino == (dest / "etc/first").stat().st_ino
    assert (dest / "etc/f2499").read_bytes() == b"2499"
    assert (dest / "etc").stat().st_mode & 0o7777 == 0o700


def test_a_hard_link_to_nothing_fails_the_extraction(places):
    dest, outside = places
    with pytest.raises((tarfile.TarError, KeyError)):
        _extract(_tar(_file("a"), _hardlink("b", "missing")), dest)
    _untouched(outside)


PAYLOAD = os.urandom(300_000) + b"\0" * 700_000


@pytest.mark.parametrize("kind", ["gzip", "bzip2", "xz", "zstd", "none"])
def test_decompression_reads_every_member_or_frame(kind):
    stream = sinks.decompressed(io.BytesIO(_compress(kind, PAYLOAD)), kind)
    assert b"".join(iter(lambda: stream.read(65536), b"")) == PAYLOAD


@pytest.mark.skipif(shutil.which("zstd") is None, reason="needs the zstd command")
def test_zstd_command_when_the_module_is_missing():
    stream = sinks.CommandReader(io.BytesIO(_compress("zstd", PAYLOAD)), ["zstd", "-dc"])
    assert b"".join(iter(lambda: stream.read(65536), b"")) == PAYLOAD


def test_zstd_command_failure_is_an_error():
    stream = sinks.CommandReader(io.BytesIO(b"not zstd at all"), ["zstd", "-dc"])
    with pytest.raises(OSError, match="zstd failed"):
        while stream.read(65536):
            pass


def _fill(ring, data):
    view = ring.slot(0.1)
    view[:len(data)] = data
    ring.commit(len(data))


def test_ring_waits_for_the_slowest_consumer_then_reuses_space():
    ring = agent.Ring(1024, total=4096)
    ring.add("sink", 0)
    _fill(ring, b"a" * 1024)
    assert ring.slot(0.05) is None            # full: the sink has not read anything
    assert bytes(ring.read("sink", 100, 0.1)) == b"a" * 100
    ring.advance("sink", 100)
    assert len(ring.slot(0.1)) == 100         # room for exactly what was consumed
    ring.commit(0)


def test_ring_keeps_the_last_bytes_for_repairs():
    ring = agent.Ring(1024, total=4096)
    ring.add("sink", 0)
    for _ in range(3):
        view = ring.slot(0.1)
        ring.commit(len(view))
        ring.advance("sink", len(view))
    assert ring.head == 3072 and ring.start() == 2048
    ring.add("child")
    assert not ring.place("child", 1000)      # gone: the child must go to the source
    ring.add("child")
    assert ring.place("child", 2500)
    assert ring.idle("child", now=ring.progress["child"] + 5) == pytest.approx(5)


def _resident_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def test_ring_memory_is_taken_as_data_lands_not_at_start():
    before = _resident_mb()
    ring = agent.Ring(256 << 20, total=1 << 30)
    assert _resident_mb() - before < 16       # an agent starts without paying for its ring
    ring.add("sink", 0)
    while ring.head < 64 << 20:               # 64 MB received
        view = ring.slot(0.1)
        view[:] = b"x" * len(view)
        ring.commit(len(view))
        ring.advance("sink", len(view))
    assert _resident_mb() - before > 56


def test_ring_read_ends_once_the_consumer_is_removed():
    ring = agent.Ring(1024, total=4096)
    ring.add("child", 0)
    ring.remove("child")
    assert ring.read("child", 100, 0.1) == b""
