"""One virtual machine of the VM tier: a QEMU process, its firmware, disk, NIC and console.

The QEMU process is the machine's chassis: it runs from ``up`` to ``down``, and
power is QEMU's run state, driven and read back through QMP (as virtualbmc
drives libvirt): the machine starts powered off (``-S``: nothing executes);
*on* is ``system_reset`` then ``cont``; *off* is ``stop``; a guest that powers
itself off stays in QEMU's ``shutdown`` state (``-no-shutdown``), which is off.

- Firmware: SeaBIOS with QEMU's iPXE NIC ROM (bios), or OVMF (uefi), with the
  machine's own copy of the UEFI variables.
- Boot order: network, then disk (``bootindex``), as a cluster node is set up;
  the BMC's boot device (IPMI ``chassis bootdev``) changes it for the next boot.
- The NIC (virtio or e1000) is on a tap of the testbed's bridge, with the MAC
  of clusters.yml; the serial console is appended to ``console.log``.
- Faults: ``firmware-hang`` (the firmware is told to boot only the empty CD
  drive, strictly: SeaBIOS stops at "No bootable device", OVMF in its shell),
  ``link-down`` (the NIC loses its carrier), ``disk-removed`` (every I/O of the
  disk fails, as with a pulled disk, until the fault is cleared); ``bmc-dead``
  and ``bmc-lies`` are the BMC's (bmc.py). Each is cleared live.

Every method returns quickly: the BMC thread calls them (see bmc.py).
"""

import ctypes
import logging
import re
import shutil
import signal
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import SystemRequirementError
from .qmp import Qmp, QmpError

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
FIRMWARES = ("bios", "uefi")
NIC_MODELS = {"virtio": "virtio-net-pci", "e1000": "e1000"}
DISK_BUSES = ("virtio", "sata")
ON_STATES = ("running", "debug", "suspended", "io-error", "watchdog", "guest-panicked")
VM_FAULTS = ("firmware-hang", "link-down", "disk-removed")
DISK_NODE, IMAGE_NODE, PULLED_NODE = "drive0", "drive0-image", "drive0-pulled"
DISK_ERRORS = "werror=report,rerror=report"     # the guest sees I/O errors, QEMU does not pause
EIO = 5
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|[\x00-\x08\x0b-\x1f]")


@dataclass(frozen=True)
class MachineSpec:
    name: str
    mac: str
    firmware: str            # bios | uefi
    memory: int              # MiB
    disk: Path
    disk_format: str         # raw | qcow2
    disk_bus: str            # virtio | sata
    nic: str                 # virtio | e1000
    tap: str
    dir: Path                # console.log, qmp.sock, the UEFI variables

    @property
    def console(self):
        return self.dir / "console.log"

    @property
    def qmp_socket(self):
        return self.dir / "qmp.sock"

    @property
    def uefi_vars(self):
        return self.dir / "OVMF_VARS.fd"


def missing_requirements(firmwares):
    """What the VM tier lacks on this machine: [(what, Debian package)]."""
    needs = [(QEMU, "qemu-system-x86", shutil.which(QEMU)),
             ("/usr/lib/ipxe/qemu/efi-e1000.rom", "ipxe-qemu",
              Path("/usr/lib/ipxe/qemu/efi-e1000.rom").exists())]
    if "uefi" in firmwares:
        needs.append((str(OVMF_CODE), "ovmf", OVMF_CODE.exists() and OVMF_VARS.exists()))
    return [(what, package) for what, package, present in needs if not present]


def argv(spec, qmp_fd):
    """QEMU's command line for ``spec`` (powered off: ``-S``), serving QMP on the
    listening socket ``qmp_fd`` (made before QEMU starts: a client connects at once)."""
    # SeaBIOS and the iPXE ROM write to the serial console only without graphics
    machine = "q35" if spec.firmware == "uefi" else "pc,graphics=off"
    args = [QEMU, "-name", spec.name, "-accel", "tcg", "-machine", machine, "-m", str(spec.memory),
            "-display", "none", "-vga", "none", "-nodefaults", "-S", "-no-shutdown",
            "-chardev", f"file,id=console,path={spec.console},append=on",
            "-serial", "chardev:console",
            "-chardev", f"socket,id=qmp,fd={qmp_fd},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            "-boot", "strict=on",
            "-netdev", f"tap,id=net0,ifname={spec.tap},script=no,downscript=no",
            "-device", f"{NIC_MODELS[spec.nic]},id=nic0,netdev=net0,mac={spec.mac},bootindex=1",
            # the disk's nodes: file, its format, and on top the device's (raw, a pass-through)
            # whose image the disk-removed fault swaps for a failing one (Machine.set_faults)
            "-blockdev", f"driver=file,node-name=drive0-file,filename={spec.disk},"
                         "cache.no-flush=on",
            "-blockdev", f"driver={spec.disk_format},node-name={IMAGE_NODE},file=drive0-file",
            "-blockdev", f"driver=raw,node-name={DISK_NODE},file={IMAGE_NODE}",
            # an empty CD drive, as many servers have: what a hung firmware tries to boot
            "-device", "ide-cd,id=cd0,bus=ide.1"]
    if spec.disk_bus == "virtio":
        args += ["-device", f"virtio-blk-pci,id=disk0,drive={DISK_NODE},{DISK_ERRORS},bootindex=2"]
    else:
        args += ["-device", "ahci,id=ahci0", "-device", "ide-hd,id=disk0,bus=ahci0.0,"
                 f"drive={DISK_NODE},{DISK_ERRORS},bootindex=2"]
    if spec.firmware == "uefi":
        args += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={spec.uefi_vars}"]
    return args


def die_with_parent():
    """In a child before exec: SIGKILL when the thread that started it ends (prctl
    PR_SET_PDEATHSIG), so no QEMU outlives a crashed supervisor."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


class Machine:
    """A running QEMU and the power controller its BMC acts on (bmc.py's interface)."""

    def __init__(self, spec, netns=None):
        self.spec = spec
        self.qmp = Qmp(spec.qmp_socket)
        self.faults = frozenset()
        self.bootdev = "default"
        self.proc = None
        self._netns = netns
        self._lock = threading.Lock()
        self._boot_order = {"nic0": 1, "disk0": 2, "cd0": -1}   # as on QEMU's command line

    # ------------------------------------------------ the process

    def start(self, timeout=30.0):
        """Start QEMU powered off; returns once it answers QMP (bounded by ``timeout``)."""
        self.spec.dir.mkdir(parents=True, exist_ok=True)
        if self.spec.firmware == "uefi" and not self.spec.uefi_vars.exists():
            shutil.copyfile(OVMF_VARS, self.spec.uefi_vars)
        self.spec.qmp_socket.unlink(missing_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(self.spec.qmp_socket))
            listener.listen(8)
            command = argv(self.spec, listener.fileno())
            if self._netns:
                command = ["ip", "netns", "exec", self._netns] + command
            with open(self.spec.dir / "qemu.log", "ab") as log_file:
                self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file,
                                             stderr=log_file, pass_fds=(listener.fileno(),),
                                             preexec_fn=die_with_parent)
        try:
            Qmp(self.spec.qmp_socket, timeout=timeout).status()
        except QmpError as exc:
            self.stop()
            raise SystemRequirementError(f"{self.spec.name}: QEMU does not answer QMP ({exc}): "
                                         f"{self._qemu_error()}") from None
        return self

    def _qemu_error(self):
        text = (self.spec.dir / "qemu.log").read_text(errors="replace").strip()
        return text.splitlines()[-1] if text else "no message"

    def stop(self, timeout=10.0):
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.qmp.execute("quit")
            self.proc.wait(timeout)
        except (QmpError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(timeout)

    # ------------------------------------------------ power (QMP)

    def state(self):
        """QEMU's run state, or 'gone' when the process is not there."""
        if self.proc is None or self.proc.poll() is not None:
            return "gone"
        try:
            return self.qmp.status()
        except QmpError:
            return "gone"

    def is_on(self):
        return self.state() in ON_STATES

    def power_on(self):
        with self._lock:
            if self.state() not in ON_STATES:
                self._boot()

    def power_off(self):
        with self._lock:
            if self.state() in ON_STATES:
                self.qmp.execute("stop")

    def reset(self):
        with self._lock:
            if self.state() in ON_STATES:
                self._apply_boot_order()
                self.qmp.execute("system_reset")

    def cycle(self):
        with self._lock:
            if self.state() in ON_STATES:
                self.qmp.execute("stop")
            self._boot()

    def _boot(self):
        self._apply_boot_order()
        self.qmp.execute("system_reset")
        self.qmp.execute("cont")

    def set_bootdev(self, dev):
        """IPMI boot device: 'network' (PXE first), 'hd' (disk first), others: the default."""
        self.bootdev = dev

    def _apply_boot_order(self):
        """The firmware reads the order at reset (QEMU's bootorder file in fw_cfg)."""
        if "firmware-hang" in self.faults:        # strict boot: the empty drive, then halt
            order = {"nic0": -1, "disk0": -1, "cd0": 1}
        elif self.bootdev == "hd":
            order = {"nic0": 2, "disk0": 1, "cd0": -1}
        else:
            order = {"nic0": 1, "disk0": 2, "cd0": -1}
        if order == self._boot_order:
            return
        # QEMU refuses an index another device holds: free them all, then set them
        for device, index in [(d, -1) for d in order] + [(d, i) for d, i in order.items()
                                                          if i >= 0]:
            self.qmp.execute("qom-set", path=f"/machine/peripheral/{device}",
                             property="bootindex", value=index)
        self._boot_order = order

    # ------------------------------------------------ faults

    def set_faults(self, names):
        """Apply the VM faults of ``names`` (a set of fault names, BMC ones included)."""
        names = frozenset(names)
        with self._lock:
            if ("link-down" in names) != ("link-down" in self.faults):
                self.qmp.execute("set_link", name="nic0", up="link-down" not in names)
            if ("disk-removed" in names) != ("disk-removed" in self.faults):
                self._pull_disk() if "disk-removed" in names else self._plug_disk()
            self.faults = names
            # now, not at the BMC's next reset: a reboot the guest asks for hangs too
            self._apply_boot_order()

    def _pull_disk(self):
        """The device's node reads and writes a disk whose every I/O fails (blkdebug
        injecting EIO over a null disk of the same size), as a pulled disk would."""
        size = next(node["image"]["virtual-size"]
                    for node in self.qmp.execute("query-named-block-nodes")
                    if node["node-name"] == IMAGE_NODE)
        # reads and writes, not flushes: plugging the disk back flushes the pulled one
        rules = [{"event": event, "iotype": iotype, "errno": EIO, "once": False}
                 for event, iotype in (("read_aio", "read"), ("write_aio", "write"))]
        self.qmp.execute("blockdev-add", **{
            "driver": "blkdebug", "node-name": PULLED_NODE,
            "image": {"driver": "null-co", "size": size},
            "inject-error": rules})
        self._reopen_disk(PULLED_NODE)

    def _plug_disk(self):
        """The disk is back, with what it held (writes made while it was out are lost)."""
        self._reopen_disk(IMAGE_NODE)
        self.qmp.execute("blockdev-del", **{"node-name": PULLED_NODE})

    def _reopen_disk(self, image):
        self.qmp.execute("blockdev-reopen", options=[{"driver": "raw", "node-name": DISK_NODE,
                                                      "file": image}])

    # ------------------------------------------------ what it shows

    def console_tail(self, limit=8192):
        """The last line the machine printed on its console (control codes removed)."""
        try:
            with open(self.spec.console, "rb") as handle:
                handle.seek(0, 2)
                handle.seek(max(0, handle.tell() - limit))
                text = handle.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""
        lines = [line.strip() for line in _ANSI.sub("\n", text).splitlines()]
        lines = [line for line in lines if line]
        return lines[-1][:120] if lines else ""
