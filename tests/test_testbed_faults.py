"""Every fault a testbed node can be given, against the real node (slow-link: test_testbed_netns)."""

import socket
import subprocess

import pytest

from kabin.testbed import layout

pytestmark = pytest.mark.testbed


def ipmitool(testbed, node, *args, retries=3):
    bmc = testbed.config.node(node).bmc
    return subprocess.run(["ipmitool", "-I", "lanplus", "-H", bmc.address, "-U", bmc.user,
                           "-f", str(layout.SHARED_SECRET), "-N", "1", "-R", str(retries), *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def node(testbed):
    """A node in the deployment environment; after the test, its faults cleared, it is
    power-cycled back into the deployment environment."""
    name = testbed.nodes[3]
    testbed.wait_booted(name, "deploy", 30)
    yield name
    testbed.clear(name)
    testbed.power(name, "cycle")
    testbed.wait_booted(name, "deploy", 30)


def test_never_returns(testbed, node):
    testbed.fault(node, "never-returns")
    assert testbed.ssh(node, "true").returncode == 0      # running nodes keep running
    testbed.power(node, "reset")
    testbed.wait_booted(node, "hung", 30)
    assert "never-returns" in testbed.status()[node]["detail"]
    testbed.clear(node)
    testbed.power(node, "reset")
    testbed.wait_booted(node, "deploy", 30)


def test_returns_on_the_nth_boot(testbed, node):
    testbed.fault(node, "returns-on-boot=3")
    for hung in (1, 2):
        testbed.power(node, "reset")
        testbed.wait_booted(node, "hung", 30)
        assert f"boot {hung} of 3" in testbed.status()[node]["detail"]
    testbed.power(node, "reset")
    testbed.wait_booted(node, "deploy", 30)


def test_ssh_dead(testbed, node):
    testbed.fault(node, "ssh-dead")
    failed = subprocess.run(testbed.ssh_argv(node, "true")[:1] + ["-o", "ConnectTimeout=2"]
                            + testbed.ssh_argv(node, "true")[1:], capture_output=True, text=True,
                            timeout=60)
    assert failed.returncode == 255
    with socket.create_connection((testbed.address(node), 22), timeout=5):
        pass                      # the port is open: sshd is there, it just never answers
    testbed.clear(node)
    assert testbed.ssh(node, "true").returncode == 0


def test_bmc_dead(testbed, node):
    testbed.fault(node, "bmc-dead")
    assert ipmitool(testbed, node, "chassis", "power", "status", retries=1).returncode != 0
    testbed.clear(node)
    assert "is on" in ipmitool(testbed, node, "chassis", "power", "status").stdout


def test_bmc_lies(testbed, node):
    testbed.fault(node, "bmc-lies")
    done = ipmitool(testbed, node, "chassis", "power", "off")
    assert done.returncode == 0 and "Down/Off" in done.stdout
    assert testbed.status()[node]["power"] == "on"
    assert testbed.ssh(node, "true").returncode == 0


def test_die_after_bytes(testbed, node):
    testbed.fault(node, "die-after-bytes=4M")
    assert testbed.ssh(node, "head -c 1000000 /dev/zero | wc -c").stdout.strip() == "1000000"
    sent = testbed.ssh(node, "cat > /dev/null", input="x" * (64 << 20), timeout=120)
    assert sent.returncode != 0
    testbed.wait_booted(node, "hung", 10)
    status = testbed.status()[node]
    assert status["power"] == "on" and "died after receiving" in status["detail"]


def test_disk_full(testbed, node):
    testbed.ssh(node, "mkfs.ext4 -q -F /dev/sda4")
    testbed.fault(node, "disk-full")
    write = "mount /dev/sda4 /mnt/dest && dd if=/dev/zero of=/mnt/dest/x bs=4k count=16; " \
            "rc=$?; umount /mnt/dest; exit $rc"
    full = testbed.ssh(node, write)
    assert full.returncode != 0 and "No space left on device" in full.stderr
    testbed.clear(node)
    assert testbed.ssh(node, write).returncode == 0
    # a file system mounted when the fault comes is filled too, and emptied when it goes
    assert testbed.ssh(node, "mount /dev/sda4 /mnt/dest").returncode == 0
    testbed.fault(node, "disk-full")
    append = "dd if=/dev/zero of=/mnt/dest/y bs=4k count=16"
    assert "No space left on device" in testbed.ssh(node, append).stderr
    testbed.clear(node)
    assert testbed.ssh(node, append + " && umount /mnt/dest").returncode == 0


def test_faults_are_refused_when_wrong(testbed):
    bad = subprocess.run(["ka-testbed", "fault", "--instance", testbed.instance, "node-1",
                          "slow-link=1mbit"], capture_output=True, text=True, env=testbed.env)
    assert bad.returncode == 2 and "netns" in bad.stderr
    bad = subprocess.run(["ka-testbed", "fault", "--instance", testbed.instance, "node-99",
                          "ssh-dead"], capture_output=True, text=True, env=testbed.env)
    assert bad.returncode == 2 and "node-99" in bad.stderr
