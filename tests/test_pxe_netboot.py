"""The netboot profile: an environment's kernel read from its image, the cache by content."""

import hashlib
import io
import os
import tarfile

import pytest
import yaml
from qemu.cluster import make_config

from kabin import db, envs, pxe
from kabin.errors import UsageError
from kabin.pxe import cache as cache_mod
from kabin.pxe import netboot

MB = 1 << 20


@pytest.fixture
def config(tmp_path):
    return make_config(tmp_path, {"c": {"pxe": {"method": "grub", "naming": "ip"},
                                        "nodes": [("node-1", "127.0.1.1", None)],
                                        "user_params": "console=ttyS0"}}, cache_mb=1)


def _tar(path, members, compression="gz"):
    """A tar image; ``members``: {name: bytes} or {name: ("->", target)} for a symlink."""
    mode = {"gz": "w:gz", "xz": "w:xz", "bz2": "w:bz2"}[compression]
    with tarfile.open(path, mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, data[1]
                archive.addfile(info)
            else:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


def _add_env(config, tmp_path, image, compression="gzip", kind="tar", **boot):
    desc = tmp_path / "env.yml"
    desc.write_text(yaml.safe_dump({
        "name": "tiny", "version": 1, "os": "linux", "filesystem": "ext4",
        "image": {"file": str(image), "kind": kind, "compression": compression},
        "boot": {"kernel": "/vmlinuz", "initrd": "/initrd.img", "kernel_params": "quiet",
                 **boot}}))
    with db.open_database(config) as database:
        envs.add_file(database, desc, envs.current_user())


def _read(config, relative):
    return (config.server.pxe_root / relative).read_bytes()


@pytest.mark.parametrize("compression", ["gz", "xz"])
def test_env_kernel_and_initrd_come_from_the_image_through_symlinks(config, tmp_path,
                                                                    compression):
    image = tmp_path / f"tiny.tar.{compression}"
    # the links come after their targets: following them takes a second pass
    _tar(image, {"./boot/vmlinuz-6.1": b"KERNEL" * 100, "./boot/initrd.img-6.1": b"INITRD",
                 "./vmlinuz": ("->", "boot/vmlinuz-6.1"),
                 "./initrd.img": ("->", "/boot/initrd.img-6.1")}, compression)
    _add_env(config, tmp_path, image, {"gz": "gzip", "xz": "xz"}[compression])
    request = netboot.request_from_env(config, "tiny", params="kabin.x=1")
    assert _read(config, request.kernel) == b"KERNEL" * 100
    assert _read(config, request.initrd) == b"INITRD"
    assert request.kernel.startswith("kabin-cache/") and request.kernel.endswith("-vmlinuz-6.1")
    [record] = pxe.set_profiles(config, request, [{"node": "node-1", "status": "ok"}])
    assert record["status"] == "ok", record
    text = _read(config, "grub/grub.cfg-127.0.1.1").decode()
    assert f"linux /{request.kernel} console=ttyS0 quiet kabin.x=1\n" in text
    assert "# ka-pxe: profile=netboot env=tiny@1" in text


def test_missing_kernel_in_the_image_is_a_clear_error(config, tmp_path):
    image = tmp_path / "tiny.tgz"
    _tar(image, {"etc/hostname": b"x", "vmlinuz": ("->", "boot/nothing")})
    _add_env(config, tmp_path, image)
    with pytest.raises(UsageError, match=r"kernel /vmlinuz \(a link to /boot/nothing\), "
                                          r"initrd /initrd.img not found in .*tiny.tgz"):
        netboot.request_from_env(config, "tiny")


def test_dd_image_needs_the_kernel_given(config, tmp_path):
    image = tmp_path / "disk.img.gz"
    image.write_bytes(b"\0" * 1024)
    _add_env(config, tmp_path, image, kind="dd")
    with pytest.raises(UsageError, match="dd image"):
        netboot.request_from_env(config, "tiny")


def test_changed_image_is_refused_by_its_checksum(config, tmp_path):
    image = tmp_path / "tiny.tgz"
    _tar(image, {"vmlinuz": b"K", "initrd.img": b"I"})
    _add_env(config, tmp_path, image)
    _tar(image, {"vmlinuz": b"K2", "initrd.img": b"I"})
    with pytest.raises(envs.ChecksumMismatch):
        netboot.request_from_env(config, "tiny")


# ---------------------------------------------------------------- the cache

def test_cache_stores_by_content(config, tmp_path):
    cache = cache_mod.KernelCache(config.server.pxe_root, MB)
    (tmp_path / "a").write_bytes(b"same")
    (tmp_path / "b").write_bytes(b"same")
    (tmp_path / "c").write_bytes(b"other")
    first, second, third = (cache.add_file(tmp_path / n) for n in "abc")
    digest = hashlib.sha256(b"same").hexdigest()[:24]
    assert first == f"kabin-cache/{digest}-a" and second == f"kabin-cache/{digest}-b"
    assert third != first and _read(config, third) == b"other"
    assert (config.server.pxe_root / first).stat().st_mode & 0o777 == 0o644


def test_cache_evicts_least_recently_used_unreferenced_files(config, tmp_path):
    root = config.server.pxe_root
    old = cache_mod.KernelCache(root, MB)
    files = {}
    for index, name in enumerate(("in-use", "oldest", "newer")):
        (tmp_path / name).write_bytes(bytes([index]) * (300 * 1024))
        files[name] = old.add_file(tmp_path / name)
        os.utime(root / files[name], (1000 + index, 1000 + index))
    # a profile in the tree names "in-use", the least recently used
    [record] = pxe.set_profiles(config, pxe.Request("netboot", kernel=files["in-use"]),
                                [{"node": "node-1", "status": "ok"}])
    assert record["status"] == "ok"
    (tmp_path / "new").write_bytes(b"n" * (300 * 1024))
    new = cache_mod.KernelCache(root, MB).add_file(tmp_path / "new")
    left = sorted(p.name for p in (root / "kabin-cache").iterdir())
    assert left == sorted(f.rsplit("/", 1)[1] for f in (files["in-use"], files["newer"], new))


def test_cache_keeps_what_is_in_use_even_above_its_bound(config, tmp_path, caplog):
    root = config.server.pxe_root
    (tmp_path / "big").write_bytes(b"b" * (2 * MB))
    kept = cache_mod.KernelCache(root, MB).add_file(tmp_path / "big")
    assert (root / kept).exists()
    assert "above its bound" in caplog.text


def test_request_from_files(config, tmp_path):
    (tmp_path / "vmlinuz").write_bytes(b"k")
    request = netboot.request_from_files(config, tmp_path / "vmlinuz", params="quiet")
    assert request.initrd is None and request.params == "quiet"
    assert request.stamp == {"kernel": "vmlinuz"}
    assert _read(config, request.kernel) == b"k"
