"""A small bootable system to deploy (ka-testbed mkenv --real): its own kernel and initrd.

The tree is a real, if minimal, Linux system: busybox, the host's OpenSSH sshd
(root by the key of server.yml, as kabin reaches deployed nodes), kexec-tools
(so a deployed node can be kexec'ed back into the deployment kernel), findmnt
and efibootmgr (to see what booted), Debian's
kernel in /boot with an initramfs that loads the disk and NIC modules, mounts
``root=`` (a device, UUID= or LABEL=) and switches to it, and the Debian-style
links /vmlinuz and /initrd.img. Its /sbin/init takes a DHCP lease, runs sshd
and says on the console what it booted (``KABIN-SYSTEM name kernel root``).
"""

import gzip
import os
import stat
from pathlib import Path

from . import NETWORK_UP, PROGRAMS, add_ssh_files, serve
from . import kernel as kernel_mod
from .initramfs import Archive
from .kernel import run

SYSTEM_PROGRAMS = ("/bin/busybox", "/usr/sbin/sshd", "/usr/sbin/kexec", "/usr/bin/findmnt",
                   "/usr/bin/efibootmgr")

SYSTEM_INIT = """#!/bin/sh
# init of a kabin test system (kabin.deployenv.system)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts; mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /tmp; mkdir -p /run/sshd
mount -o remount,rw /
[ -d /sys/firmware/efi ] && mount -t efivarfs efivarfs /sys/firmware/efi/efivars
hostname -F /etc/hostname
""" + NETWORK_UP + """\
echo "KABIN-SYSTEM $(cat /etc/hostname) $(uname -r) root=$(findmnt -n -o SOURCE / 2>/dev/null)"
""" + serve("mount -o remount,ro /; ")

INITRD_INIT = """#!/bin/sh
# initramfs of a kabin test system: modules, root=, switch_root
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
while read -r module; do insmod "/lib/modules/$module" 2>/dev/null; done < /lib/modules/order
root=$(sed -n 's/.*\\broot=\\([^ ]*\\).*/\\1/p' /proc/cmdline)
case "$root" in UUID=*|LABEL=*) for i in $(seq 100); do
    device=$(findfs "$root" 2>/dev/null) && break; sleep 0.1; done; root=$device ;; esac
for i in $(seq 100); do [ -b "$root" ] && break; sleep 0.1; done
mkdir -p /newroot
if ! mount -o ro "$root" /newroot; then
    echo "kabin-initrd: cannot mount the root file system '$root'"; exec sh
fi
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /sbin/init
"""


def _base(archive):
    for applet in run(["/bin/busybox", "--list-full"]).split():
        archive.link(applet, "/bin/busybox")
    archive.host_file("/bin/busybox", "bin/busybox", 0o755)      # static: no libraries
    for directory, mode in (("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("run", 0o755),
                            ("tmp", 0o1777), ("mnt", 0o755), ("boot", 0o755)):
        archive.dir(directory, mode)


def system_initrd(path, modules_dir):
    """The system's initramfs: busybox, the modules, an init that mounts root=."""
    archive = Archive()
    _base(archive)
    order = kernel_mod.module_files(modules_dir)
    for rel in order:
        archive.host_file(Path(modules_dir) / rel, f"lib/modules/{Path(rel).name}", 0o644)
    archive.file("lib/modules/order", "".join(f"{Path(r).name}\n" for r in order))
    archive.device("dev/console", 5, 1)
    archive.file("init", INITRD_INIT, 0o755)
    Path(path).write_bytes(gzip.compress(archive.bytes(), compresslevel=6, mtime=0))


def build_tree(root, name, kernel, authorized_keys):
    """The system ``name`` in the (new) directory ``root``; ``kernel``: a kernel.Kernel."""
    archive = Archive()
    _base(archive)
    for program in SYSTEM_PROGRAMS:
        if not Path(program).exists():
            raise FileNotFoundError(f"{program} (apt-get install {PROGRAMS[program]})")
        archive.binary(program)
    archive.dir("var/empty", 0o755)
    archive.dir("var/log", 0o755)
    add_ssh_files(archive, authorized_keys, "kabin-system")
    archive.file("etc/hostname", f"{name}\n")
    archive.file("etc/os-release", f'NAME="kabin test system"\nID=kabin-system\n'
                                   f'VARIANT_ID={name}\nPRETTY_NAME="kabin test system {name}"\n')
    archive.file("etc/fstab", "# the root file system is the kernel's root=\n")
    archive.file("sbin/init", SYSTEM_INIT, 0o755)
    archive.host_file(kernel.vmlinuz, f"boot/vmlinuz-{kernel.version}", 0o644)
    archive.link("vmlinuz", f"boot/vmlinuz-{kernel.version}")
    archive.link("initrd.img", f"boot/initrd.img-{kernel.version}")
    write_tree(archive, Path(root))
    system_initrd(Path(root) / "boot" / f"initrd.img-{kernel.version}", kernel.modules)
    return Path(root)


def write_tree(archive, root):
    """The archive's entries as files under ``root`` (devices are left to devtmpfs)."""
    root.mkdir(mode=0o755)
    for path in sorted(archive.entries, key=lambda p: (p.count("/"), p)):
        mode, data, _ = archive.entries[path]
        target = root / path
        if stat.S_ISDIR(mode):
            target.mkdir(exist_ok=True)
            target.chmod(stat.S_IMODE(mode))
        elif stat.S_ISLNK(mode):
            os.symlink(data.decode(), target)
        elif stat.S_ISREG(mode):
            target.write_bytes(data)
            target.chmod(stat.S_IMODE(mode))
