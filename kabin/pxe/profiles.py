"""PXE profiles: what a node's network boot loads next, written where its firmware looks.

Profiles:

- ``deploy``: the cluster's deployment kernel, initrd and params
  (``boot.kernels.deploy``, paths relative to pxe_root);
- ``local``: boot the local disk: one partition's boot sector (default: the
  cluster's deploy partition) or the disk's MBR (``partition=DISK``). What each
  loader does, as real firmware needs it: PXELINUX ``COM32 chain.c32`` with
  ``APPEND hd0 P`` (``hd0`` for the MBR); GRUB ``set root=(hd0,P)`` then
  ``chainloader +1`` on BIOS; on UEFI GRUB chainloads the disk's EFI system
  partition's EFI/BOOT/BOOTX64.EFI (the GRUB install-bootloader.sh put there:
  returning to the firmware with ``exit`` makes OVMF stop in its menu); iPXE
  ``sanboot --no-describe --drive 0x80``, which boots
  the MBR only: iPXE cannot boot one partition, so a cluster booting partitions
  with iPXE sets ``pxe.local_method`` to pxelinux or grub;
- ``netboot``: an environment's own kernel and initrd (see ``kabin.pxe.netboot``);
- ``custom``: a template of the user's with per-node values.

When ``pxe.local_method`` differs from ``pxe.method`` a local boot is chainloaded:
the network loader's file hands over to the local loader (iPXE sets PXELINUX's
DHCP options 209/210 and chains pxelinux.0; PXELINUX and GRUB load ipxe.lkrn or
GRUB's core.0), whose own file does the local boot. The local loader's file is
written first, the network loader's last.

Every file is written atomically (a temporary file in the same directory, then a
rename): a node booting meanwhile reads the old or the new profile, never half of
one. Everything about a node is checked (known node, address, MAC, values) before
any of its files is written. Each file carries a ``# ka-pxe: profile=...`` line
that ``show`` reads back.
"""

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, SystemRequirementError, UsageError
from . import naming
from .templates import Library, Template

log = logging.getLogger(__name__)

PROFILES = ("deploy", "local", "netboot", "custom")
DISK = "disk"
STAMP = "# ka-pxe:"
MAX_PARTITION = 128


@dataclass(frozen=True)
class Request:
    """What to boot: one of PROFILES and what it needs."""

    profile: str
    partition: object = None        # local: a number, DISK, or None (the deploy partition)
    kernel: str | None = None       # netboot: relative to pxe_root
    initrd: str | None = None
    params: str = ""                # netboot: appended to the cluster's user params
    template: Template | None = None  # custom
    stamp: dict = field(default_factory=dict)  # what else the stamp line says (env, template)


def local_target(method, partition):
    """How ``method``'s loader names the local disk (partition None: the whole disk)."""
    if method == "pxelinux":
        return "hd0" if partition is None else f"hd0 {partition}"
    if method == "grub":
        return "(hd0)" if partition is None else f"(hd0,{partition})"  # MBR or GPT
    if partition is not None:
        raise UsageError(f"iPXE cannot boot partition {partition} by itself (it boots the "
                         "disk's MBR): set pxe.local_method to pxelinux or grub, which iPXE "
                         "chainloads, or boot the whole disk (--partition disk)")
    return "0x80"


def _one_line(key, value):
    """A value inserted into a profile line must not add lines (the header is made of lines)."""
    if key != "header" and isinstance(value, str) and ("\n" in value or "\r" in value):
        raise UsageError(f"the value of {key} holds a line break: {value!r}")
    return value


def _tree_path(what, value, pxe_root):
    """A file of the PXE tree as the loaders name it: relative to pxe_root, no blanks."""
    path = Path(value)
    if path.is_absolute():
        try:
            path = path.relative_to(pxe_root)
        except ValueError:
            raise ConfigError(f"{what} {value} is outside pxe_root {pxe_root}: the loaders "
                              "only read the TFTP tree") from None
    text = path.as_posix()
    if not text or any(c.isspace() for c in text) or ".." in path.parts:
        raise ConfigError(f"{what} {value!r} is not a plain path inside pxe_root")
    return text


class _Node:
    """One node's values, computed when a template asks for them."""

    def __init__(self, config, node_name):
        self.node = config.node(node_name)
        self.cluster = config.clusters[self.node.cluster]
        self.pxe = self.cluster.pxe
        self.name = naming.profile_name(self.node, self.pxe.naming)

    def value(self, key, method, extra):
        if key in extra:
            return extra[key]
        node, boot = self.node, self.cluster.boot
        simple = {"node": node.name, "short": node.name.split(".", 1)[0],
                  "cluster": self.cluster.name, "name": self.name,
                  "user_params": boot.user_params, "naming": self.pxe.naming,
                  "deploy_partition": self.cluster.partitioning.partitions["deploy"]}
        if key in simple:
            return simple[key]
        if key == "ip":
            return str(naming.ipv4(node))
        if key == "ip_hex":
            return f"{int(naming.ipv4(node)):08X}"
        if key == "mac":
            return naming.mac(node)
        if key == "header":
            header = self.pxe.headers.get(method)
            return header.rstrip("\n") if header else None
        raise UsageError(f"{{{{ {key} }}}} has no value in this profile")


def render(template, method, values_of, extra, stamp):
    """The text of ``template`` for one node, with its stamp line."""
    values = {k: _one_line(k, values_of.value(k, method, extra)) for k in template.placeholders}
    return stamped(template.render(values), stamp)


def stamped(text, stamp):
    """``text`` with its ``# ka-pxe: key=value ...`` line (after a ``#!`` line if any)."""
    line = STAMP + "".join(f" {k}={v}" for k, v in stamp.items()) + "\n"
    first, newline, rest = text.partition("\n")
    if first.startswith("#!"):  # iPXE's "#!ipxe" must stay the first line
        return first + newline + line + rest
    return line + text


def write_atomic(path, text):
    """Replace ``path`` by ``text`` in one rename; readers see the old or the new file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ka-pxe-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o644)  # the TFTP server reads it as another user
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_stamp(text):
    """The key=value pairs of a profile's stamp line ({} when it has none)."""
    for line in text.splitlines()[:3]:
        if line.startswith(STAMP):
            return dict(item.split("=", 1) for item in line[len(STAMP):].split() if "=" in item)
    return {}


class ProfileWriter:
    """Writes, shows and clears the profiles of nodes for one request.

    Creating it checks everything that does not depend on a node (templates of
    every method in use, the deploy kernel paths), so a broken template stops the
    command before any file is written.
    """

    def __init__(self, config, request):
        if request.profile not in PROFILES:
            raise UsageError(f"unknown PXE profile {request.profile!r} "
                             f"(expected one of {', '.join(PROFILES)})")
        if request.profile == "custom" and request.template is None:
            raise UsageError("the custom profile needs a template")
        if request.profile == "netboot" and not request.kernel:
            raise UsageError("the netboot profile needs a kernel")
        partition = request.partition
        if partition not in (None, DISK) and not (
                isinstance(partition, int) and 1 <= partition <= MAX_PARTITION):
            raise UsageError(f"expected a partition number (1-{MAX_PARTITION}) or "
                             f"'{DISK}', got {partition!r}")
        self.config, self.request = config, request
        self.root = Path(config.server.pxe_root)
        self.templates = Library(config.dir)
        self._dispatchers = self._plan_dispatchers()
        self._ready_dirs, self._written_dispatchers = set(), set()
        self._cluster_values = {}
        for cluster in config.clusters.values():
            self._check_cluster(cluster)

    # ------------------------------------------------------------ checks done once

    def _template_names(self, pxe):
        profile = self.request.profile
        if profile == "local":
            names = [f"{pxe.local_method}-local"]
            if pxe.local_method != pxe.method:
                names.append(f"{pxe.method}-chain-{pxe.local_method}")
            return names
        return [] if profile == "custom" else [f"{pxe.method}-boot"]

    def _check_cluster(self, cluster):
        for name in self._template_names(cluster.pxe):
            self.templates.get(name)
        if self.request.profile not in ("deploy", "custom"):
            return
        values = self._boot_values(cluster)  # checks they are plain paths of the tree
        for what in ("kernel", "initrd"):
            if self.request.profile == "deploy" and not (self.root / values[what]).is_file():
                log.warning("cluster %s: the deploy %s %s is not in %s yet", cluster.name, what,
                            values[what], self.root)

    @staticmethod
    def _dispatch_methods(pxe):
        """The loaders that look a node's file up by themselves (iPXE and PXELINUX reached
        by a chain are told their file; a chainloaded GRUB looks it up)."""
        return {pxe.method, "grub"} if pxe.local_method == "grub" else {pxe.method}

    def _plan_dispatchers(self):
        """{path: text} of the dispatchers: one per loader, trying every naming of the
        clusters using it, so it depends on the configuration only."""
        namings = {}
        for cluster in self.config.clusters.values():
            for method in self._dispatch_methods(cluster.pxe):
                if naming.dispatch_name(method, cluster.pxe.naming):
                    namings.setdefault(method, {})[cluster.pxe.naming] = cluster
        plan = {}
        for method, used in sorted(namings.items()):
            template = self.templates.get(f"{method}-dispatch")
            first = next(iter(used.values()))
            header = first.pxe.headers.get(method)
            values = {"node_file": tuple(naming.dispatch_name(method, n) for n in used),
                      "naming": ",".join(used), "header": header.rstrip("\n") if header else None}
            unknown = template.placeholders - set(values)
            if unknown:
                raise ConfigError(f"{template.source}: a dispatcher has no value for "
                                  f"{', '.join(sorted(unknown))}")
            text = template.render({k: values[k] for k in template.placeholders})
            plan[naming.DISPATCH_FILES[method]] = stamped(text, {"dispatch": method,
                                                                  "naming": values["naming"]})
        return plan

    # ------------------------------------------------------------ per node

    def plan(self, node_name):
        """The node's values and ``[(path relative to pxe_root, text)]``, in write order."""
        values = _Node(self.config, node_name)
        pxe, request = values.pxe, self.request
        stamp = {"profile": request.profile, **request.stamp}
        if request.profile == "local":
            return values, self._plan_local(values, stamp)
        if request.profile == "custom":
            text = render(request.template, pxe.method, values,
                          self._boot_values(values.cluster), stamp)
        else:
            text = render(self.templates.get(f"{pxe.method}-boot"), pxe.method, values,
                          self._boot_values(values.cluster), stamp)
        return values, [(naming.profile_path(pxe.method, values.name), text)]

    def _deploy_values(self, cluster):
        boot, where = cluster.boot, f"{cluster.file}: boot.kernels.deploy"
        return {"profile": self.request.profile,
                "kernel": _tree_path(f"{where}.vmlinuz", boot.deploy_kernel, self.root),
                "initrd": _tree_path(f"{where}.initrd", boot.deploy_initrd, self.root),
                "params": boot.deploy_params}

    def _boot_values(self, cluster):
        """The kernel, initrd and params (the same for every node of a cluster: kept)."""
        if cluster.name not in self._cluster_values:
            request, boot = self.request, cluster.boot
            if request.profile in ("deploy", "custom"):
                values = self._deploy_values(cluster)
            else:
                values = {"profile": "netboot", "kernel": request.kernel, "initrd": request.initrd,
                          "params": " ".join(p for p in (boot.user_params, request.params) if p)}
            self._cluster_values[cluster.name] = values
        return self._cluster_values[cluster.name]

    def _plan_local(self, values, stamp):
        pxe, partition = values.pxe, self.request.partition
        if partition is None:
            partition = values.cluster.partitioning.partitions["deploy"]
        partition = None if partition == DISK else partition
        stamp = {**stamp, "partition": DISK if partition is None else partition}
        local_path = naming.profile_path(pxe.local_method, values.name)
        extra = {"profile": "local", "local_target": local_target(pxe.local_method, partition)}
        files = [(local_path, render(self.templates.get(f"{pxe.local_method}-local"),
                                     pxe.local_method, values, extra, stamp))]
        if pxe.local_method != pxe.method:
            chain = self.templates.get(f"{pxe.method}-chain-{pxe.local_method}")
            files.append((naming.profile_path(pxe.method, values.name),
                          render(chain, pxe.method, values,
                                 {"profile": "local", "target_file": local_path},
                                 {**stamp, "chain": pxe.local_method})))
        return files

    def apply(self, node_name):
        """Write a node's profile; return the paths written, relative to pxe_root."""
        values, files = self.plan(node_name)
        try:
            for method in self._dispatch_methods(values.pxe):
                self._write_dispatcher(naming.DISPATCH_FILES.get(method))
            for path, text in files:
                self._write(path, text)
            written = {path for path, _ in files}
            for method in naming.METHODS:  # what an earlier profile left for other loaders
                stale = naming.profile_path(method, values.name)
                if stale not in written:
                    (self.root / stale).unlink(missing_ok=True)
        except OSError as exc:
            raise SystemRequirementError(f"cannot write into {self.root}: "
                                         f"{exc.strerror or exc}") from None
        return [path for path, _ in files]

    def _write_dispatcher(self, path):
        if path not in self._dispatchers or path in self._written_dispatchers:
            return
        text = self._dispatchers[path]
        target = self.root / path
        try:
            current = target.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            current = None
        if current != text:
            self._write(path, text)
            log.info("wrote the dispatcher %s", target)
        self._written_dispatchers.add(path)

    def _write(self, relative, text):
        path = self.root / relative
        if path.parent not in self._ready_dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._ready_dirs.add(path.parent)
        write_atomic(path, text)


# ---------------------------------------------------------------- show and clear

def _existing(config, node_name):
    """The node's values and ``{path: text}`` of its profile files present in the tree."""
    values = _Node(config, node_name)
    root = Path(config.server.pxe_root)
    found = {}
    for method in naming.METHODS:
        path = naming.profile_path(method, values.name)
        try:
            found[path] = (root / path).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            continue
    return values, found


def show(config, node_name):
    """``(stamp, {path: text})``: what the node's network loader boots and its files.

    The stamp comes from the file of the cluster's ``pxe.method`` (the one the
    firmware reads first): None when that file is absent, ``{}`` when ka-pxe did
    not write it.
    """
    values, found = _existing(config, node_name)
    entry = found.get(naming.profile_path(values.pxe.method, values.name))
    return (read_stamp(entry) if entry is not None else None), found


def clear(config, node_name):
    """Remove the node's profile files (of every loader); return the paths removed."""
    _, found = _existing(config, node_name)
    root = Path(config.server.pxe_root)
    for path in found:
        (root / path).unlink(missing_ok=True)
    return list(found)
