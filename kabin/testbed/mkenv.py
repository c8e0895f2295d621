"""``ka-testbed mkenv``: small but real environment images for the testbed.

One busybox-static root file system (a shell, every applet linked, root in
/etc/passwd, an /etc/os-release naming the environment, kernel and initrd files
at the paths the description names) packed four ways, each with its Kadeploy3
YAML description, and registered as public environments of root:

    testenv-tgz   tar + gzip     testenv-txz   tar + xz
    testenv-tzst  tar + zstd     testenv-dd    ext4 file system image (dd) + gzip

The kernel and initrd are small placeholder files: the testbed's boot emulator
reads the paths but never executes them. ``pad_size`` adds incompressible bytes
(/var/kabin-padding) so benchmarks get images of a chosen size (xz is slow on
such bytes, ~5-10 MB/s: ``only`` builds a subset).
"""

import gzip
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from .. import envdesc, envs
from ..errors import SystemRequirementError, UsageError

log = logging.getLogger(__name__)
progress = logging.getLogger("kabin.progress")

BUSYBOX = Path("/bin/busybox")
KERNEL, INITRD = "/boot/vmlinuz", "/boot/initrd.img"
PAD_FILE = "var/kabin-padding"
# name, image kind, compression, file suffix
VARIANTS = (("testenv-tgz", "tar", "gzip", ".tar.gz"),
            ("testenv-txz", "tar", "xz", ".tar.xz"),
            ("testenv-tzst", "tar", "zstd", ".tar.zst"),
            ("testenv-dd", "dd", "gzip", ".dd.gz"))
_CHUNK = 1 << 20


# ---------------------------------------------------------------- the root file system

def _write(path, text, mode=0o644):
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)


def build_tree(root, pad_size=0):
    """A busybox-static root file system in ``root`` (made; must not exist)."""
    if not BUSYBOX.is_file():
        raise SystemRequirementError(f"{BUSYBOX} is missing: install the busybox-static package")
    root.mkdir(mode=0o755)
    for directory, mode in (("bin", 0o755), ("sbin", 0o755), ("usr/bin", 0o755),
                            ("usr/sbin", 0o755), ("etc", 0o755), ("boot", 0o755),
                            ("dev", 0o755), ("proc", 0o555), ("sys", 0o555), ("run", 0o755),
                            ("tmp", 0o1777), ("root", 0o700), ("var/log", 0o755),
                            ("mnt", 0o755), ("home", 0o755)):
        (root / directory).mkdir(parents=True, exist_ok=True)
        (root / directory).chmod(mode)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    (root / "bin/busybox").chmod(0o755)
    _link_applets(root)
    _write(root / "etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
    _write(root / "etc/group", "root:x:0:\n")
    _write(root / "etc/shadow", "root:*:19000:0:99999:7:::\n", 0o600)
    _write(root / "etc/fstab", "# <file system> <mount point> <type> <options> <dump> <pass>\n")
    _write(root / "etc/profile", "export PATH=/bin:/sbin:/usr/bin:/usr/sbin\n")
    if pad_size:
        _pad(root / PAD_FILE, pad_size)
    return root


def _link_applets(root):
    listing = subprocess.run([str(BUSYBOX), "--list-full"], capture_output=True, text=True,
                             check=True, timeout=30).stdout
    for applet in listing.split():
        link = root / applet
        if link.name == "busybox" or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")


def _pad(path, size):
    """Random bytes: padding that no compressor can shrink."""
    with open(path, "wb") as handle:
        left = size
        while left:
            chunk = os.urandom(min(left, _CHUNK))
            handle.write(chunk)
            left -= len(chunk)
    path.chmod(0o644)


def personalize(root, name):
    """What differs between the environments: os-release, hostname, kernel and initrd."""
    _write(root / "etc/os-release",
           f'NAME="kabin-testenv"\nID=kabin-testenv\nVERSION_ID=1\nVARIANT_ID={name}\n'
           f'PRETTY_NAME="kabin test environment ({name})"\n')
    _write(root / "etc/hostname", f"{name}\n")
    _write(root / KERNEL.lstrip("/"), f"kabin testbed kernel of {name} (not executable)\n")
    _write(root / INITRD.lstrip("/"), f"kabin testbed initrd of {name} (not executable)\n")


# ---------------------------------------------------------------- images

def _root_owned(info):
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def write_tar(root, path, compression):
    """``root`` as a tar archive, every entry owned by root, compressed."""
    if compression == "zstd":
        import zstandard  # imported late: only mkenv and the transfer need it

        with open(path, "wb") as raw, \
                zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(raw) as packed, \
                tarfile.open(fileobj=packed, mode="w|") as tar:
            tar.add(root, arcname=".", filter=_root_owned)
        return
    options = {"gzip": ("w:gz", {"compresslevel": 6}), "xz": ("w:xz", {"preset": 0})}
    mode, kwargs = options[compression]
    with tarfile.open(path, mode, **kwargs) as tar:
        tar.add(root, arcname=".", filter=_root_owned)


def write_ext4(root, path, label):
    """``root`` as an ext4 file system image (``mkfs.ext4 -d``: no mount), gzip-compressed."""
    used = sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink())
    size_mb = max(16, used * 5 // 4 // 2**20 + 8)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        raw = Path(tmp) / "image.ext4"
        command = ["mkfs.ext4", "-q", "-F", "-L", label[:16], "-E", "root_owner=0:0",
                   "-d", str(root), str(raw), f"{size_mb}M"]
        try:
            subprocess.run(command, capture_output=True, text=True, check=True, timeout=300)
        except FileNotFoundError:
            raise SystemRequirementError("mkfs.ext4 is missing: install e2fsprogs") from None
        except subprocess.CalledProcessError as exc:
            raise SystemRequirementError(f"mkfs.ext4 failed: {exc.stderr.strip()}") from None
        with open(raw, "rb") as source, gzip.open(path, "wb", compresslevel=6) as target:
            shutil.copyfileobj(source, target, _CHUNK)


def description(name, kind, compression, image_path, kernel=KERNEL, initrd=INITRD, text=None):
    """The Kadeploy3 description of one test environment."""
    return envdesc.normalize({
        "name": name, "version": 1,
        "description": text or f"kabin testbed environment: busybox, {kind} image, {compression}",
        "author": "ka-testbed mkenv", "visibility": "public", "destructive": False,
        "os": "linux",
        "image": {"file": str(image_path), "kind": kind, "compression": compression},
        "boot": {"kernel": kernel, "initrd": initrd},
        "filesystem": "ext4", "partition_type": 131, "multipart": False,
    }, f"mkenv:{name}")


def select(only=None):
    """The variants named in ``only`` (all by default)."""
    known = [v[0] for v in VARIANTS]
    unknown = sorted(set(only or ()) - set(known))
    if unknown:
        raise UsageError(f"unknown test environment {', '.join(unknown)}: choose among "
                         f"{', '.join(known)}")
    return [v for v in VARIANTS if not only or v[0] in only]


def build(out_dir, pad_size=0, only=None):
    """Build the images (all, or those named in ``only``) and their descriptions in
    ``out_dir``; returns the descriptions."""
    variants = select(only)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    descriptions = []
    with tempfile.TemporaryDirectory(prefix=".mkenv-", dir=out_dir) as tmp:
        root = build_tree(Path(tmp) / "rootfs", pad_size)
        for name, kind, compression, suffix in variants:
            progress.info("building %s", name)
            personalize(root, name)
            image = out_dir / f"{name}{suffix}"
            partial = image.with_name(f".{image.name}.part")  # never a half-written image
            if kind == "tar":
                write_tar(root, partial, compression)
            else:
                write_ext4(root, partial, name)
            os.replace(partial, image)
            desc = description(name, kind, compression, image)
            (out_dir / f"{name}.yml").write_text(envdesc.dump(desc), encoding="utf-8")
            descriptions.append(desc)
    return descriptions


REAL_VARIANTS = (("realenv-tzst", "tar", "zstd", ".tar.zst"),
                 ("realenv-dd", "dd", "gzip", ".dd.gz"))


def build_real(out_dir, authorized_keys, kernel_deb=None):
    """Bootable test systems (kabin.deployenv.system: Debian's kernel, an initrd that
    mounts root=, sshd accepting ``authorized_keys``) as tar.zst and as an ext4 image."""
    from ..deployenv import kernel as kernel_mod
    from ..deployenv import system
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    descriptions = []
    with tempfile.TemporaryDirectory(prefix=".mkenv-", dir=out_dir) as tmp:
        kernel = kernel_mod.unpack(kernel_deb or kernel_mod.download(), Path(tmp) / "kernel")
        for name, kind, compression, suffix in REAL_VARIANTS:
            progress.info("building %s (kernel %s)", name, kernel.version)
            root = system.build_tree(Path(tmp) / name, name, kernel, authorized_keys)
            image = out_dir / f"{name}{suffix}"
            partial = image.with_name(f".{image.name}.part")
            if kind == "tar":
                write_tar(root, partial, compression)
            else:
                write_ext4(root, partial, name)
            os.replace(partial, image)
            desc = description(name, kind, compression, image, "/vmlinuz", "/initrd.img",
                               f"kabin test system: kernel {kernel.version}, sshd, {kind}")
            (out_dir / f"{name}.yml").write_text(envdesc.dump(desc), encoding="utf-8")
            descriptions.append(desc)
    return descriptions


def mkenv(database, out_dir, pad_size=0, only=None, real_keys=None):
    """Build the test environments in ``out_dir`` and register them (public, owner root)."""
    if os.geteuid() != 0:
        raise SystemRequirementError("ka-testbed mkenv needs root: the images hold root-owned "
                                     "files and the environments are the administrator's")
    descriptions = build_real(out_dir, real_keys) if real_keys else \
        build(out_dir, pad_size, only)
    return envs.add_many(database, descriptions, envs.ADMIN, replace=True)
