"""Real network-boot firmware under QEMU, for the ka-pxe tests.

What a PXE test needs besides ka-pxe itself: a small Linux kernel (Debian's,
unpacked from its package, never installed into the host's /boot), an initrd
whose init prints a marker and the kernel command line on the serial console
then powers off, a disk image whose boot sectors print which one was booted,
the boot loaders copied into the TFTP tree (pxelinux.0 and its modules,
``grub-mknetdir``'s core.0, ipxe.lkrn), and a VM (``-accel tcg``: the KVM
device of these machines does not run ordinary guests) booted from QEMU's
built-in DHCP/TFTP server with a bounded wait on its serial console.
"""

import gzip
import io
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

QEMU = "qemu-system-x86_64"
BUSYBOX = Path("/bin/busybox")
PXELINUX = Path("/usr/lib/PXELINUX/pxelinux.0")
SYSLINUX_MODULES = Path("/usr/lib/syslinux/modules/bios")
GRUB_PC = Path("/usr/lib/grub/i386-pc")
IPXE_LKRN = Path("/usr/lib/ipxe/ipxe.lkrn")
IPXE_QEMU_ROM = Path("/usr/lib/ipxe/qemu/efi-e1000.rom")

# Debian 12 packages: the firmware, the loaders, the initrd's shell, a kernel.
APT_PACKAGES = ("qemu-system-x86", "ipxe-qemu", "ipxe", "pxelinux", "syslinux-common",
                "grub-pc-bin", "grub-common", "busybox-static")

BOOT_MARKER = "KABIN-BOOTED"
CMDLINE_MARKER = "KABIN-CMDLINE"
DISK_MARKER = "KABIN-DISK"


def missing_requirements():
    """Why the firmware tests cannot run here, or None when everything is present."""
    needs = {
        "qemu-system-x86_64 (apt: qemu-system-x86)": shutil.which(QEMU),
        f"{IPXE_QEMU_ROM} (apt: ipxe-qemu)": IPXE_QEMU_ROM.exists(),
        f"{IPXE_LKRN} (apt: ipxe)": IPXE_LKRN.exists(),
        f"{PXELINUX} (apt: pxelinux)": PXELINUX.exists(),
        f"{SYSLINUX_MODULES}/chain.c32 (apt: syslinux-common)":
            (SYSLINUX_MODULES / "chain.c32").exists(),
        "grub-mknetdir and i386-pc modules (apt: grub-common, grub-pc-bin)":
            shutil.which("grub-mknetdir") and (GRUB_PC / "pxe.mod").exists(),
        f"{BUSYBOX} (apt: busybox-static)": BUSYBOX.exists(),
    }
    absent = [what for what, present in needs.items() if not present]
    return "missing: " + ", ".join(absent) if absent else None


# ---------------------------------------------------------------- the kernel

def find_kernel(cache_dir):
    """A Debian kernel image: $KABIN_TEST_KERNEL, else one unpacked (once) into ``cache_dir``
    from Debian's package (only its vmlinuz is kept). Returns (path, None) or (None, reason).
    """
    if os.environ.get("KABIN_TEST_KERNEL"):
        return Path(os.environ["KABIN_TEST_KERNEL"]), None
    cache_dir = Path(cache_dir)
    found = sorted(cache_dir.glob("vmlinuz-*"))
    if found:
        return found[-1], None
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        return None, "no kernel: set KABIN_TEST_KERNEL (apt-get/dpkg are not available)"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as work:
        try:
            package = _kernel_package()
            subprocess.run(["apt-get", "download", "-q", package], cwd=work, check=True,
                           capture_output=True, timeout=300)
            deb = next(Path(work).glob(f"{package}_*.deb"))
            subprocess.run(["dpkg", "-x", str(deb), f"{work}/x"], check=True,
                           capture_output=True, timeout=300)
            for image in Path(work).glob("x/boot/vmlinuz-*"):
                os.replace(image, cache_dir / image.name)
        except (subprocess.SubprocessError, StopIteration, OSError) as exc:
            return None, f"no kernel: cannot download Debian's kernel package ({exc})"
    found = sorted(cache_dir.glob("vmlinuz-*"))
    return (found[-1], None) if found else (None, "no kernel: the package held no vmlinuz")


def _kernel_package():
    """The versioned package linux-image-amd64 depends on (e.g. linux-image-6.1.0-56-amd64)."""
    out = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    for line in out.splitlines():
        name = line.strip().removeprefix("Depends:").strip()
        if line.strip().startswith("Depends:") and name.startswith("linux-image-"):
            return name
    raise OSError("apt-cache knows no linux-image-amd64")


# ---------------------------------------------------------------- the initrd

def _cpio_entry(name, mode, data=b"", rdev=(0, 0)):
    """One entry of a cpio archive in the "newc" format the kernel unpacks."""
    fields = [0, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    blob = header + name.encode() + b"\0"
    blob += b"\0" * (-len(blob) % 4) + data
    return blob + b"\0" * (-len(blob) % 4)


def write_initrd(path, marker):
    """A gzipped initramfs: busybox and an init printing ``marker`` and /proc/cmdline."""
    init = (
        "#!/bin/busybox sh\n"
        "/bin/busybox mount -t proc proc /proc\n"
        f"/bin/busybox echo '{BOOT_MARKER} {marker}'\n"
        f"/bin/busybox echo \"{CMDLINE_MARKER} $(/bin/busybox cat /proc/cmdline)\"\n"
        "/bin/busybox poweroff -f\n"
    ).encode()
    archive = b"".join([
        _cpio_entry("dev", 0o040755), _cpio_entry("proc", 0o040755), _cpio_entry("bin", 0o040755),
        _cpio_entry("dev/console", 0o020600, rdev=(5, 1)),
        _cpio_entry("bin/busybox", 0o100755, BUSYBOX.read_bytes()),
        _cpio_entry("init", 0o100755, init),
        _cpio_entry("TRAILER!!!", 0),
    ])
    Path(path).write_bytes(gzip.compress(archive, compresslevel=1))


# ---------------------------------------------------------------- the disk

def _marker_sector(message):
    """A boot sector (real mode, loaded at 0:7C00) that writes ``message`` to COM1 and
    ends QEMU through the isa-debug-exit port 0xF4."""
    text = message.encode() + b"\r\n\0"
    code_size = 0x1B
    address = 0x7C00 + code_size
    code = bytes([
        0xFA, 0xFC,                              # cli; cld
        0x31, 0xC0, 0x8E, 0xD8,                  # xor ax,ax; mov ds,ax
        0xBE, address & 0xFF, address >> 8,      # mov si, message
        0xBA, 0xF8, 0x03,                        # mov dx, 0x3F8 (COM1 data)
        0xAC, 0x84, 0xC0, 0x74, 0x03,            # next: lodsb; test al,al; jz done
        0xEE, 0xEB, 0xF8,                        # out dx,al; jmp next
        0xB0, 0x00, 0xE6, 0xF4,                  # done: mov al,0; out 0xF4,al
        0xF4, 0xEB, 0xFD,                        # hang: hlt; jmp hang
    ])
    assert len(code) == code_size
    sector = bytearray(512)
    sector[:code_size + len(text)] = code + text
    sector[510:512] = b"\x55\xaa"
    return sector


def write_disk(path, partitions=4, part_sectors=256):
    """A 1 MiB disk: its MBR prints ``KABIN-DISK MBR``, partition N's boot sector
    ``KABIN-DISK PART<N>`` (an MS-DOS table of ``partitions`` primary partitions)."""
    image = bytearray(2048 * 512)
    mbr = _marker_sector(f"{DISK_MARKER} MBR")
    for number in range(1, partitions + 1):
        start = number * part_sectors
        entry = bytes([0x00, 0xFE, 0xFF, 0xFF, 0x83, 0xFE, 0xFF, 0xFF])
        entry += start.to_bytes(4, "little") + part_sectors.to_bytes(4, "little")
        mbr[446 + 16 * (number - 1):446 + 16 * number] = entry
        image[start * 512:(start + 1) * 512] = _marker_sector(f"{DISK_MARKER} PART{number}")
    image[:512] = mbr
    Path(path).write_bytes(image)


# ---------------------------------------------------------------- the loaders in the tree

def install_loaders(tree):
    """Copy the network boot programs where ka-pxe's templates chain to them:
    pxelinux.0 (+ the modules chain.c32 needs), grub/i386-pc/core.0, ipxe.lkrn."""
    tree = Path(tree)
    tree.mkdir(parents=True, exist_ok=True)
    shutil.copy(PXELINUX, tree / "pxelinux.0")
    for module in ("ldlinux.c32", "chain.c32", "libcom32.c32", "libutil.c32"):
        shutil.copy(SYSLINUX_MODULES / module, tree / module)
    shutil.copy(IPXE_LKRN, tree / "ipxe.lkrn")
    subprocess.run(["grub-mknetdir", f"--net-directory={tree}", "--subdir=grub",
                    f"--directory={GRUB_PC}"], check=True, capture_output=True, timeout=120)


# ---------------------------------------------------------------- a VM

class Boot:
    """One VM network-booting ``bootfile`` from ``tree``; its serial console is collected."""

    def __init__(self, tree, bootfile, mac, address, disk=None, hostname=None, memory=256):
        net = ".".join(address.split(".")[:3])
        netdev = (f"user,id=n0,restrict=on,net={net}.0/24,host={net}.2,dhcpstart={address},"
                  f"tftp={tree},bootfile={bootfile}")
        if hostname:  # DHCP option 12, which iPXE and GRUB offer as a variable
            netdev += f",hostname={hostname}"
        self.argv = [QEMU, "-accel", "tcg", "-machine", "pc", "-m", str(memory),
                     "-display", "none", "-vga", "none", "-device", "sga", "-monitor", "none",
                     "-serial", "stdio", "-no-reboot",
                     # only the NIC boots (a failed network boot must not fall back to the
                     # disk and look like a local boot); SeaBIOS then reboots = QEMU exits
                     "-boot", "strict=on,reboot-timeout=1000",
                     "-netdev", netdev, "-device", f"e1000,netdev=n0,mac={mac},bootindex=1",
                     "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
        if disk:
            self.argv += ["-drive", f"file={disk},format=raw,if=ide,snapshot=on"]
        self.console = ""
        self.timed_out = False

    def run(self, timeout):
        """Boot and wait (at most ``timeout`` s) for the VM to power off; return the console."""
        with tempfile.TemporaryFile() as out:
            proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.timed_out = True
                proc.kill()
                proc.wait(10)
            out.seek(0)
            self.console = out.read().decode("utf-8", "replace")
        return self.console

    def line(self, marker):
        """The text after ``marker`` on the first console line holding it, or None."""
        for line in io.StringIO(self.console):
            if marker in line:
                return line.split(marker, 1)[1].strip()
        return None
