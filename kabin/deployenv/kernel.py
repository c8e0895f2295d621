"""Debian's kernel for the deployment environment and the deployed test systems.

The package linux-image-amd64 points at is downloaded once with ``apt-get
download`` into a cache (or given as a file: a site without a Debian mirror
passes its own .deb) and unpacked, never installed: its vmlinuz, and the
modules the machines need (NICs, disk controllers, file systems), in the order
they must be loaded.
"""

import logging
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import SystemRequirementError, UsageError

log = logging.getLogger(__name__)
progress = logging.getLogger("kabin.progress")

CACHE = Path("/var/cache/kabin/kernel")
TIMEOUT = 600
# the machines' devices, and what the steps mount: ESPs (vfat), efivars (efibootmgr)
MODULES = ("e1000", "virtio_pci", "virtio_net", "virtio_blk", "ahci", "ata_piix", "sd_mod",
           "crc32c_generic", "crct10dif_generic", "ext4", "vfat", "xfs", "nls_cp437",
           "nls_ascii", "efivarfs")


def run(argv, **kwargs):
    """Run a build tool; its stdout, or a SystemRequirementError saying what failed."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)
    except FileNotFoundError:
        raise SystemRequirementError(f"{argv[0]} is missing") from None
    except subprocess.TimeoutExpired:
        raise SystemRequirementError(f"{' '.join(argv)} did not finish in {TIMEOUT} s") from None
    if done.returncode != 0:
        raise SystemRequirementError(f"{' '.join(map(str, argv))} failed: "
                                     f"{done.stderr.strip()[-300:]}")
    return done.stdout


@dataclass(frozen=True)
class Kernel:
    version: str
    vmlinuz: Path
    modules: Path        # the unpacked lib/modules/VERSION
    package: str


def kernel_package():
    """The versioned package linux-image-amd64 depends on (e.g. linux-image-6.1.0-57-amd64)."""
    for line in run(["apt-cache", "depends", "linux-image-amd64"]).splitlines():
        name = line.strip().removeprefix("Depends:").strip()
        if line.strip().startswith("Depends:") and name.startswith("linux-image-"):
            return name
    raise SystemRequirementError("apt-cache knows no linux-image-amd64 (apt-get update?)")


def download(cache=CACHE):
    """The .deb of Debian's current kernel, downloaded once into ``cache``."""
    package = kernel_package()
    found = sorted(Path(cache).glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    progress.info("deployenv: downloading %s (once, into %s)", package, cache)
    Path(cache).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as work:
        run(["apt-get", "download", "-q", package], cwd=work)
        deb = next(Path(work).glob(f"{package}_*.deb"))
        target = Path(cache) / deb.name
        deb.replace(target)
    return target


def unpack(deb, into):
    """Unpack a kernel package into the directory ``into``; its Kernel."""
    deb = Path(deb)
    if not deb.is_file():
        raise UsageError(f"kernel package {deb}: no such file")
    run(["dpkg-deb", "-x", str(deb), str(into)])
    images = sorted((Path(into) / "boot").glob("vmlinuz-*"))
    if not images:
        raise UsageError(f"{deb} holds no /boot/vmlinuz-*: not a kernel package")
    version = images[-1].name.removeprefix("vmlinuz-")
    modules = Path(into) / "lib" / "modules" / version
    return Kernel(version, images[-1], modules, deb.name.split("_")[0])


# ---------------------------------------------------------------- modules

def _module_index(modules_dir):
    """{module name: its .ko path relative to ``modules_dir``}."""
    return {p.name.split(".ko")[0].replace("-", "_"): str(p.relative_to(modules_dir))
            for p in Path(modules_dir).rglob("*.ko")}


def _depends(ko_file):
    """The modules a .ko needs: its modinfo's ``depends=`` (NUL-separated strings)."""
    match = re.search(rb"(?:^|\0)depends=([^\0]*)\0", Path(ko_file).read_bytes())
    return [d.replace("-", "_") for d in match.group(1).decode().split(",") if d] \
        if match else []


def module_files(modules_dir, wanted=MODULES):
    """The .ko files ``wanted`` needs, in load order (a module after those it needs);
    a module built into the kernel has no file and is skipped."""
    index, order = _module_index(modules_dir), []

    def visit(name):
        rel = index.get(name)
        if rel is None or rel in order:
            return
        for needed in _depends(Path(modules_dir) / rel):
            visit(needed)
        order.append(rel)

    for name in wanted:
        visit(name)
    return order
