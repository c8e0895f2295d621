"""The VM tier of the testbed (``ka-testbed up --vm``): what ``up`` builds for it.

Each node is a QEMU machine (vm.py) on a tap of the switches' bridges (netns.py),
its BMC acting on it through QMP; the frontend's namespace holds the boot server
(bootserver.py: dnsmasq and HTTP) and the BMCs. Everything the boot server
serves is made by kabin's own commands, as on a real site: the loaders by
``ka-pxe install-loaders`` (``pxe.loaders``), the DHCP hosts by ``ka-pxe
dhcp-config`` (``pxe.dhcp``), the profiles by ``ka-pxe set deploy``; the
deployment kernel and initrd by ``deployenv``.
"""

import logging
import shutil
import subprocess

import yaml

from .. import config as config_mod
from .. import deployenv, pxe, records
from ..errors import SystemRequirementError, UsageError
from ..pxe import loaders
from . import configgen, control, netns, vm
from . import layout as layout_mod

log = logging.getLogger(__name__)
progress = logging.getLogger("kabin.progress")

FIRMWARE_CHOICES = ("bios", "uefi", "mixed")
MIN_MEMORY = 256
DEFAULT_DISK = "4G"       # partition.sh's VM layout: ESP, swap, a 1.5 GiB deploy partition, tmp
GRUB_HEADER = ("serial --unit=0 --speed=115200\nterminal_input serial console\n"
               "terminal_output serial console\nset timeout=1\n")
PXELINUX_HEADER = "SERIAL 0 115200\nPROMPT 0\nTIMEOUT 10\n"
BOOT_SECONDS = 120        # one TCG boot, firmware to sshd, with 2 machines sharing 2 CPUs


def settings(size, firmware="bios", memory=512, nic="virtio", disk_bus="virtio",
             disk_format="raw", pxe_method=None, local_method=None):
    """The VM settings kept in the instance's state; a UsageError for a bad one.

    ``pxe_method``: the cluster's; default pxelinux, or grub when a machine is UEFI
    (PXELINUX boots BIOS clients only). ``local_method``: the local boot's loader;
    default the PXE method's, grub for ipxe (which boots no partition)."""
    if firmware not in FIRMWARE_CHOICES:
        raise UsageError(f"--firmware: bios, uefi or mixed, not {firmware!r}")
    if pxe_method is None:
        pxe_method = "pxelinux" if firmware == "bios" else "grub"
    if local_method is None:
        local_method = "grub" if pxe_method == "ipxe" else pxe_method
    if pxe_method not in ("pxelinux", "grub", "ipxe") or \
            local_method not in ("pxelinux", "grub", "ipxe"):
        raise UsageError(f"--pxe-method, --local-method: pxelinux, grub or ipxe, not "
                         f"{pxe_method!r}, {local_method!r}")
    if "pxelinux" in (pxe_method, local_method) and firmware != "bios":
        raise UsageError("PXELINUX boots BIOS machines only: use grub or ipxe "
                         "with --firmware uefi or mixed")
    if memory < MIN_MEMORY:
        raise UsageError(f"--vm-memory: at least {MIN_MEMORY} MB (the deployment "
                         f"environment runs in RAM), not {memory}")
    if nic not in vm.NIC_MODELS or disk_bus not in vm.DISK_BUSES or \
            disk_format not in ("raw", "qcow2"):
        raise UsageError("NIC virtio|e1000, disk bus virtio|sata, disk format raw|qcow2")
    firmwares = [firmware if firmware != "mixed" else ("bios", "uefi")[i % 2]
                 for i in range(size)]
    return {"firmwares": firmwares, "memory": memory, "nic": nic, "disk_bus": disk_bus,
            "disk_format": disk_format, "pxe_method": pxe_method, "local_method": local_method}


def check_system(vm_settings):
    missing = vm.missing_requirements(set(vm_settings["firmwares"]))
    if shutil.which("dnsmasq", path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
        missing.append(("dnsmasq", "dnsmasq-base"))
    if vm_settings["disk_format"] == "qcow2" and shutil.which("qemu-img") is None:
        missing.append(("qemu-img", "qemu-utils"))
    if missing:
        raise SystemRequirementError(f"the VM tier needs {', '.join(w for w, _ in missing)} "
                                     f"(apt-get install {' '.join(p for _, p in missing)})")


def boot_timeout(size):
    return BOOT_SECONDS * max(1, (size + 1) // 2)


def block_device(vm_settings):
    return "/dev/vda" if vm_settings["disk_bus"] == "virtio" else "/dev/sda"


# ---------------------------------------------------------------- build

def build(lay, state, params):
    """The configuration, boot tree, disks and network of a VM-tier instance."""
    from .lifecycle import _shared_files, write_state   # the tiers share these steps
    settings_ = params["vm"]
    groups = layout_mod.switch_groups(lay.size, params["switches"])
    _shared_files(state)
    progress.info("instance %s: configuration in %s", lay.name, lay.config_dir)
    configgen.write(lay, groups)
    _adapt_cluster(lay, settings_)
    cfg = config_mod.Config(lay.config_dir)
    for root in (cfg.server.pxe_root, cfg.server.http_root):
        if not root.exists():
            root.mkdir(parents=True)
            state["created_trees"].append(str(root))
    write_state(lay, state)
    progress.info("instance %s: loaders, deployment kernel and initrd", lay.name)
    loaders.install(cfg.server.pxe_root, loaders.methods_in_use(cfg))
    boot = cfg.clusters["local"].boot
    deployenv.build(cfg.server.pxe_root / boot.deploy_kernel,
                    cfg.server.pxe_root / boot.deploy_initrd,
                    layout_mod.SHARED_KEY.with_suffix(".pub").read_text(),
                    cfg.server.deploy_marker_port)
    _write_deploy_profiles(cfg, lay)
    progress.info("instance %s: %d disks of %d MB", lay.name, lay.size,
                  params["disk_size"] >> 20)
    _make_disks(lay, settings_, params["disk_size"])
    progress.info("instance %s: network namespaces, bridges and taps", lay.name)
    netns.create(lay, groups, params["link_rate"], params["uplink_rate"], vm=True)


def _adapt_cluster(lay, settings_):
    """The cluster file for machines: their PXE method, the disk's real name."""
    path = lay.config_dir / "cluster-local.yml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    method = settings_["pxe_method"]
    local = settings_.get("local_method") or ("grub" if method == "ipxe" else method)
    data["pxe"] = {"method": method, "local_method": local, "naming": "ip_hex",
                   "headers": {"grub": GRUB_HEADER, "pxelinux": PXELINUX_HEADER}}
    data["partitioning"] = {   # iPXE boots the MBR's code: GRUB goes there on a dos table
        "block_device": block_device(settings_), "label": "dos" if local == "ipxe" else "gpt",
        "partitions": {"esp": 1, "swap": 2, "deploy": 3, "tmp": 4},
        "sizes": {"esp": "64MiB", "swap": "128MiB", "deploy": "1536MiB", "tmp": "rest"},
        "script": "scripts/partition.sh", "disable_swap": False}
    data["boot"]["bootloader"] = "grub"
    data["boot"]["sleep_time_before_ping"] = 5
    data["timeouts"] = {"reboot": f"{BOOT_SECONDS} + n * 30", "kexec": 120}
    data["automata"] = {   # TCG: a boot is a minute, a kexec half of it
        "SetDeploymentEnv": [{"type": "Untrusted", "timeout": "300 + n * 30", "retries": 1}],
        "BroadcastEnv": [{"type": "Chain", "timeout": 600, "retries": 1}],
        "BootNewEnv": [{"type": "Kexec", "timeout": 180, "retries": 0},
                       {"type": "Classical", "timeout": 300, "retries": 0},
                       {"type": "HardReboot", "timeout": 300, "retries": 1}]}
    text = path.read_text(encoding="utf-8").split("\n", 2)
    header = "\n".join(text[:2]) + "\n"
    path.write_text(header + "# VM tier: nodes are QEMU machines (TCG), booted by real firmware.\n"
                    + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100),
                    encoding="utf-8")


def _write_deploy_profiles(cfg, lay):
    written = list(pxe.set_profiles(cfg, pxe.Request("deploy"),
                                    map(records.new, lay.node_names)))
    bad = [r for r in written if not records.is_ok(r)]
    if bad:
        raise SystemRequirementError(f"ka-pxe set deploy failed: {bad[0]['error']}")


def _make_disks(lay, settings_, size):
    disk_dir = lay.dir / "disks"
    disk_dir.mkdir(exist_ok=True)
    for index in range(lay.size):
        path = disk_dir / f"{lay.node_name(index)}.{settings_['disk_format']}"
        if settings_["disk_format"] == "qcow2":
            done = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path),
                                   str(size)], capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                raise SystemRequirementError(f"qemu-img create failed: {done.stderr.strip()}")
        else:
            with open(path, "wb") as handle:
                handle.truncate(size)


# ---------------------------------------------------------------- start

def power_on_and_wait(lay, timeout):
    """Power every machine on (its BMC's action) and wait until each runs the deployment
    environment; a clear error naming a machine that did not, with its console."""
    for name in lay.node_names:
        control.request(lay.control_socket, {"op": "power", "node": name, "action": "on"})
    progress.info("instance %s: %d machines booting (TCG: about a minute each)", lay.name,
                  lay.size)
    answer = control.request(lay.control_socket, {"op": "wait", "nodes": lay.node_names,
                                                  "booted": "deploy", "timeout": timeout},
                             timeout=timeout + 30)
    if answer["pending"]:
        first = answer["pending"][0]
        raise SystemRequirementError(
            f"instance {lay.name}: {len(answer['pending'])} machines did not boot the "
            f"deployment environment in {timeout:.0f} s, e.g. {first['node']} "
            f"({first['firmware']}): {first['booted']}, console: {first['console']!r} "
            f"(ka-testbed console {first['node']} --instance {lay.name})")
