"""The testbed's nodes: real sshd, own disks, IPMI power, PXE-driven boots, kexec."""

import contextlib
import socket
import subprocess

import pytest
import yaml

from kabin.testbed import firmware, layout

pytestmark = pytest.mark.testbed

SECRET = str(layout.SHARED_SECRET)


# ---------------------------------------------------------------- helpers

def ssh_ok(testbed, node, command, timeout=60):
    done = testbed.ssh(node, command, timeout=timeout)
    assert done.returncode == 0, f"{node}: {command}: rc {done.returncode}: {done.stderr}"
    return done.stdout


def port_open(address, port):
    with socket.socket() as sock:
        sock.settimeout(5)
        return sock.connect_ex((address, port)) == 0


def install_system(testbed, node, partition, name):
    """A small real system (busybox, os-release NAME=name, a kernel file) on sdaN."""
    ssh_ok(testbed, node, f"""set -e
        mkfs.ext4 -q -F /dev/sda{partition}
        mount /dev/sda{partition} /mnt/dest
        cd /mnt/dest
        mkdir -p bin etc proc dev boot
        cp /bin/busybox bin/
        for applet in sh cat ls reboot poweroff mount; do ln -s busybox bin/$applet; done
        echo NAME={name} > etc/os-release
        echo 'kernel of {name}' > boot/vmlinuz
        cd /
        umount /mnt/dest""")


def os_release(testbed, node):
    return ssh_ok(testbed, node, "cat /etc/os-release").strip()


def profile_path(testbed, node, method):
    lay = testbed.layout
    name = firmware.profile_name("ip_hex", node, testbed.address(node), lay.mac(lay.index_of(node)))
    return firmware.profile_candidates(lay.pxe_root, method, name)[0]


@contextlib.contextmanager
def pxe_method(testbed, method, local_method=None):
    """Switch the instance's cluster to ``method`` (what its DHCP server tells the nodes)."""
    path = testbed.config_dir / "cluster-local.yml"
    original = path.read_text()
    data = yaml.safe_load(original)
    data["pxe"]["method"] = method
    data["pxe"]["local_method"] = local_method or method
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    try:
        yield
    finally:
        path.write_text(original)


def reboot_into(testbed, node, what, action="reset", timeout=30):
    before = testbed.status()[node]["boots"]
    testbed.power(node, action)
    testbed.wait_booted(node, what, timeout)
    assert testbed.status()[node]["boots"] > before


@pytest.fixture
def restored(testbed):
    """Nodes given to the test are back in the deployment environment after it."""
    touched = []
    yield touched.append
    for node in touched:
        for method in ("pxelinux", "ipxe", "grub"):
            profile_path(testbed, node, method).unlink(missing_ok=True)
        testbed.power(node, "cycle")
    if touched:
        testbed.wait_booted(touched, "deploy", 30)


# ---------------------------------------------------------------- nodes

def test_every_node_runs_sshd_and_sees_its_own_files(testbed):
    for index, node in enumerate(testbed.nodes):
        marker = f"disk-of-{node}"
        out = ssh_ok(testbed, node, f"""hostname; ls /dev | grep -c '^loop'; ls /dev/sd*
            ps -e --no-headers | wc -l; test -f /root/.ssh/authorized_keys && echo keys
            echo {marker} > /tmp/mine; ls /tmp; hostname -i
            printf {marker} | dd of=/dev/sda4 bs=512 seek=8 conv=notrunc,sync status=none""")
        lines = out.split()
        assert lines[0] == node and lines[1] == "0"
        assert lines[2:7] == ["/dev/sda", "/dev/sda1", "/dev/sda2", "/dev/sda3", "/dev/sda4"]
        assert int(lines[7]) < 10, "a node sees only its own processes"
        # /tmp may hold what earlier tests left on this node: its own files only
        assert lines[8] == "keys" and "mine" in lines[9:-1]
        assert lines[-1] == testbed.address(node)
    for node in testbed.nodes:   # what each wrote on its disk is on its disk only
        out = ssh_ok(testbed, node, "dd if=/dev/sda4 bs=512 skip=8 count=1 status=none | tr -d '\\0'")
        assert out == f"disk-of-{node}"


def test_a_node_disk_is_its_loop_device(testbed):
    node = testbed.nodes[0]
    ssh_ok(testbed, node, "printf host-sees-me | dd of=/dev/sda bs=512 seek=100 conv=notrunc "
                          "status=none")
    image = testbed.layout.dir / "disks" / f"{node}.img"
    with open(image, "rb") as handle:
        handle.seek(512 * 100)
        assert handle.read(11) == b"host-sees-m"


def test_repartition_then_partx_shows_the_new_partitions(testbed, restored):
    node = testbed.nodes[5]
    restored(node)
    out = ssh_ok(testbed, node, """sfdisk --quiet --wipe always /dev/sda <<EOF 2>/dev/null
label: dos
size=100MiB, type=83
type=83
EOF
        partx -u /dev/sda; ls /dev/sd*; blockdev --getsize64 /dev/sda1""")
    assert out.split() == ["/dev/sda", "/dev/sda1", "/dev/sda2", str(100 << 20)]
    script = testbed.config.clusters["local"].partitioning.script
    ssh_ok(testbed, node, f"sh {script}")
    assert ssh_ok(testbed, node, "ls /dev/sd*").split()[-1] == "/dev/sda4"


def test_the_deployment_environment_has_the_marker_port(testbed):
    for node in testbed.nodes:
        assert testbed.status()[node]["booted"] == "deploy"
        assert port_open(testbed.address(node), 25300)


# ---------------------------------------------------------------- power over IPMI

def ipmitool(testbed, node, *args):
    bmc = testbed.config.node(node).bmc
    return subprocess.run(["ipmitool", "-I", "lanplus", "-H", bmc.address, "-p", str(bmc.port),
                           "-U", bmc.user, "-f", SECRET, "-N", "2", "-R", "3", *args],
                          capture_output=True, text=True, timeout=60)


def test_power_with_ipmitool(testbed, restored):
    node = testbed.nodes[1]
    restored(node)
    assert "is on" in ipmitool(testbed, node, "chassis", "power", "status").stdout
    assert ipmitool(testbed, node, "chassis", "power", "off").returncode == 0
    testbed.wait_booted(node, "off", 10)
    assert "is off" in ipmitool(testbed, node, "chassis", "power", "status").stdout
    assert not port_open(testbed.address(node), 22)
    assert ipmitool(testbed, node, "chassis", "power", "on").returncode == 0
    testbed.wait_booted(node, "deploy", 30)
    ssh_ok(testbed, node, "true")
    before = testbed.status()[node]["boots"]
    assert ipmitool(testbed, node, "chassis", "power", "cycle").returncode == 0
    testbed.wait_booted(node, "deploy", 30)
    assert testbed.status()[node]["boots"] == before + 1
    actions = [line for line in (testbed.layout.dir / "bmc.log").read_text().splitlines()
               if f'"{node}"' in line]
    assert [a.split('"action": "')[1].split('"')[0] for a in actions[-3:]] == ["off", "on", "cycle"]


def test_power_and_boot_device_with_pyghmi(testbed, restored):
    from pyghmi.ipmi import command

    node = testbed.nodes[2]
    restored(node)
    bmc = testbed.config.node(node).bmc
    ipmi = command.Command(bmc=bmc.address, userid=bmc.user.encode(),
                           password=bmc.password.read().encode(), port=bmc.port)
    try:
        assert ipmi.get_power()["powerstate"] == "on"
        ipmi.set_power("off", wait=False)
        testbed.wait_booted(node, "off", 10)
        assert ipmi.get_power()["powerstate"] == "off"
        ipmi.set_bootdev("hd")      # the disk's MBR: no active partition, nothing boots
        ipmi.set_power("on", wait=False)
        testbed.wait_booted(node, "hung", 30)
        assert "no active partition" in testbed.status()[node]["detail"]
        ipmi.set_power("reset", wait=False)   # the boot device was for one boot only
        testbed.wait_booted(node, "deploy", 30)
    finally:
        ipmi.ipmi_session.logout()


# ---------------------------------------------------------------- what a boot boots

PROFILES = {
    "pxelinux": {"local": "DEFAULT l\nLABEL l\n  COM32 chain.c32\n  APPEND hd0 {part}\n",
                 "deploy": "DEFAULT d\nLABEL d\n  KERNEL {kernel}\n  APPEND initrd={initrd} x=1\n",
                 "kernel": "DEFAULT e\nLABEL e\n  KERNEL envs/t/vmlinuz\n  APPEND root=/dev/sda{part}\n"},
    "ipxe": {"local": "#!ipxe\nchain tftp://server/pxelinux.0\n",
             "deploy": "#!ipxe\nkernel {kernel} x=1\ninitrd {initrd}\nboot\n",
             "kernel": "#!ipxe\nkernel http://server/envs/t/vmlinuz root=/dev/sda{part}\nboot\n"},
    "grub": {"local": "set default=0\nmenuentry l {{\n  set root=(hd0,msdos{part})\n"
                      "  chainloader +1\n}}\n",
             "deploy": "menuentry d {{\n  linux (tftp)/{kernel} x=1\n  initrd /{initrd}\n}}\n",
             "kernel": "menuentry e {{\n  linux /envs/t/vmlinuz root=/dev/sda{part}\n}}\n"},
}


@pytest.fixture(scope="module")
def systems(testbed):
    """node-8 with a system on sda3 ('sys-three'), an empty ext4 sda2; an env kernel."""
    node = testbed.nodes[7]
    install_system(testbed, node, 3, "sys-three")
    ssh_ok(testbed, node, "mkfs.ext4 -q -F /dev/sda2")
    for root in (testbed.layout.pxe_root, testbed.layout.http_root):
        (root / "envs" / "t").mkdir(parents=True, exist_ok=True)
        (root / "envs" / "t" / "vmlinuz").write_text("an environment's kernel\n")
    return node


@pytest.mark.parametrize("method", ["pxelinux", "ipxe", "grub"])
def test_boot_follows_the_profile(testbed, systems, restored, method):
    node = systems
    restored(node)
    boot = testbed.config.clusters["local"].boot
    fields = {"kernel": boot.deploy_kernel, "initrd": boot.deploy_initrd}
    with pxe_method(testbed, method):
        path = profile_path(testbed, node, method)
        pxelinux = profile_path(testbed, node, "pxelinux")   # iPXE's local boot chains there
        pxelinux.write_text(PROFILES["pxelinux"]["local"].format(part=3))
        for kind, want, part in (("local", "system:3", 3), ("deploy", "deploy", 3),
                                 ("kernel", "system:3", 3), ("local", "hung", 2),
                                 ("kernel", "hung", 4)):
            if kind == "local" and method == "ipxe":
                pxelinux.write_text(PROFILES["pxelinux"]["local"].format(part=part))
            path.write_text(PROFILES[method][kind].format(part=part, **fields))
            reboot_into(testbed, node, want)
            if want == "system:3":
                assert os_release(testbed, node) == "NAME=sys-three"
                assert not port_open(testbed.address(node), 25300)
            elif want == "deploy":
                assert port_open(testbed.address(node), 25300)
                assert "ID=" in os_release(testbed, node)     # the host's system
            else:
                assert not port_open(testbed.address(node), 22)


@pytest.mark.parametrize("method, local_method", [("pxelinux", "pxelinux"), ("ipxe", "pxelinux"),
                                                  ("grub", "grub"), ("ipxe", "grub")])
def test_profiles_written_by_ka_pxe_boot(testbed, systems, restored, method, local_method):
    node = systems
    restored(node)

    def ka_pxe(*args):
        done = subprocess.run(["ka-pxe", *args, "-m", node], capture_output=True, text=True,
                              env=testbed.env, timeout=60)
        assert done.returncode == 0, done.stderr

    with pxe_method(testbed, method, local_method):
        ka_pxe("set", "local", "--partition", "3")
        reboot_into(testbed, node, "system:3")
        ka_pxe("set", "deploy")
        reboot_into(testbed, node, "deploy")
        ka_pxe("clear")


def test_a_missing_kernel_does_not_boot(testbed, systems, restored):
    node = systems
    restored(node)
    profile_path(testbed, node, "pxelinux").write_text(
        "DEFAULT e\nLABEL e\n  KERNEL envs/none/vmlinuz\n  APPEND root=/dev/sda3\n")
    reboot_into(testbed, node, "hung")
    assert "not found" in testbed.status()[node]["detail"]


def test_soft_reboot_and_poweroff_from_the_node(testbed, systems, restored):
    node = systems
    restored(node)
    profile_path(testbed, node, "pxelinux").write_text(PROFILES["pxelinux"]["local"].format(part=3))
    before = testbed.status()[node]["boots"]
    ssh_ok(testbed, node, "reboot")          # the testbed's reboot, in the deployment environment
    testbed.wait_booted(node, "booting", 10)
    testbed.wait_booted(node, "system:3", 30)
    testbed.ssh(node, "reboot")              # busybox's, in the deployed system: it drops the session
    testbed.wait_booted(node, "booting", 10)
    testbed.wait_booted(node, "system:3", 30)
    assert testbed.status()[node]["boots"] == before + 2
    testbed.ssh(node, "poweroff")
    testbed.wait_booted(node, "off", 10)
    assert testbed.status()[node]["power"] == "off"


def test_kexec_boots_the_loaded_kernel_without_pxe(testbed, systems, restored):
    node = systems
    restored(node)
    profile = profile_path(testbed, node, "pxelinux")
    profile.write_text(PROFILES["pxelinux"]["local"].format(part=2))   # would not boot
    ssh_ok(testbed, node, "mount /dev/sda3 /mnt/dest && kexec -l /mnt/dest/boot/vmlinuz "
                          "--append='root=/dev/sda3 quiet' && umount /mnt/dest && kexec -e")
    testbed.wait_booted(node, "system:3", 30)
    assert "(kexec)" in testbed.status()[node]["detail"]
    profile.unlink()
    reboot_into(testbed, node, "deploy")
    deploy_kernel = testbed.layout.pxe_root / testbed.config.clusters["local"].boot.deploy_kernel
    profile.write_text(PROFILES["pxelinux"]["local"].format(part=3))
    ssh_ok(testbed, node, f"kexec -l {deploy_kernel} && reboot")    # reboot boots it too
    testbed.wait_booted(node, "booting", 10)
    testbed.wait_booted(node, "deploy", 30)
    failed = testbed.ssh(node, "kexec -e")
    assert failed.returncode != 0 and "Nothing has been loaded" in failed.stderr


def test_disk_boot_starts_the_active_partition(testbed, systems, restored):
    node = systems
    restored(node)
    ssh_ok(testbed, node, "sfdisk --activate /dev/sda 3 2>/dev/null")
    profile_path(testbed, node, "pxelinux").write_text("DEFAULT l\nLABEL l\n  LOCALBOOT 0\n")
    reboot_into(testbed, node, "system:3")
    assert os_release(testbed, node) == "NAME=sys-three"
