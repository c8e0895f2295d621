"""kadeploy onto the VM tier: real machines left running, from their own disk, what was written.

Two machines (node-1 SeaBIOS, node-2 OVMF) boot kabin's deployment environment
(ka-deployenv: a Debian kernel, an initramfs of this host's tools) from dnsmasq;
partition.sh makes a GPT table with an EFI system partition, the image is
broadcast and extracted (or written), install-bootloader.sh installs GRUB (the
deploy partition and the MBR gap on BIOS, the ESP with a boot entry on UEFI),
and the machines boot the environment's own kernel: by kexec, or through the
firmware, PXE local boot and the disk's GRUB (Classical). Then, over SSH, each
machine says which kernel runs, from which root, on which hardware.
"""

import json
import subprocess

import pytest
from vm_support import bring_up, console, facts, kadeploy

from kabin.chaincast import sinks, written

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]

NODES = ("node-1", "node-2")
ROOT = "/dev/vda3"       # the VM tier's cluster: GPT, esp 1, swap 2, deploy 3, tmp 4


@pytest.fixture(scope="module")
def vms():
    bed = bring_up("vm-deploy", 2, real_envs=True, firmware="mixed")
    yield bed
    bed.down()


def env_kernel(bed):
    """The kernel version the environment carries (its /boot/vmlinuz-VERSION)."""
    listing = subprocess.run(["tar", "--zstd", "-tf", str(bed.layout.dir / "envs" /
                                                          "realenv-tzst.tar.zst")],
                             capture_output=True, text=True, check=True).stdout
    [image] = [n for n in listing.split() if n.startswith("./boot/vmlinuz-")]
    return image.rsplit("vmlinuz-", 1)[1]


def assert_running(bed, env, boot):
    for node, firmware in zip(NODES, ("bios", "uefi")):
        seen = facts(bed, node)
        assert seen["kernel"] == env_kernel(bed), seen
        assert seen["root"] == ROOT and seen["vendor"] == "QEMU", seen
        assert seen["hostname"] == env and seen["firmware"] == firmware, seen
        if boot == "kexec":         # kexec'ed by the deployment environment: no loader
            assert seen["cmdline"] == f"root={ROOT} console=ttyS0", seen
        else:                       # the firmware, PXE local boot, then the disk's GRUB
            assert seen["cmdline"] == f"BOOT_IMAGE=/vmlinuz root={ROOT} ro console=ttyS0", seen


def test_tar_image_kexec(vms):
    rc, out, err = kadeploy(vms, "-e", "realenv-tzst", "-m", "node-[1-2]")
    assert rc == 0, err
    assert {n: (r["status"], r["variant"]["BootNewEnv"]) for n, r in out.items()} == \
        {"node-1": ("ok", "Kexec"), "node-2": ("ok", "Kexec")}
    assert_running(vms, "realenv-tzst", "kexec")


def test_a_running_system_is_kexeced_into_the_deployment_environment(vms):
    """SetDeploymentEnv Kexec: no firmware, no PXE: the deployed system kexecs the deployment
    kernel it was sent, which kexecs the new system in turn. Each node's digest of the tree
    it extracted, read back from its disk, is the one the frontend computes from the archive."""
    with open(vms.layout.dir / "envs" / "realenv-tzst.tar.zst", "rb") as handle:
        expected = written.expected_tree(sinks.decompressed(handle, "zstd"))
    before = {node: len(console(vms, node)) for node in NODES}
    rc, out, err = kadeploy(vms, "-e", "realenv-tzst", "-m", "node-[1-2]", "--force-steps",
                            "SetDeploymentEnv|Kexec:300:0&BroadcastEnv|Chain:600:0"
                            "&BootNewEnv|Kexec:180:0")
    assert rc == 0, err
    for node, record in out.items():
        assert record["variant"] == {"SetDeploymentEnv": "Kexec", "BroadcastEnv": "Chain",
                                     "BootNewEnv": "Kexec"}, record
        assert "send_deploy_kernel" in [h["step"] for h in record["history"]]
        assert record["written_sha256"] == expected
        since = console(vms, node)[before[node]:]
        assert "Network Boot Firmware" not in since and "SeaBIOS" not in since
        assert since.count("Linux version") == 2         # the deployment kernel, then the env's
    assert_running(vms, "realenv-tzst", "kexec")


def test_dd_image_boots_from_the_disk_without_kexec(vms):
    rc, out, err = kadeploy(vms, "-e", "realenv-dd", "-m", "node-[1-2]", "--no-kexec")
    assert rc == 0, err
    assert {n: r["variant"]["BootNewEnv"] for n, r in out.items()} == \
        {"node-1": "Classical", "node-2": "Classical"}
    assert_running(vms, "realenv-dd", "disk")
    entries = vms.ssh("node-2", "efibootmgr").stdout
    order = entries.split("BootOrder: ")[1].split()[0].split(",")
    names = {line[4:8]: line[10:] for line in entries.splitlines() if line.startswith("Boot0")}
    [kabin] = [number for number, name in names.items() if name == "kabin"]
    assert "PXE" in names[order[0]] and order.index(kabin) > 0    # the network stays first


def test_the_printed_pipeline_deploys_the_machines(vms, tmp_path):
    printed = subprocess.run(["ka-testbed", "exec", "--instance", vms.instance, "--",
                              "kadeploy", "-e", "realenv-tzst", "-m", "node-[1-2]",
                              "--print-pipeline"], capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    script = tmp_path / "pipeline.sh"
    script.write_text(printed.stdout)
    done = subprocess.run(["ka-testbed", "exec", "--instance", vms.instance, "--", "sh",
                           str(script)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = {r["node"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert {n: r["status"] for n, r in out.items()} == {"node-1": "ok", "node-2": "ok"}
    assert_running(vms, "realenv-tzst", "kexec")


def test_a_dead_machine_is_ko_with_a_reason_and_the_other_deploys(vms):
    vms.fault("node-2", "bmc-dead")
    vms.fault("node-2", "link-down")
    try:
        rc, out, err = kadeploy(vms, "-e", "realenv-dd", "-m", "node-[1-2]", "--force-steps",
                                "SetDeploymentEnv|Untrusted:150:0&BroadcastEnv|Chain:300:0"
                                "&BootNewEnv|Kexec:180:0")
    finally:
        vms.clear("node-2")
    assert rc == 1, err
    assert out["node-1"]["status"] == "ok"
    assert out["node-2"]["status"] == "ko" and out["node-2"]["error"], out["node-2"]
    assert facts(vms, "node-1")["hostname"] == "realenv-dd"
