"""A testbed node's network boot firmware: which profile it reads, what that names.

Written from the firmwares' documented behaviour, independently of kabin.pxe
(which writes the profiles): a profile ka-pxe gets wrong shows up as a node
that boots the wrong thing.

Where a node looks (``pxe_root`` is the TFTP root; NAME from the cluster's
``pxe.naming``; a missing file falls back to ``default`` in the same directory):

    pxelinux   <pxe_root>/pxelinux.cfg/NAME
    ipxe       <pxe_root>/ipxe/NAME            (a script starting with #!ipxe)
    grub       <pxe_root>/grub/grub.cfg-NAME   (then grub/default, grub/grub.cfg)

What it understands: PXELINUX ``DEFAULT``/``ONTIMEOUT``/``LABEL``, ``KERNEL``/
``LINUX``, ``APPEND`` (with ``initrd=``), ``INITRD``, ``COM32 chain.c32`` with
``APPEND hd0 P`` (partition P; ``hd0`` alone: the disk's MBR), ``LOCALBOOT``,
``PXE`` (another boot program); iPXE ``kernel``/``initrd``/``imgargs``/``boot``,
``chain`` (to a kernel, another script, pxelinux.0 -- with the file DHCP option
209 names, if ``set 209:string`` did -- or a GRUB image), ``sanboot``/``exit``
(the local disk); GRUB ``menuentry``, ``set default``, ``set root=(hd0,msdos3)``,
``linux``, ``initrd``, ``chainloader +1``, ``configfile`` (``$prefix`` is
(tftp)/grub), ``exit``. iPXE loaded as a kernel (``ipxe.lkrn``, by PXELINUX or
GRUB) runs its initrd, or its command line, as its script. Boot programs
(pxelinux.0, chain.c32, ipxe.lkrn, core.0) need not be in pxe_root: the emulator
knows them by name.

Paths are relative to pxe_root (``tftp://host/p`` and GRUB's ``(tftp)/p`` too);
iPXE's ``http://host/p`` is http_root/p. The outcome is a Kernel, a LocalBoot
or a NoBoot; what a kernel is (the deployment kernel, an environment's) is the
supervisor's business.
"""

import re
import shlex
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

MAX_CHAIN = 8
PXELINUX_IMAGES = ("pxelinux.0", "lpxelinux.0", "gpxelinux.0")
GRUB_IMAGES = ("core.0", "core.efi", "grubx64.efi", "grubnetx64.efi", "grubnetx64.efi.signed",
               "bootx64.efi", "grub.pxe")
DEPLOY_MAGIC = b"kabin-testbed-kernel: deployment environment"


@dataclass(frozen=True)
class Kernel:
    """Boot a kernel: ``path`` on the TFTP/HTTP side, or on local ``partition``."""

    path: Path | None
    initrd: Path | None = None
    cmdline: str = ""
    partition: int | None = None
    source: str = ""          # as the profile names it, for messages


@dataclass(frozen=True)
class LocalBoot:
    """Boot the local disk: ``partition`` directly, or None for the MBR's boot code."""

    partition: int | None = None


@dataclass(frozen=True)
class NoBoot:
    reason: str


# ---------------------------------------------------------------- profile names

def profile_name(naming, node, address, mac):
    """The file name a node's firmware asks for, by the cluster's pxe.naming."""
    if naming == "ip_hex":
        return "".join(f"{int(x):02X}" for x in address.split("."))
    if naming == "ip":
        return address
    if naming == "mac":
        return "01-" + mac.lower().replace(":", "-")
    if naming == "hostname_short":
        return node.split(".")[0]
    return node


def profile_candidates(pxe_root, method, name):
    """The files the firmware tries, in order."""
    root = Path(pxe_root)
    if method == "pxelinux":
        return [root / "pxelinux.cfg" / name, root / "pxelinux.cfg" / "default"]
    if method == "ipxe":
        return [root / "ipxe" / name, root / "ipxe" / "default"]
    return [root / "grub" / f"grub.cfg-{name}", root / "grub" / "default", root / "grub" / "grub.cfg"]


def network_boot(pxe_root, http_root, method, name):
    """What a node whose profile name is ``name`` boots over the network with ``method``."""
    return _Firmware(Path(pxe_root), Path(http_root), name).boot(method)


# ---------------------------------------------------------------- kernel command lines

def root_of(cmdline):
    """The ``root=`` of a kernel command line: a partition number, a tag or None.

    ``root=/dev/sda3`` -> 3; ``root=UUID=...``, ``LABEL=...``, ``PARTUUID=...``
    -> that tag (the supervisor looks it up with blkid); anything else -> None.
    """
    for word in cmdline.split():
        if not word.startswith("root="):
            continue
        value = word[len("root="):]
        match = re.fullmatch(r"/dev/[sv]da(\d+)", value)
        if match:
            return int(match.group(1))
        if re.match(r"(UUID|PARTUUID|LABEL|PARTLABEL)=.", value):
            return value
        return None
    return None


def is_deploy_kernel(path):
    """True if ``path`` is the testbed's deployment kernel (by its content)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(DEPLOY_MAGIC)) == DEPLOY_MAGIC
    except OSError:
        return False


# ---------------------------------------------------------------- the firmware

class _Firmware:
    def __init__(self, pxe_root, http_root, name):
        self.pxe_root, self.http_root, self.name = pxe_root, http_root, name
        self.hops = 0
        self.dhcp = {}     # DHCP options iPXE sets for a chained PXELINUX (209: its file)

    def boot(self, method):
        """Read the node's profile for ``method`` (or the default one) and follow it."""
        for candidate in profile_candidates(self.pxe_root, method, self.name):
            text = self.read_text(candidate)
            if text is not None:
                return self.run(method, text, candidate)
        if method == "grub":   # GRUB without a configuration stops at its prompt
            return NoBoot(f"no GRUB configuration for {self.name} (nor a default) "
                          f"in {self.pxe_root}/grub")
        # PXELINUX and iPXE give up: the BIOS tries the next boot device, the disk
        return LocalBoot(None)

    def read_text(self, path):
        try:
            return Path(path).read_text(encoding="utf-8", errors="replace")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def locate(self, ref):
        """The file a reference names: tftp/http URLs, GRUB devices, relative paths."""
        ref = ref.strip().strip("'\"")
        match = re.fullmatch(r"(tftp|http|https)://[^/]*(/.*)?", ref)
        if match:
            base = self.pxe_root if match.group(1) == "tftp" else self.http_root
            return _under(base, match.group(2) or "/")
        match = re.fullmatch(r"\((tftp|pxe)[^)]*\)(/.*)", ref)
        if match:
            return _under(self.pxe_root, match.group(2))
        return _under(self.pxe_root, ref)

    def run(self, method, text, source):
        self.hops += 1
        if self.hops > MAX_CHAIN:
            return NoBoot(f"more than {MAX_CHAIN} chained profiles (a loop?) at {source}")
        if method == "ipxe" and not text.startswith("#!ipxe"):
            return NoBoot(f"{source}: not an iPXE script (no #!ipxe line)")
        parse = {"pxelinux": self._pxelinux, "ipxe": self._ipxe, "grub": self._grub}[method]
        return parse(text, source)

    def chain(self, ref, args="", initrd=None):
        """iPXE's chain / GRUB's chainloader to a file: another firmware, a script, a kernel."""
        base = PurePosixPath(ref).name.lower()
        if base in PXELINUX_IMAGES:
            if "209" in self.dhcp:      # the configuration file iPXE told it
                ref = self.dhcp.get("210", "") + self.dhcp["209"]
                text = self.read_text(self.locate(ref))
                return NoBoot(f"{ref}: file not found") if text is None \
                    else self.run("pxelinux", text, ref)
            return self.boot("pxelinux")
        if base in GRUB_IMAGES:
            return self.boot("grub")
        path = self.locate(ref)
        text = self.read_text(path)
        if text is None:
            return NoBoot(f"{ref}: file not found")
        if text.startswith("#!ipxe"):
            return self.run("ipxe", text, path)
        return Kernel(path, initrd, args, source=ref)

    def ipxe_image(self, script, cmdline, source):
        """iPXE loaded as a kernel (ipxe.lkrn): its initrd is its script, else its
        command line is (commands joined by &&)."""
        if script:
            text = self.read_text(self.locate(script))
            if text is None:
                return NoBoot(f"{script}: file not found")
            return self.run("ipxe", text, script)
        lines = [part.strip() for part in cmdline.split("&&")]
        return self.run("ipxe", "\n".join(["#!ipxe"] + lines), source)

    # ------------------------------------------------ PXELINUX

    def _pxelinux(self, text, source):
        labels, order, glob = {}, [], {}
        current = glob
        for line in text.splitlines():
            keyword, _, rest = line.strip().partition(" ")
            keyword, rest = keyword.lower(), rest.strip()
            if not keyword or keyword.startswith("#"):
                continue
            if keyword == "label":
                current = {}
                labels[rest.lower()] = current
                order.append(rest.lower())
            elif keyword == "menu" and rest.lower() == "default":
                current["menu_default"] = True
            elif keyword in ("default", "ontimeout"):
                glob[keyword] = rest
            else:
                current[keyword] = rest
        entry = _pxelinux_entry(glob, labels, order)
        if entry is None:
            return NoBoot(f"{source}: no label to boot")
        return self._pxelinux_boot(entry, glob.get("append", ""), source)

    def _pxelinux_boot(self, entry, default_append, source):
        if "localboot" in entry:
            return LocalBoot(None)
        append = entry.get("append", default_append)
        append = "" if append == "-" else append
        if "pxe" in entry:                      # PXE image: another network boot program
            return self.chain(entry["pxe"])
        image = entry.get("com32") or entry.get("kernel") or entry.get("linux")
        if not image:
            return NoBoot(f"{source}: the label boots nothing")
        base = PurePosixPath(image).name.lower()
        if base == "chain.c32":
            return _chain_c32(append.split())
        if base.endswith(".c32"):
            return NoBoot(f"{source}: module {image} is not supported by the testbed")
        if base in PXELINUX_IMAGES + GRUB_IMAGES:
            return self.chain(image)
        words = append.split()
        initrds = [w[len("initrd="):] for w in words if w.startswith("initrd=")]
        initrd = entry.get("initrd") or (initrds[0].split(",")[0] if initrds else None)
        cmdline = " ".join(w for w in words if not w.startswith("initrd="))
        if base.endswith(".lkrn"):
            return self.ipxe_image(initrd, cmdline, image)
        return Kernel(self.locate(image), self.locate(initrd) if initrd else None, cmdline,
                      source=image)

    # ------------------------------------------------ iPXE

    def _ipxe(self, text, source):
        kernel = initrd = None
        args = ""
        for line in text.splitlines()[1:]:
            words = _ipxe_words(line)
            if not words:
                continue
            command, operands = words[0], _without_options(words[1:])
            if command in ("kernel", "imgselect", "chain", "imgexec") and not operands:
                return NoBoot(f"{source}: {command} without an image")
            if command in ("kernel", "imgselect"):
                kernel, args = operands[0], " ".join(operands[1:])
            elif command in ("initrd", "imgfetch", "module"):
                initrd = self.locate(operands[0]) if operands else None
            elif command == "imgargs" and len(operands) > 1:
                args = " ".join(operands[1:])
            elif command == "set" and len(operands) > 1:
                self.dhcp[operands[0].split(":")[0]] = operands[1]
            elif command in ("chain", "imgexec"):
                return self.chain(operands[0], " ".join(operands[1:]), initrd)
            elif command == "boot":
                return self._ipxe_boot(kernel, initrd, args, source)
            elif command in ("sanboot", "exit"):
                return LocalBoot(None)
        # a script that ends without booting returns to the next boot device: the disk
        return LocalBoot(None)

    def _ipxe_boot(self, kernel, initrd, args, source):
        if kernel is None:
            return NoBoot(f"{source}: boot without a kernel")
        return Kernel(self.locate(kernel), initrd, args, source=kernel)

    # ------------------------------------------------ GRUB

    def _grub(self, text, source):
        entries, default, top = _grub_entries(text)
        for command, operands in top:
            if command == "configfile" and operands:
                return self._grub_configfile(operands[0])
        if not entries:
            entries = [(set(), top)]
        chosen = _grub_default(entries, default)
        if chosen is None:
            return NoBoot(f"{source}: default entry {default!r} does not exist")
        return self._grub_entry(chosen[1], source)

    def _grub_configfile(self, ref):
        ref = ref.replace("${prefix}", "(tftp)/grub").replace("$prefix", "(tftp)/grub")
        text = self.read_text(self.locate(ref))
        if text is None:
            return NoBoot(f"configfile {ref}: file not found")
        return self.run("grub", text, ref)

    def _grub_entry(self, commands, source):
        root = None                     # None: the network (where GRUB was loaded from)
        kernel = initrd = None
        cmdline = ""
        for command, operands in commands:
            if command == "set" and operands and operands[0].startswith("root="):
                root = _grub_partition(operands[0][len("root="):])
            elif command in ("linux", "linux16", "linuxefi") and operands:
                kernel, cmdline = operands[0], " ".join(operands[1:])
            elif command in ("initrd", "initrd16", "initrdefi") and operands:
                initrd = operands[0]
            elif command == "chainloader" and operands:
                return self._grub_chainload(operands[0], root)
            elif command == "configfile" and operands:
                return self._grub_configfile(operands[0])
            elif command == "exit":
                return LocalBoot(None)
        if kernel is None:
            return NoBoot(f"{source}: the entry boots nothing")
        if PurePosixPath(kernel).name.lower().endswith(".lkrn"):
            return self.ipxe_image(initrd, cmdline, kernel)
        device = re.match(r"\([^)]*\)", kernel)
        where = _grub_partition(device.group(0)) if device else root
        if where == 0:
            return NoBoot(f"{kernel}: a kernel is read from a partition, not from the whole disk")
        if where is not None:   # read from the local disk: the installed system's kernel
            return Kernel(None, None, cmdline, partition=where, source=kernel)
        return Kernel(self.locate(kernel), self.locate(initrd) if initrd else None, cmdline,
                      source=kernel)

    def _grub_chainload(self, target, root):
        """``chainloader +1`` boots the first sector of ``root``: a partition or the MBR."""
        match = re.fullmatch(r"(\([^)]*\))?\+1", target)
        if match:
            where = _grub_partition(match.group(1)) if match.group(1) else root
            if where is None:
                return NoBoot("chainloader +1 without a disk root")
            return LocalBoot(where or None)
        return self.chain(target)


# ---------------------------------------------------------------- helpers

def _under(base, path):
    """``path`` inside ``base``, never outside it."""
    parts = [p for p in PurePosixPath("/" + path).parts[1:] if p not in ("..", ".")]
    return Path(base, *parts)


def _pxelinux_entry(glob, labels, order):
    default = glob.get("default", "")
    name = default.split()[0].lower() if default else ""
    if name in labels:
        return labels[name]
    if name.endswith(".c32") or not name:   # a menu: its default, the timeout label, the first
        menu = [labels[n] for n in order if labels[n].get("menu_default")]
        if menu:
            return menu[0]
        timeout = glob.get("ontimeout", "").lower()
        if timeout in labels:
            return labels[timeout]
        return labels[order[0]] if order else None
    # DEFAULT may name a kernel and its parameters directly
    kernel, _, append = default.partition(" ")
    return {"kernel": kernel, "append": append.strip()}


def _chain_c32(args):
    """chain.c32's ``hd0 [P]``: partition P of the first disk, or its MBR."""
    if not args or args[0].lower() != "hd0":
        return NoBoot(f"chain.c32 {' '.join(args)}: the node has one disk, hd0")
    if len(args) > 1 and args[1].isdigit():
        return LocalBoot(int(args[1]) or None)
    return LocalBoot(None)


def _ipxe_words(line):
    line = line.strip()
    if not line or line.startswith(("#", ":")):
        return []
    line = re.split(r"\s(?:\|\||&&)\s", line)[0]
    try:
        return shlex.split(line)
    except ValueError:
        return line.split()


def _without_options(words):
    out, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in ("-n", "--name", "-t", "--timeout"):
            skip = True
        elif not word.startswith("-") or out:
            out.append(word)
    return out


def _grub_partition(device):
    """``(hd0,msdos3)``, ``hd0,gpt3``, ``(hd0,3)`` -> 3; ``(hd0)`` -> 0; else None."""
    match = re.fullmatch(r"\(?hd0(?:,(?:msdos|gpt)?(\d+))?\)?", device.strip().strip("'\""))
    if not match:
        return None
    return int(match.group(1)) if match.group(1) else 0


def _grub_entries(text):
    """([(title, commands)], default, top-level commands) of a grub.cfg."""
    entries, top, default = [], [], "0"
    current, efi_only = None, False
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # the emulated firmware is a BIOS: what GRUB runs only on EFI is skipped
        if line.startswith("if ") and "grub_platform" in line and "efi" in line:
            efi_only = True
            continue
        if efi_only:
            efi_only = line != "fi"
            continue
        if line.startswith("menuentry"):
            title = re.match(r"menuentry\s+(['\"])(.*?)\1|menuentry\s+(\S+)", line)
            ident = re.search(r"--id\s+['\"]?([^'\"\s{]+)", line)
            current = []
            names = {t for t in ((title.group(2) or title.group(3)) if title else "",
                                 ident.group(1) if ident else "") if t}
            entries.append((names, current))
            continue
        if line == "}":
            current = None
            continue
        try:
            words = shlex.split(line)
        except ValueError:
            words = line.split()
        command = (words[0], words[1:])
        if current is not None:
            current.append(command)
        elif words[0] == "set" and len(words) > 1 and words[1].startswith("default="):
            default = words[1][len("default="):]
        else:
            top.append(command)
    return entries, default, top


def _grub_default(entries, default):
    if default.isdigit():
        index = int(default)
        return entries[index] if index < len(entries) else None
    if default.startswith("$"):
        return entries[0]
    for names, commands in entries:
        if default in names:
            return names, commands
    return None
