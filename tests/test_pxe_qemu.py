"""ka-pxe's profiles booted by real firmware: iPXE (QEMU's NIC ROM), PXELINUX and GRUB.

One TFTP tree, written by the ka-pxe command, serves every VM through QEMU's
built-in DHCP/TFTP server (``-netdev user,restrict=on,tftp=...``); each VM is one
node of a cluster whose pxe section picks the loader, the naming and the local
boot method. The serial console says what was booted: the initrd's init prints
its marker and /proc/cmdline; the disk's boot sectors print which one ran (MBR
or partition N). The VMs boot in parallel, each with a bounded wait.
"""

import os
import shutil
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from qemu import firmware
from qemu.cluster import make_config

from kabin import db, envs

pytestmark = pytest.mark.qemu

BOOT_TIMEOUT = 240     # s per VM; a boot takes 7-25 s, more when the machine is busy
PARALLEL_VMS = 4       # TCG: one busy thread per VM
DEPLOY_PARAMS = "console=ttyS0 kabin.env=deploy"
USER_PARAMS = "console=ttyS0"
PXELINUX_HEADER = "PROMPT 0\nTIMEOUT 10\nSERIAL 0 115200\n"
GRUB_HEADER = "serial --unit=0 --speed=115200\nterminal_output serial console\n"


def _vm(number, name):
    return name, f"10.0.2.{number}", f"52:54:00:00:00:{number:02x}"


CLUSTERS = {
    "pxl": {"pxe": {"method": "pxelinux", "naming": "ip_hex",
                    "headers": {"pxelinux": PXELINUX_HEADER}},
            "nodes": [_vm(21, "pxl-deploy"), _vm(22, "pxl-local"), _vm(23, "pxl-netboot"),
                      _vm(24, "pxl-custom")]},
    "grub": {"pxe": {"method": "grub", "naming": "mac", "headers": {"grub": GRUB_HEADER}},
             "nodes": [_vm(25, "grub-deploy"), _vm(26, "grub-local")]},
    "grubip": {"pxe": {"method": "grub", "naming": "ip", "headers": {"grub": GRUB_HEADER}},
               "nodes": [_vm(27, "grubip-deploy")]},
    "ipxe": {"pxe": {"method": "ipxe", "naming": "hostname"},
             "nodes": [_vm(28, "ipxe-deploy"), _vm(29, "ipxe-local")]},
    "ipxe2pxl": {"pxe": {"method": "ipxe", "local_method": "pxelinux", "naming": "mac",
                         "headers": {"pxelinux": "SERIAL 0 115200\n"}},
                 "nodes": [_vm(30, "ipxe2pxl-local")]},
    "pxl2grub": {"pxe": {"method": "pxelinux", "local_method": "grub", "naming": "ip_hex",
                         "headers": {"grub": GRUB_HEADER}},
                 "nodes": [_vm(31, "pxl2grub-local")]},
    "grub2pxl": {"pxe": {"method": "grub", "local_method": "pxelinux", "naming": "ip_hex",
                         "headers": {"grub": GRUB_HEADER}},
                 "nodes": [_vm(32, "grub2pxl-local")]},
    "pxl2ipxe": {"pxe": {"method": "pxelinux", "local_method": "ipxe", "naming": "ip_hex"},
                 "nodes": [_vm(33, "pxl2ipxe-local")]},
    "grub2ipxe": {"pxe": {"method": "grub", "local_method": "ipxe", "naming": "mac"},
                  "nodes": [_vm(34, "grub2ipxe-local")]},
    "ipxe2grub": {"pxe": {"method": "ipxe", "local_method": "grub", "naming": "ip"},
                  "nodes": [_vm(35, "ipxe2grub-local")]},
}
for _spec in CLUSTERS.values():
    _spec["deploy"] = {"params": DEPLOY_PARAMS}
    _spec["user_params"] = USER_PARAMS

NODES = {name: (address, mac, cluster) for cluster, spec in CLUSTERS.items()
         for name, address, mac in spec["nodes"]}
LOADERS = {"pxelinux": "pxelinux.0", "grub": "grub/i386-pc/core.0"}

CUSTOM_TEMPLATE = """{{ header }}
DEFAULT custom
LABEL custom
  KERNEL {{ kernel }}
  INITRD {{ initrd }}
  APPEND {{ params }} kabin.node={{ node }} kabin.mac={{ mac }}
"""

# (ka-pxe arguments, nodes); netboot and custom need files made by the fixture
COMMANDS = [
    (["set", "deploy"], ["pxl-deploy", "grub-deploy", "grubip-deploy", "ipxe-deploy"]),
    (["set", "local"], ["pxl-local", "ipxe2pxl-local"]),                 # deploy partition 3
    (["set", "local", "--partition", "2"], ["grub-local"]),
    (["set", "local", "--partition", "disk"], ["ipxe-local"]),
    (["set", "local", "--partition", "1"], ["pxl2grub-local"]),
    (["set", "local", "--partition", "4"], ["grub2pxl-local"]),
    (["set", "local", "--partition", "disk"], ["pxl2ipxe-local", "grub2ipxe-local"]),
    (["set", "local", "--partition", "2"], ["ipxe2grub-local"]),
]


def _bootfile(node):
    """What the DHCP server hands the node: its cluster's loader; for iPXE its own script
    (ipxe-local) or the dispatcher, which tries every naming in use (ipxe-deploy: by
    hostname, ipxe2pxl-local: by MAC, ipxe2grub-local: by IP)."""
    method = CLUSTERS[NODES[node][2]]["pxe"]["method"]
    if method == "ipxe":
        return f"ipxe/{node}" if node == "ipxe-local" else "ipxe/boot.ipxe"
    return LOADERS[method]


def ka_pxe(config, *args):
    cmd = [sys.executable, "-c", "from kabin.cli.pxe import main; main()", *args,
           "--config", str(config.dir), "--format", "json"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          check=False)


@pytest.fixture(scope="module")
def boots(tmp_path_factory):
    reason = firmware.missing_requirements()
    if reason:
        pytest.skip(f"real-firmware PXE tests need QEMU and the loaders: {reason}")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kabin-tests"
    kernel, why = firmware.find_kernel(cache / "kernel")
    if kernel is None:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("pxe-qemu")
    config = make_config(tmp, CLUSTERS)
    tree = config.server.pxe_root
    _prepare_tree(tree, kernel, tmp)
    _add_netboot_env(config, kernel, tmp)
    _write_profiles(config, tmp)
    disk = tmp / "disk.img"
    firmware.write_disk(disk)
    vms = {node: _make_vm(tree, node, disk) for node in NODES}
    with ThreadPoolExecutor(PARALLEL_VMS) as pool:
        list(pool.map(lambda vm: vm.run(BOOT_TIMEOUT), vms.values()))
    return vms


def _prepare_tree(tree, kernel, tmp):
    firmware.install_loaders(tree)
    (tree / "kernels").mkdir()
    shutil.copy(kernel, tree / "kernels" / "deploy-vmlinuz")
    firmware.write_initrd(tree / "kernels" / "deploy-initrd.img", "deploy")
    (tmp / "custom.tmpl").write_text(CUSTOM_TEMPLATE)


def _add_netboot_env(config, kernel, tmp):
    """Environment "netboot-env": a tar image holding the kernel (behind a /vmlinuz link)
    and an initrd whose marker is "netboot"."""
    firmware.write_initrd(tmp / "netboot-initrd.img", "netboot")
    image = tmp / "netboot-env.tgz"
    with tarfile.open(image, "w:gz", compresslevel=1) as archive:
        archive.add(kernel, "boot/vmlinuz-test")
        archive.add(tmp / "netboot-initrd.img", "boot/initrd.img-test")
        for link, target in (("vmlinuz", "boot/vmlinuz-test"),
                             ("initrd.img", "boot/initrd.img-test")):
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, target
            archive.addfile(info)
    desc = tmp / "netboot-env.yml"
    desc.write_text(yaml.safe_dump({
        "name": "netboot-env", "version": 1, "os": "linux", "filesystem": "ext4",
        "image": {"file": str(image), "kind": "tar", "compression": "gzip"},
        "boot": {"kernel": "/vmlinuz", "initrd": "/initrd.img",
                 "kernel_params": "kabin.env=netboot"}}))
    with db.open_database(config) as database:
        envs.add_file(database, desc, envs.current_user())


def _write_profiles(config, tmp):
    commands = COMMANDS + [
        (["set", "netboot", "--env", "netboot-env", "--params", "kabin.extra=1"],
         ["pxl-netboot"]),
        (["set", "custom", "--template", str(tmp / "custom.tmpl")], ["pxl-custom"]),
    ]
    for args, nodes in commands:
        done = ka_pxe(config, *args, "-m", ",".join(nodes))
        assert done.returncode == 0, (args, done.stdout, done.stderr)


def _make_vm(tree, node, disk):
    address, mac, _ = NODES[node]
    return firmware.Boot(tree, _bootfile(node), mac, address,
                         disk=disk if node.endswith("-local") else None, hostname=node)


def _boot_images(cmdline):
    return [w.split("=", 1)[1].lstrip("/") for w in cmdline if w.startswith("BOOT_IMAGE=")]


def _explain(vm):
    tail = vm.console.replace("\x1b", "")[-1500:]
    return f"timed out: {vm.timed_out}; console tail:\n{tail}"


@pytest.mark.parametrize("node", ["pxl-deploy", "grub-deploy", "grubip-deploy", "ipxe-deploy"])
def test_deploy_profile_boots_the_deploy_kernel_and_initrd(boots, node):
    vm = boots[node]
    assert vm.line(firmware.BOOT_MARKER) == "deploy", _explain(vm)
    cmdline = vm.line(firmware.CMDLINE_MARKER).split()
    assert set(DEPLOY_PARAMS.split()) <= set(cmdline)
    if not node.startswith("ipxe"):  # PXELINUX and GRUB name the kernel file they loaded
        assert _boot_images(cmdline) == ["kernels/deploy-vmlinuz"]


def test_netboot_profile_boots_the_cached_kernel_and_initrd(boots):
    vm = boots["pxl-netboot"]
    assert vm.line(firmware.BOOT_MARKER) == "netboot", _explain(vm)
    cmdline = vm.line(firmware.CMDLINE_MARKER).split()
    assert {"kabin.env=netboot", "kabin.extra=1", USER_PARAMS} <= set(cmdline)
    [image] = _boot_images(cmdline)
    assert image.startswith("kabin-cache/") and image.endswith("-vmlinuz-test"), image


def test_custom_profile_gets_the_node_values(boots):
    vm = boots["pxl-custom"]
    assert vm.line(firmware.BOOT_MARKER) == "deploy", _explain(vm)
    cmdline = vm.line(firmware.CMDLINE_MARKER).split()
    assert "kabin.node=pxl-custom" in cmdline and "kabin.mac=52:54:00:00:00:18" in cmdline


@pytest.mark.parametrize("node, booted", [
    ("pxl-local", "PART3"),          # PXELINUX chain.c32 hd0 3 (the deploy partition)
    ("grub-local", "PART2"),         # GRUB chainloader +1 on (hd0,msdos2)
    ("ipxe-local", "MBR"),           # iPXE sanboot of drive 0x80
    ("ipxe2pxl-local", "PART3"),     # iPXE -> pxelinux.0 (options 209/210) -> chain.c32
    ("pxl2grub-local", "PART1"),     # PXELINUX -> GRUB core.0 (finds grub.cfg-<IPHEX>)
    ("grub2pxl-local", "PART4"),     # GRUB -> ipxe.lkrn -> pxelinux.0 -> chain.c32
    ("pxl2ipxe-local", "MBR"),       # PXELINUX -> ipxe.lkrn + its script as initrd
    ("grub2ipxe-local", "MBR"),      # GRUB linux16 ipxe.lkrn + initrd16 its script
    ("ipxe2grub-local", "PART2"),    # iPXE -> GRUB core.0 -> grub.cfg dispatcher by IP
])
def test_local_profile_chains_to_the_disk(boots, node, booted):
    vm = boots[node]
    assert vm.line(firmware.DISK_MARKER) == booted, _explain(vm)
    assert vm.line(firmware.BOOT_MARKER) is None
