"""The deployment environment (ka-deployenv build): a Debian kernel and an initramfs.

Why the host's own files and not a debootstrap: the environment is loaded over
the network and runs from RAM at every deployment, so it must be small (tens of
MB, not a root file system), and it must hold exactly the tools kabin's steps
were tested with. The kernel is Debian's (kernel.py); the initramfs holds:

- busybox (the shell, udhcpc, ip, nc and the small tools) and an ``/init`` that
  loads the modules, takes a DHCP lease, opens the deploy marker port, runs
  sshd, makes busybox's reboot and poweroff act, and leaves a shell on ttyS0;
- the host's OpenSSH sshd, accepting root with the key of server.yml;
- what the micro-steps run: sfdisk, partx, wipefs, blkid, findmnt, mountpoint,
  mount; mkfs for ext2/3/4, xfs and vfat, mkswap; GNU tar with gzip, bzip2, xz
  and zstd; dd, sync, sha256sum; kexec; grub-install with GRUB's i386-pc and
  x86_64-efi modules, efibootmgr;
- Debian's python3 with the part of its library the chaincast agent imports
  (found by importing it: the exact closure) and python3-zstandard.

Each program comes with the shared libraries ldd names. Reproducible: entries
sorted, root-owned, untimed; only the host key (made at each build) differs.
"""

import gzip
import logging
import os
import tempfile
from pathlib import Path

from ..errors import SystemRequirementError
from . import kernel as kernel_mod
from .initramfs import Archive
from .kernel import run

log = logging.getLogger(__name__)
progress = logging.getLogger("kabin.progress")

PYTHON = Path("/usr/bin/python3.11")
# program -> Debian package (for the error that says what to install)
PROGRAMS = {
    "/bin/busybox": "busybox-static", "/usr/sbin/sshd": "openssh-server",
    "/usr/bin/ssh": "openssh-client",   # a chaincast agent starts others (--launch tree)
    "/usr/sbin/sfdisk": "fdisk", "/usr/bin/partx": "util-linux", "/usr/sbin/wipefs":
    "util-linux", "/usr/sbin/blkid": "util-linux", "/usr/bin/findmnt": "util-linux",
    "/usr/bin/mountpoint": "util-linux", "/usr/bin/mount": "mount", "/usr/bin/umount": "mount",
    "/usr/sbin/mkswap": "util-linux", "/usr/sbin/mkfs": "util-linux",
    "/usr/sbin/mke2fs": "e2fsprogs",
    "/usr/sbin/mkfs.xfs": "xfsprogs", "/usr/sbin/mkfs.fat": "dosfstools",
    "/usr/bin/tar": "tar", "/usr/bin/gzip": "gzip", "/usr/bin/bzip2": "bzip2",
    "/usr/bin/xz": "xz-utils", "/usr/bin/zstd": "zstd", "/usr/bin/dd": "coreutils",
    "/usr/bin/sync": "coreutils", "/usr/bin/sha256sum": "coreutils",
    "/usr/sbin/kexec": "kexec-tools", "/usr/sbin/grub-install": "grub2-common",
    "/usr/sbin/grub-probe": "grub-common", "/usr/bin/efibootmgr": "efibootmgr",
    str(PYTHON): "python3",
}
# other names of the same programs (mke2fs knows its file system from its name)
ALIASES = {"/usr/sbin/mkfs.ext2": "/usr/sbin/mke2fs", "/usr/sbin/mkfs.ext3": "/usr/sbin/mke2fs",
           "/usr/sbin/mkfs.ext4": "/usr/sbin/mke2fs", "/usr/sbin/mkfs.vfat": "/usr/sbin/mkfs.fat",
           "/usr/bin/python3": str(PYTHON)}
GRUB_PLATFORMS = ("i386-pc", "x86_64-efi")
DATA = ("/etc/mke2fs.conf",)
# what the chaincast agent and its sinks import on the node
PYTHON_IMPORTS = ("json, socket, selectors, threading, marshal, mmap, struct, hashlib, "
                  "tarfile, gzip, bz2, lzma, zstandard, ctypes, resource, subprocess, "
                  "select, signal, errno, stat, functools, io, time, base64, shlex, tempfile")

# the parts of an init both the deployment environment and the test systems run
NETWORK_UP = """ip link set lo up
for i in $(seq 50); do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done
ip link set eth0 up
udhcpc -i eth0 -s /etc/udhcpc.script -q -n -t 10 -T 2 || echo "kabin: no DHCP lease"
"""
SERVE = """/usr/sbin/sshd -e -f /etc/ssh/sshd_config
# busybox's reboot and poweroff signal PID 1: do what they ask
trap 'sync; BEFORE_OFFreboot -f' TERM
trap 'sync; BEFORE_OFFpoweroff -f' USR1 USR2
setsid sh -c 'exec sh </dev/ttyS0 >/dev/ttyS0 2>&1' &
while :; do sleep 3600 & wait $!; done
"""


def serve(before_off=""):
    """The end of an init: sshd, busybox's reboot and poweroff, a shell on ttyS0."""
    return SERVE.replace("BEFORE_OFF", before_off)


INIT = """#!/bin/sh
# The deployment environment's init (kabin.deployenv): network, marker port, sshd.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run/sshd /tmp /mnt/dest /var/log
mount -t devpts devpts /dev/pts
ln -sf /proc/mounts /etc/mtab
while read -r module; do insmod "/lib/modules/$module" 2>/dev/null; done < /lib/modules/order
[ -d /sys/firmware/efi ] && mount -t efivarfs efivarfs /sys/firmware/efi/efivars
""" + NETWORK_UP + """echo "KABIN-CMDLINE $(cat /proc/cmdline)"
echo "KABIN-DEPLOY $(ip -4 -o addr show dev eth0 | awk '{print $4}')"
nc -ll -p MARKER_PORT -e true &
""" + serve()

UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
  deconfig) ip -4 addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    for r in $router; do ip route add default via "$r" dev "$interface"; break; done
    [ -n "$hostname" ] && hostname "$hostname"
    ;;
esac
exit 0
"""

SSHD_CONFIG = """Port 22
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
AuthorizedKeysFile /root/.ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
PrintMotd no
PrintLastLog no
PidFile /run/sshd.pid
Subsystem sftp internal-sftp
"""

ETC = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nsshd:x:100:65534::/run/sshd:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "etc/shadow": "root:*:19000:0:99999:7:::\nsshd:*:19000:0:99999:7:::\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files\n",
    "etc/hosts": "127.0.0.1 localhost\n",
    "etc/udhcpc.script": UDHCPC_SCRIPT,
    "etc/ssh/sshd_config": SSHD_CONFIG,
}


def missing_programs():
    """[(program, package)] of what this host lacks to build the environment."""
    needed = dict(PROGRAMS)
    needed.update({f"/usr/lib/grub/{p}": f"grub-{'pc' if p == 'i386-pc' else 'efi-amd64'}-bin"
                   for p in GRUB_PLATFORMS})
    needed["/usr/lib/python3/dist-packages/zstandard"] = "python3-zstandard"
    return [(path, package) for path, package in needed.items() if not Path(path).exists()]


def check_host():
    missing = missing_programs()
    if missing:
        raise SystemRequirementError(
            f"the deployment environment is built from this host's files; missing: "
            f"{', '.join(p for p, _ in missing)} (apt-get install "
            f"{' '.join(sorted({pkg for _, pkg in missing}))})")


# ---------------------------------------------------------------- what goes in

def _python_files():
    """The files of the python modules the agent imports (the closure, found by importing
    them with the node's python), with their compiled bytecode when the host has it."""
    script = (f"import sys, {PYTHON_IMPORTS}\n"
              "print('\\n'.join(sorted({m.__file__ for m in list(sys.modules.values())\n"
              "                         if getattr(m, '__file__', None)})))")
    files = []
    for name in run([str(PYTHON), "-c", script]).split():
        path = Path(name)
        files.append(path)
        if path.suffix == ".py":
            compiled = path.parent / "__pycache__" / f"{path.stem}.cpython-311.pyc"
            if compiled.exists():
                files.append(compiled)
    return files


def _add_programs(archive):
    for program in PROGRAMS:
        archive.binary(program)
    for alias, program in ALIASES.items():
        archive.link(alias, program)
    for path in _python_files():
        (archive.binary if path.suffix == ".so" else archive.host_file)(path)
    for platform in GRUB_PLATFORMS:
        archive.host_tree(Path("/usr/lib/grub") / platform, skip=("monolithic",))
    for path in DATA:
        if Path(path).exists():
            archive.host_file(path)


def _add_modules(archive, modules_dir):
    order = kernel_mod.module_files(modules_dir)
    for rel in order:
        archive.host_file(Path(modules_dir) / rel, f"lib/modules/{Path(rel).name}", 0o644)
    archive.file("lib/modules/order", "".join(f"{Path(r).name}\n" for r in order))


def _add_system(archive, authorized_keys, marker_port):
    for directory, mode in (("proc", 0o755), ("sys", 0o755), ("dev", 0o755), ("run", 0o755),
                            ("tmp", 0o1777), ("root", 0o700), ("root/.ssh", 0o700),
                            ("var/empty", 0o755), ("mnt", 0o755)):
        archive.dir(directory, mode)
    archive.device("dev/console", 5, 1)
    archive.device("dev/null", 1, 3, 0o666)
    add_ssh_files(archive, authorized_keys, "kabin-deployenv")
    archive.file("init", INIT.replace("MARKER_PORT", str(marker_port)), 0o755)


def add_ssh_files(archive, authorized_keys, comment):
    """/etc (users, sshd, udhcpc), a new host key, root's authorized_keys."""
    with tempfile.TemporaryDirectory() as keys:
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", f"{keys}/key"])
        archive.host_file(f"{keys}/key", "etc/ssh/ssh_host_ed25519_key", 0o600)
        archive.host_file(f"{keys}/key.pub", "etc/ssh/ssh_host_ed25519_key.pub", 0o644)
    archive.dir("root", 0o700)
    archive.dir("root/.ssh", 0o700)
    archive.file("root/.ssh/authorized_keys", authorized_keys, 0o600)
    for name, text in ETC.items():
        mode = 0o600 if name == "etc/shadow" else 0o755 if name.endswith(".script") else 0o644
        archive.file(name, text, mode)


def build_initrd(path, modules_dir, authorized_keys, marker_port):
    """Write the deployment environment's initramfs (gzip) to ``path``; its size."""
    check_host()
    archive = Archive()
    busybox = Path("/bin/busybox")
    for applet in run([str(busybox), "--list-full"]).split():   # host programs replace them
        archive.link(applet, "/bin/busybox")
    _add_programs(archive)
    _add_modules(archive, modules_dir)
    _add_system(archive, authorized_keys, marker_port)
    data = gzip.compress(archive.bytes(), compresslevel=6, mtime=0)
    _write_atomically(Path(path), data)
    return len(data)


def _write_atomically(path, data):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---------------------------------------------------------------- the whole environment

def build(kernel_path, initrd_path, authorized_keys, marker_port, kernel_deb=None):
    """Write the kernel to ``kernel_path`` and a fresh initramfs to ``initrd_path``.

    ``kernel_deb``: a Debian kernel package to use (default: linux-image-amd64's
    current one, downloaded once). Returns {"kernel", "initrd", "version",
    "kernel_bytes", "initrd_bytes"}."""
    check_host()
    deb = Path(kernel_deb) if kernel_deb else kernel_mod.download()
    with tempfile.TemporaryDirectory(prefix="kabin-deployenv.") as work:
        kernel = kernel_mod.unpack(deb, work)
        for target in (kernel_path, initrd_path):
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        progress.info("deployenv: initramfs for %s", kernel.version)
        size = build_initrd(initrd_path, kernel.modules, authorized_keys, marker_port)
        _write_atomically(Path(kernel_path), kernel.vmlinuz.read_bytes())
    log.info("deployment environment: %s (%s) and %s (%.1f MB)", kernel_path,
             kernel.version, initrd_path, size / 2**20)
    return {"kernel": str(kernel_path), "initrd": str(initrd_path), "version": kernel.version,
            "kernel_bytes": Path(kernel_path).stat().st_size, "initrd_bytes": size}
