"""The VM tier (ka-testbed up --vm): QEMU machines booted by real firmware from dnsmasq.

Each instance has two machines (node-1 SeaBIOS + iPXE ROM, node-2 OVMF, except
the PXELINUX one: BIOS only), a real boot server (dnsmasq's DHCP and TFTP, an
HTTP server) whose hosts and loaders kabin's own ``ka-pxe dhcp-config`` and
``install-loaders`` produced, and BMCs speaking IPMI over UDP that drive the
machines through QMP. The machines boot the deployment environment (a Debian
kernel, an initramfs with sshd) named by the profiles ``ka-pxe set deploy``
wrote, and print its command line on their serial console.
"""

import json
import subprocess
import time

import pytest
from vm_support import bring_up, console, deploy_and_boot_from_the_disk, make_real_envs

from kabin.testbed import lifecycle

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]

DEPLOY_CMDLINE = "console=ttyS0 kabin.env=deploy"


@pytest.fixture(scope="module")
def grub_vms():
    bed = bring_up("vm-grub", 2, firmware="mixed")
    yield bed
    bed.down()


def cmdlines(bed, node):
    return [line.split("KABIN-CMDLINE", 1)[1].strip()
            for line in console(bed, node).splitlines() if "KABIN-CMDLINE" in line]


def run(bed, *argv, timeout=600):
    """A kabin command in the frontend's namespace; (rc, {node: record}, stderr)."""
    done = subprocess.run(["ka-testbed", "exec", "--instance", bed.instance, "--", *argv],
                          capture_output=True, text=True, timeout=timeout, env=bed.env)
    out = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            out[record.get("node")] = record
    return done.returncode, out, done.stderr


def text(bed, *argv, timeout=120):
    """A command in the frontend's namespace; the CompletedProcess (text)."""
    return subprocess.run(["ka-testbed", "exec", "--instance", bed.instance, "--", *argv],
                          capture_output=True, text=True, timeout=timeout, env=bed.env)


def journal(bed, since):
    lines = (bed.layout.dir / "bmc.log").read_text().splitlines()
    return [(e["node"], e["action"], e.get("lied", False)) for e in map(json.loads, lines)
            if e["time"] >= since and e["action"] != "bootdev"]


# ---------------------------------------------------------------- boot

def test_both_firmwares_boot_the_deploy_profile_through_grub(grub_vms):
    status = grub_vms.status()
    assert [(n, r["kind"], r["firmware"], r["power"], r["booted"]) for n, r in
            sorted(status.items())] == [("node-1", "vm", "bios", "on", "deploy"),
                                        ("node-2", "vm", "uefi", "on", "deploy")]
    for node, loader in (("node-1", "i386-pc"), ("node-2", "x86_64-efi")):
        assert cmdlines(grub_vms, node)[-1] == f"BOOT_IMAGE=/kernels/deploy-vmlinuz " \
                                               f"{DEPLOY_CMDLINE}"
    log = (grub_vms.layout.dir / "boot" / "dnsmasq.log").read_text()
    assert "bootfile name: grub/i386-pc/core.0" in log    # what dnsmasq told each firmware
    assert "bootfile name: grub/x86_64-efi/core.efi" in log


def test_the_machines_are_what_they_claim(grub_vms):
    for node, efi in (("node-1", "no"), ("node-2", "yes")):
        done = grub_vms.ssh(node, "cat /sys/class/dmi/id/sys_vendor; "
                                  "[ -d /sys/firmware/efi ] && echo yes || echo no; "
                                  "ip -4 -o addr show dev eth0")
        assert done.returncode == 0, done.stderr
        vendor, firmware, address = done.stdout.splitlines()
        assert vendor == "QEMU" and firmware == efi
        assert f"inet {grub_vms.address(node)}/16" in address   # the fixed DHCP entry


# ---------------------------------------------------------------- power through IPMI -> QMP

def test_hard_reboot_power_cycles_through_ipmi_and_qmp(grub_vms):
    boots_before = {n: len(cmdlines(grub_vms, n)) for n in ("node-1", "node-2")}
    since = time.time()
    rc, out, err = run(grub_vms, "ka-reboot", "-m", "node-[1-2]", "--level", "hard",
                       "--wait", "deploy", "--format", "json")
    assert rc == 0, err
    assert {n: (r["status"], r["level"]) for n, r in out.items()} == \
        {"node-1": ("ok", "hard"), "node-2": ("ok", "hard")}
    assert sorted(journal(grub_vms, since)) == [("node-1", "cycle", False),
                                                ("node-2", "cycle", False)]
    for node, count in boots_before.items():     # each firmware booted once more
        assert len(cmdlines(grub_vms, node)) == count + 1


def test_power_off_status_on_read_back_from_qmp(grub_vms):
    rc, out, err = run(grub_vms, "ka-reboot", "power", "off", "-m", "node-1", "--level", "hard",
                       "--format", "json")
    assert rc == 0, err
    status = grub_vms.status()["node-1"]
    assert (status["power"], status["qemu"]) == ("off", "paused")
    rc, out, err = run(grub_vms, "ka-reboot", "power", "status", "-m", "node-[1-2]",
                       "--format", "json")
    assert rc == 0, err
    assert {n: r["power"] for n, r in out.items()} == {"node-1": "off", "node-2": "on"}
    bmc = grub_vms.config.node("node-1").bmc
    ipmitool = text(grub_vms, "ipmitool", "-I", "lanplus", "-H", bmc.address, "-U", "admin",
                    "-f", "/var/lib/kabin/testbed/bmc.secret", "chassis", "power", "status")
    assert ipmitool.stdout.strip() == "Chassis Power is off", ipmitool.stderr
    rc, out, err = run(grub_vms, "ka-reboot", "power", "on", "-m", "node-1", "--wait",
                       "deploy", "--format", "json")
    assert rc == 0, err
    assert grub_vms.status()["node-1"]["booted"] == "deploy"


def test_a_lying_bmc_escalates_to_very_hard(grub_vms):
    grub_vms.fault("node-1", "bmc-lies")
    since = time.time()
    try:
        rc, out, err = run(grub_vms, "ka-reboot", "-m", "node-1", "--level", "hard,very_hard",
                           "-t", "15", "--format", "json")
    finally:
        grub_vms.clear("node-1")
    assert rc == 1, err
    record = out["node-1"]
    assert record["status"] == "ko"
    assert [a["level"] for a in record["attempts"]] == ["hard", "very_hard"]
    assert record["attempts"][0]["error"] == "the node did not go down within 15 s"
    assert journal(grub_vms, since)[0] == ("node-1", "cycle", True)
    assert grub_vms.status()["node-1"]["booted"] == "deploy"   # nothing happened to it


def test_link_down_makes_a_running_machine_unreachable(grub_vms):
    grub_vms.fault("node-1", "link-down")
    try:
        assert grub_vms.ssh("node-1", "true", timeout=60).returncode != 0
        status = grub_vms.status()["node-1"]
        assert (status["power"], status["booted"], status["faults"]) == \
            ("on", "none", ["link-down"])
    finally:
        grub_vms.clear("node-1")
    grub_vms.wait_booted("node-1", "deploy", timeout=60)
    assert grub_vms.ssh("node-1", "true").returncode == 0


@pytest.mark.parametrize("node, message", [("node-1", "No bootable device"),
                                           ("node-2", "Shell>")])
def test_a_machine_hanging_in_its_firmware_is_ko(grub_vms, node, message):
    grub_vms.fault(node, "firmware-hang")
    try:
        rc, out, err = run(grub_vms, "ka-reboot", "-m", node, "--level", "hard", "-t", "30",
                           "--format", "json")
        assert rc == 1, err
        assert out[node]["error"].startswith("Unreachable after the reboot"), out[node]
        assert grub_vms.status()[node]["power"] == "on"
        assert message in console(grub_vms, node)[-4000:]
    finally:
        grub_vms.clear(node)
    rc, out, err = run(grub_vms, "ka-reboot", "-m", node, "--level", "hard", "--wait", "deploy")
    assert rc == 0, err


def test_console_command_prints_the_console(grub_vms):
    done = subprocess.run(["ka-testbed", "console", "node-2", "--no-follow", "--instance",
                           grub_vms.instance], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"KABIN-CMDLINE BOOT_IMAGE=/kernels/deploy-vmlinuz {DEPLOY_CMDLINE}" in done.stdout


# ---------------------------------------------------------------- iPXE, HTTP, PXELINUX

IPXE_HTTP = """#!ipxe
{{ header }}
kernel http://${next-server}/{{ kernel }} {{ params }} initrd=initrd.img kabin.over=http
initrd --name initrd.img http://${next-server}/{{ initrd }}
boot
"""


@pytest.fixture(scope="module")
def ipxe_vms():
    bed = bring_up("vm-ipxe", 2, firmware="mixed", pxe_method="ipxe")
    yield bed
    bed.down()


def test_ipxe_boots_both_firmwares_then_over_http(ipxe_vms, tmp_path):
    for node in ("node-1", "node-2"):      # (iPXE's EFI loader puts the image's name first)
        assert cmdlines(ipxe_vms, node)[-1].split()[-3:] == \
            ["initrd=initrd.img", *DEPLOY_CMDLINE.split()]
    template = tmp_path / "http.ipxe"
    template.write_text(IPXE_HTTP)
    rc, _, err = run(ipxe_vms, "ka-pxe", "set", "custom", "--template", str(template),
                     "-m", "node-[1-2]")
    assert rc == 0, err
    rc, out, err = run(ipxe_vms, "ka-reboot", "-m", "node-[1-2]", "--level", "hard", "--wait",
                       "deploy", "--format", "json")
    assert rc == 0, err
    for node in ("node-1", "node-2"):
        assert cmdlines(ipxe_vms, node)[-1].split()[-4:] == \
            [*DEPLOY_CMDLINE.split(), "initrd=initrd.img", "kabin.over=http"]
        assert "http://10." in console(ipxe_vms, node)


def test_ipxe_local_boot_chains_the_disks_grub_on_both_firmwares(ipxe_vms):
    """The cluster's local loader is GRUB: iPXE chains GRUB's network image for its firmware,
    whose local profile starts the deploy partition's GRUB (BIOS) or the ESP's (UEFI)."""
    make_real_envs(ipxe_vms)
    seen = deploy_and_boot_from_the_disk(ipxe_vms, ("node-1", "node-2"))
    assert "grub/i386-pc/core.0" in seen["node-1"]
    assert "grub/x86_64-efi/core.efi" in seen["node-2"]
    assert all("Booting `kabin local'" in text for text in seen.values())


def test_a_removed_disk_fails_every_io_until_it_is_plugged_back(ipxe_vms):
    def read_first_block():
        return ipxe_vms.ssh("node-1", "dd if=/dev/vda bs=4096 count=1 iflag=direct | sha256sum")
    before = read_first_block()
    assert before.returncode == 0, before.stderr
    ipxe_vms.fault("node-1", "disk-removed")
    pulled = ipxe_vms.ssh("node-1", "dd if=/dev/vda of=/dev/null bs=4096 count=1 iflag=direct")
    assert pulled.returncode != 0
    assert "I/O error" in pulled.stderr or "Input/output error" in pulled.stderr, pulled.stderr
    written = ipxe_vms.ssh("node-1", "dd if=/dev/zero of=/dev/vda4 bs=4096 count=1 oflag=direct")
    assert written.returncode != 0, written.stderr
    ipxe_vms.clear("node-1")
    after = read_first_block()
    assert (after.returncode, after.stdout) == (0, before.stdout), after.stderr


def test_down_after_a_crash_removes_every_part(ipxe_vms):
    lay, state = ipxe_vms.layout, lifecycle.read_state(ipxe_vms.instance)
    subprocess.run(["kill", "-9", str(state["supervisor"]["pid"])], check=True)
    qemus = _processes_naming(lay.dir)
    deadline = time.monotonic() + 30
    while qemus and time.monotonic() < deadline:   # the machines die with their parent
        time.sleep(0.5)
        qemus = _processes_naming(lay.dir)
    assert qemus == []
    assert lifecycle.down(ipxe_vms.instance)
    assert not lay.dir.exists()
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert lay.netns_prefix not in listing


def _processes_naming(directory):
    done = subprocess.run(["pgrep", "-af", str(directory)], capture_output=True, text=True)
    return [line for line in done.stdout.splitlines() if "pgrep" not in line]


@pytest.fixture(scope="module")
def pxelinux_vm():
    bed = bring_up("vm-pxl", 1, firmware="bios", pxe_method="pxelinux")
    yield bed
    bed.down()


def test_pxelinux_boots_a_bios_machine(pxelinux_vm):
    assert cmdlines(pxelinux_vm, "node-1")[-1] == \
        f"BOOT_IMAGE=kernels/deploy-vmlinuz {DEPLOY_CMDLINE} initrd=kernels/deploy-initrd.img"
    log = (pxelinux_vm.layout.dir / "boot" / "dnsmasq.log").read_text()
    assert "pxelinux.0" in log


def test_pxelinux_local_boot_chains_the_deploy_partition(pxelinux_vm):
    make_real_envs(pxelinux_vm)
    log = pxelinux_vm.layout.dir / "boot" / "dnsmasq.log"
    start = log.stat().st_size
    deploy_and_boot_from_the_disk(pxelinux_vm, ("node-1",))
    with open(log, errors="replace") as handle:
        handle.seek(start)
        assert "chain.c32" in handle.read()     # PXELINUX's COM32 chain.c32 hd0 3


def test_ipxe_sanboot_boots_the_grub_of_the_mbr():
    """iPXE boots no partition: with it as the local loader the disk gets an MBR table and
    install-bootloader.sh puts GRUB in the MBR, which 'sanboot --drive 0x80' starts."""
    bed = bring_up("vm-san", 1, firmware="bios", pxe_method="ipxe", local_method="ipxe")
    try:
        assert bed.config.clusters["local"].partitioning.label == "dos"
        make_real_envs(bed)
        seen = deploy_and_boot_from_the_disk(bed, ("node-1",))
        assert "Booting from SAN device 0x80" in seen["node-1"]
    finally:
        bed.down()


def test_an_e1000_machine_with_a_sata_qcow2_disk():
    bed = bring_up("vm-sata", 1, firmware="uefi", nic="e1000", disk_bus="sata",
                    disk_format="qcow2")
    try:
        done = bed.ssh("node-1", "basename $(readlink /sys/class/net/eth0/device/driver); "
                                 "[ -b /dev/sda ] && echo sda; [ -d /sys/firmware/efi ] && echo efi")
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["e1000", "sda", "efi"]
        image = bed.layout.dir / "disks" / "node-1.qcow2"
        info = json.loads(subprocess.run(["qemu-img", "info", "--force-share", "--output=json",
                                          str(image)], capture_output=True, text=True,
                                         check=True).stdout)
        assert info["format"] == "qcow2"
        assert bed.config.clusters["local"].partitioning.block_device == "/dev/sda"
    finally:
        bed.down()
