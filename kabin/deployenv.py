"""The deployment environment: a Debian kernel and an initramfs made of the host's files.

Why the host's own files and not a debootstrap: the environment is booted from
RAM on every deployment, so it must be small (a few MB, not a root file system)
and it must run exactly the tools kabin's steps were tested with. The kernel is
Debian's (``linux-image-amd64``'s current package, downloaded with apt-get and
unpacked, never installed); from its modules only those the machines need are
kept (NICs, disks, file systems). The initramfs holds busybox (the shell and the
small tools: udhcpc, ip, mount...), the host's OpenSSH sshd with the libraries
``ldd`` names, the modules, and an ``/init`` that brings the network up by DHCP,
opens the deploy marker port and runs sshd as root, accepting one key.

Reproducible: the archive's entries are sorted, with fixed owners and times
(only the host key, made at each build, differs).
"""

import gzip
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from .errors import SystemRequirementError

log = logging.getLogger(__name__)
progress = logging.getLogger("kabin.progress")

CACHE = Path("/var/cache/kabin/kernel")
BUSYBOX = Path("/bin/busybox")
SSHD = Path("/usr/sbin/sshd")
# the machines' devices: NICs, disk controllers, file systems (with what they need)
MODULES = ("e1000", "virtio_pci", "virtio_net", "virtio_blk", "ahci", "ata_piix", "sd_mod",
           "crc32c_generic", "crct10dif_generic",
           "ext4", "vfat", "xfs", "nls_cp437", "nls_ascii")
TIMEOUT = 600

INIT = """#!/bin/sh
# The deployment environment's init (kabin.deployenv): network, marker port, sshd.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run/sshd /tmp /mnt/dest /var/log
mount -t devpts devpts /dev/pts
while read -r module; do insmod "/lib/modules/$module" 2>/dev/null; done < /lib/modules/order
ip link set lo up
for i in $(seq 50); do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done
ip link set eth0 up
udhcpc -i eth0 -s /etc/udhcpc.script -q -n -t 10 -T 2 || echo "kabin-deploy: no DHCP lease"
echo "KABIN-CMDLINE $(cat /proc/cmdline)"
echo "KABIN-DEPLOY $(ip -4 -o addr show dev eth0 | awk '{print $4}')"
nc -ll -p {marker_port} -e true &
/usr/sbin/sshd -e -f /etc/ssh/sshd_config
# busybox's reboot and poweroff signal PID 1: do what they ask
trap 'sync; reboot -f' TERM
trap 'sync; poweroff -f' USR1 USR2
setsid sh -c 'exec sh </dev/ttyS0 >/dev/ttyS0 2>&1' &
while :; do sleep 3600 & wait $!; done
"""

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
"""

ETC = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nsshd:x:100:65534::/run/sshd:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "etc/shadow": "root:*:19000:0:99999:7:::\nsshd:*:19000:0:99999:7:::\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\nhosts: files\n",
    "etc/hosts": "127.0.0.1 localhost\n",
}


def _run(argv, **kwargs):
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)
    except FileNotFoundError:
        raise SystemRequirementError(f"{argv[0]} is missing") from None
    except subprocess.TimeoutExpired:
        raise SystemRequirementError(f"{' '.join(argv)} did not finish in {TIMEOUT} s") from None
    if done.returncode != 0:
        raise SystemRequirementError(f"{' '.join(argv)} failed: {done.stderr.strip()[-300:]}")
    return done.stdout


# ---------------------------------------------------------------- the kernel

def kernel_package():
    """The versioned package linux-image-amd64 depends on (e.g. linux-image-6.1.0-57-amd64)."""
    for line in _run(["apt-cache", "depends", "linux-image-amd64"]).splitlines():
        name = line.strip().removeprefix("Depends:").strip()
        if line.strip().startswith("Depends:") and name.startswith("linux-image-"):
            return name
    raise SystemRequirementError("apt-cache knows no linux-image-amd64 (apt-get update?)")


def fetch_kernel(cache=CACHE):
    """(vmlinuz, modules directory) of Debian's kernel, unpacked once into ``cache``."""
    found = sorted(cache.glob("*/vmlinuz"))
    if found:
        return found[-1], found[-1].parent / "modules"
    package = kernel_package()
    progress.info("deployenv: downloading %s (once, into %s)", package, cache)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as work:
        _run(["apt-get", "download", "-q", package], cwd=work)
        deb = next(Path(work).glob(f"{package}_*.deb"))
        _run(["dpkg-deb", "-x", str(deb), f"{work}/x"])
        version = package.removeprefix("linux-image-")
        target = Path(work) / version
        modules = target / "modules"
        source = Path(work) / "x" / "lib" / "modules" / version
        for rel in _module_files(source):
            (modules / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(source / rel, modules / rel)
        os.replace(next((Path(work) / "x" / "boot").glob("vmlinuz-*")), target / "vmlinuz")
        os.replace(target, cache / version)
    return cache / version / "vmlinuz", cache / version / "modules"


def _module_index(modules_dir):
    """{module name: path of its .ko relative to ``modules_dir``}."""
    return {p.name.split(".ko")[0].replace("-", "_"): str(p.relative_to(modules_dir))
            for p in Path(modules_dir).rglob("*.ko")}


def _depends(ko_file):
    """The modules a .ko needs: its modinfo's ``depends=`` (NUL-separated strings)."""
    match = re.search(rb"(?:^|\0)depends=([^\0]*)\0", Path(ko_file).read_bytes())
    return [d.replace("-", "_") for d in match.group(1).decode().split(",") if d] \
        if match else []


def _module_files(modules_dir):
    """The .ko files MODULES need, in load order (a module after what it needs)."""
    index, order = _module_index(modules_dir), []

    def visit(name):
        rel = index.get(name)
        if rel is None or rel in order:       # built in, or seen
            return
        for needed in _depends(Path(modules_dir) / rel):
            visit(needed)
        order.append(rel)

    for name in MODULES:
        visit(name)
    return order


# ---------------------------------------------------------------- the initramfs

class _Archive:
    """A newc cpio archive built in memory, entries sorted (parents first)."""

    def __init__(self):
        self.entries = {}

    def dir(self, path, mode=0o755):
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self.entries.setdefault("/".join(parts[:i]), (stat.S_IFDIR | 0o755, b"", (0, 0)))
        self.entries[path.strip("/")] = (stat.S_IFDIR | mode, b"", (0, 0))

    def file(self, path, data, mode=0o644):
        path = path.strip("/")
        parent = path.rpartition("/")[0]
        if parent and parent not in self.entries:
            self.dir(parent)
        self.entries[path] = (stat.S_IFREG | mode, data if isinstance(data, bytes)
                              else data.encode(), (0, 0))

    def link(self, path, target):
        self.file(path, target)
        self.entries[path.strip("/")] = (stat.S_IFLNK | 0o777, target.encode(), (0, 0))

    def device(self, path, major, minor, mode=0o600):
        self.entries[path.strip("/")] = (stat.S_IFCHR | mode, b"", (major, minor))

    def host_file(self, source, path=None, mode=None):
        source = Path(source)
        self.file(path or str(source), source.read_bytes(),
                  mode if mode is not None else stat.S_IMODE(source.stat().st_mode))

    def binary(self, source):
        """An ELF program and every shared library ldd names for it."""
        self.host_file(source)
        for line in _run(["ldd", str(source)]).splitlines():
            match = re.search(r"(/\S+)\s+\(0x", line)
            if match:
                self.host_file(os.path.realpath(match.group(1)), match.group(1), 0o755)

    def bytes(self):
        out = bytearray()
        ordered = sorted(self.entries, key=lambda p: (p.count("/"), p))
        for number, path in enumerate(ordered + ["TRAILER!!!"], 1):
            mode, data, rdev = self.entries.get(path, (0, b"", (0, 0)))
            fields = [number, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1],
                      len(path) + 1, 0]
            out += b"070701" + b"".join(b"%08X" % f for f in fields) + path.encode() + b"\0"
            out += b"\0" * (-len(out) % 4) + data
            out += b"\0" * (-len(out) % 4)
        return bytes(out)


def install(pxe_root, kernel_path, initrd_path, authorized_keys, marker_port):
    """The kernel and a fresh initramfs at ``kernel_path`` and ``initrd_path`` (relative to
    ``pxe_root``, as the cluster's boot.kernels.deploy names them)."""
    vmlinuz, modules = fetch_kernel()
    kernel = Path(pxe_root) / kernel_path
    kernel.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(vmlinuz, kernel)
    initrd = Path(pxe_root) / initrd_path
    initrd.parent.mkdir(parents=True, exist_ok=True)
    size = build_initrd(initrd, modules, authorized_keys, marker_port)
    log.info("deployment environment: %s and %s (%.1f MB)", kernel, initrd, size / 2**20)


def build_initrd(path, modules_dir, authorized_keys, marker_port):
    """Write the deployment environment's initramfs (gzip) to ``path``; its size."""
    for need, package in ((BUSYBOX, "busybox-static"), (SSHD, "openssh-server")):
        if not need.exists():
            raise SystemRequirementError(f"{need} is missing (apt-get install {package})")
    archive = _Archive()
    archive.host_file(BUSYBOX, "bin/busybox", 0o755)
    for applet in _run([str(BUSYBOX), "--list-full"]).split():
        if applet != "bin/busybox":
            archive.link(applet, "/bin/busybox")
    for directory, mode in (("proc", 0o755), ("sys", 0o755), ("dev", 0o755), ("run", 0o755),
                            ("tmp", 0o1777), ("root", 0o700), ("root/.ssh", 0o700),
                            ("var/empty", 0o755), ("mnt", 0o755)):
        archive.dir(directory, mode)
    archive.device("dev/console", 5, 1)
    archive.device("dev/null", 1, 3, 0o666)
    archive.binary(SSHD)
    order = _module_files(modules_dir)
    for rel in order:
        archive.host_file(Path(modules_dir) / rel, f"lib/modules/{Path(rel).name}", 0o644)
    archive.file("lib/modules/order", "".join(f"{Path(r).name}\n" for r in order))
    with tempfile.TemporaryDirectory() as keys:
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "kabin-deployenv",
              "-f", f"{keys}/key"])
        archive.host_file(f"{keys}/key", "etc/ssh/ssh_host_ed25519_key", 0o600)
        archive.host_file(f"{keys}/key.pub", "etc/ssh/ssh_host_ed25519_key.pub", 0o644)
    archive.file("etc/ssh/sshd_config", SSHD_CONFIG)
    archive.file("root/.ssh/authorized_keys", authorized_keys, 0o600)
    for name, text in ETC.items():
        archive.file(name, text, 0o600 if name == "etc/shadow" else 0o644)
    archive.file("etc/udhcpc.script", UDHCPC_SCRIPT, 0o755)
    archive.file("init", INIT.replace("{marker_port}", str(marker_port)), 0o755)
    data = gzip.compress(archive.bytes(), compresslevel=6, mtime=0)
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return len(data)
