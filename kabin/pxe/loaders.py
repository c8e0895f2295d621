"""The boot programs each PXE method needs, installed into the server's pxe_root.

They come from Debian's packages (the paths below); what a node's firmware loads
first over TFTP is its *boot file* (what the DHCP server names, see ``dhcp``):

============  =======================  ============================  =====================
method        BIOS boot file           UEFI boot file                also installed
============  =======================  ============================  =====================
pxelinux      pxelinux.0               (none)                        ldlinux.c32 and the
                                                                     modules of chain.c32
grub          grub/i386-pc/core.0      grub/x86_64-efi/core.efi      grub-mknetdir's modules
ipxe          undionly.kpxe            ipxe.efi                      ipxe.lkrn (chainloading)
============  =======================  ============================  =====================

PXELINUX boots BIOS clients only (as Kadeploy's PXElinux): syslinux.efi finds its
modules and profiles under its own directory, which is not where ka-pxe writes them,
so a cluster with UEFI nodes uses grub or ipxe. An iPXE client (QEMU's NIC ROM, or undionly.kpxe / ipxe.efi once loaded) gets its
profile script instead of a boot file. Installing is idempotent: a file whose
content is already there is left alone, others are replaced atomically; every
source is checked before anything is written.
"""

import filecmp
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import SystemRequirementError, UsageError

FIRMWARES = ("bios", "uefi")
SYSLINUX_BIOS = Path("/usr/lib/syslinux/modules/bios")
GRUB_PLATFORMS = {"bios": ("i386-pc", "core.0"), "uefi": ("x86_64-efi", "core.efi")}
GRUB_LIB = Path("/usr/lib/grub")
GRUB_SUBDIR = "grub"
GRUB_TIMEOUT = 120

# (method, firmware) -> [(file in pxe_root, source, Debian package)]; the first is the boot file
_COPIES = {
    ("pxelinux", "bios"): [("pxelinux.0", "/usr/lib/PXELINUX/pxelinux.0", "pxelinux")] + [
        (m, str(SYSLINUX_BIOS / m), "syslinux-common")
        for m in ("ldlinux.c32", "chain.c32", "libcom32.c32", "libutil.c32")],
    ("ipxe", "bios"): [("undionly.kpxe", "/usr/lib/ipxe/undionly.kpxe", "ipxe"),
                       ("ipxe.lkrn", "/usr/lib/ipxe/ipxe.lkrn", "ipxe")],
    ("ipxe", "uefi"): [("ipxe.efi", "/usr/lib/ipxe/ipxe.efi", "ipxe")],
}
_GRUB_PACKAGES = {"bios": "grub-pc-bin", "uefi": "grub-efi-amd64-bin"}


def supports(method, firmware):
    return method != "pxelinux" or firmware == "bios"


def boot_file(method, firmware):
    """What a ``firmware`` client of ``method`` loads first, relative to pxe_root."""
    if method == "grub":
        platform, image = GRUB_PLATFORMS[firmware]
        return f"{GRUB_SUBDIR}/{platform}/{image}"
    return _COPIES[(method, firmware)][0][0]


@dataclass(frozen=True)
class Installed:
    file: str        # relative to pxe_root
    source: str
    method: str
    firmware: str
    action: str      # installed | unchanged

    def row(self):
        return {"file": self.file, "source": self.source, "method": self.method,
                "firmware": self.firmware, "action": self.action}


def methods_in_use(config):
    """Every method a cluster of ``config`` boots with or chainloads to, in a stable order."""
    used = {m for c in config.clusters.values() for m in (c.pxe.method, c.pxe.local_method)}
    return [m for m in ("pxelinux", "grub", "ipxe") if m in used]


def install(pxe_root, methods, firmwares=FIRMWARES):
    """Install the loaders of ``methods`` x ``firmwares`` under ``pxe_root``; [Installed]."""
    for method in methods:
        if method not in ("pxelinux", "grub", "ipxe"):
            raise UsageError(f"unknown PXE method {method!r} (pxelinux, grub, ipxe)")
    for firmware in firmwares:
        if firmware not in FIRMWARES:
            raise UsageError(f"unknown firmware {firmware!r} (bios, uefi)")
    pairs = [(m, f) for m in methods for f in firmwares if supports(m, f)]
    _check_sources(pairs)
    pxe_root = Path(pxe_root)
    pxe_root.mkdir(parents=True, exist_ok=True)
    done = []
    for method, firmware in pairs:
        if method == "grub":
            done += _install_grub(pxe_root, firmware)
        else:
            done += [_copy(pxe_root, name, Path(source), method, firmware)
                     for name, source, _ in _COPIES[(method, firmware)]]
    return done


def _check_sources(pairs):
    missing = {}
    for method, firmware in pairs:
        if method == "grub":
            platform = GRUB_PLATFORMS[firmware][0]
            if shutil.which("grub-mknetdir") is None:
                missing["grub-mknetdir"] = "grub-common"
            if not (GRUB_LIB / platform / "pxe.mod").exists() and \
                    not (GRUB_LIB / platform / "efinet.mod").exists():
                missing[str(GRUB_LIB / platform)] = _GRUB_PACKAGES[firmware]
            continue
        for _, source, package in _COPIES[(method, firmware)]:
            if not Path(source).is_file():
                missing[source] = package
    if missing:
        raise SystemRequirementError(
            f"boot programs missing: {', '.join(missing)} (apt-get install "
            f"{' '.join(sorted(set(missing.values())))})")


def _copy(pxe_root, name, source, method, firmware):
    target = pxe_root / name
    if target.is_file() and filecmp.cmp(source, target, shallow=False):
        return Installed(name, str(source), method, firmware, "unchanged")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    return Installed(name, str(source), method, firmware, "installed")


def _install_grub(pxe_root, firmware):
    """grub-mknetdir into a scratch directory, then its files copied in place (so a
    second run changes nothing and a failed one leaves the tree as it was)."""
    platform = GRUB_PLATFORMS[firmware][0]
    with tempfile.TemporaryDirectory(prefix=".kabin-grub.", dir=pxe_root) as scratch:
        argv = ["grub-mknetdir", f"--net-directory={scratch}", f"--subdir={GRUB_SUBDIR}",
                f"--directory={GRUB_LIB / platform}"]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=GRUB_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise SystemRequirementError(f"grub-mknetdir did not finish in {GRUB_TIMEOUT} s") \
                from None
        if done.returncode != 0:
            raise SystemRequirementError(f"grub-mknetdir failed for {platform}: "
                                         f"{done.stderr.strip()}")
        made = Path(scratch) / GRUB_SUBDIR / platform
        actions = {_copy(pxe_root, f"{GRUB_SUBDIR}/{platform}/{source.relative_to(made)}",
                         source, "grub", firmware).action
                   for source in sorted(made.rglob("*")) if source.is_file()}
    action = "installed" if "installed" in actions else "unchanged"
    return [Installed(boot_file("grub", firmware), f"grub-mknetdir ({GRUB_LIB / platform})",
                      "grub", firmware, action)]
