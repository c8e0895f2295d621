"""The netns tier: a namespace per node, bridges, and links shaped at the asked rate."""

import os
import select
import subprocess
import sys

import pytest

from kabin.testbed import layout
from kabin.testbed.instance import Testbed

pytestmark = pytest.mark.testbed

LINK_RATE = 40_000_000
RECEIVER = """
import socket, sys, time
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((sys.argv[1], 5001))
server.listen(1)
print("ready", flush=True)
conn, _ = server.accept()
marks, got = [], 0
while data := conn.recv(1 << 16):
    got += len(data)
    marks.append((time.monotonic(), got))
# the rate past the first quarter: the token bucket lets its burst through at once
t0, b0 = next(m for m in marks if m[1] >= got / 4)
t1, b1 = marks[-1]
print((b1 - b0) * 8 / (t1 - t0))
"""
SENDER = """
import socket, sys
with socket.create_connection((sys.argv[1], 5001), timeout=30) as sock:
    block, left = bytes(1 << 16), int(sys.argv[2])
    while left > 0:
        sock.sendall(block[:left])
        left -= len(block)
"""


@pytest.fixture(scope="module")
def netbed():
    if os.geteuid() != 0:
        pytest.skip("the testbed needs root")
    name = os.environ.get("KABIN_TESTBED_INSTANCE", "pytest") + "-net"
    bed = Testbed(name).up(2, netns=True, link_rate="40mbit", boot_delay=1.0)
    yield bed
    if os.environ.get("KABIN_TESTBED_KEEP") != "1":
        bed.down()


def in_netns(netns, *argv):
    return ["nsenter", f"--net=/run/netns/{netns}", *argv]


def received_rate(bed, node, size):
    """Bits/s at which ``node`` receives ``size`` bytes sent from the frontend over TCP."""
    lay = bed.layout
    address = bed.address(node)
    receiver = subprocess.Popen(in_netns(lay.node_netns(lay.index_of(node)), sys.executable, "-c",
                                         RECEIVER, address), stdout=subprocess.PIPE, text=True)
    try:
        assert select.select([receiver.stdout], [], [], 30)[0], "the receiver did not start"
        assert receiver.stdout.readline().strip() == "ready"
        subprocess.run(in_netns(lay.frontend_netns, sys.executable, "-c", SENDER, address,
                                str(size)), check=True, timeout=120)
        out, _ = receiver.communicate(timeout=60)
    finally:
        receiver.kill()
    return float(out.strip())


def test_nodes_are_reached_from_the_frontend_namespace(netbed):
    node = netbed.nodes[0]
    assert netbed.address(node).startswith(f"10.{netbed.layout.slot}.1.")
    done = netbed.ssh(node, "hostname; ip -o -4 addr show dev eth0")
    assert done.returncode == 0 and done.stdout.split()[0] == node
    assert netbed.address(node) + "/16" in done.stdout
    out = subprocess.run(["ka-testbed", "exec", "--instance", netbed.instance, "--", "ipmitool",
                          "-I", "lanplus", "-H", netbed.config.node(node).bmc.address, "-U",
                          "admin", "-f", str(layout.SHARED_SECRET), "power", "status"],
                         capture_output=True, text=True, timeout=60)
    assert "is on" in out.stdout


def test_switches_do_not_run_the_hosts_netfilter(netbed):
    from kabin.testbed.netns import BRIDGE_NETFILTER

    script = "; ".join(f"cat {path} 2>/dev/null || echo absent" for path in BRIDGE_NETFILTER)
    out = subprocess.run(in_netns(netbed.layout.switch_netns, "sh", "-c", script),
                         capture_output=True, text=True, timeout=30, check=True)
    assert set(out.stdout.split()) <= {"0", "absent"}, out.stdout


def test_the_host_does_not_reach_the_nodes(netbed):
    node = netbed.nodes[0]
    direct = subprocess.run(netbed.ssh_argv(node, "true")[:1] + ["-o", "ConnectTimeout=3"]
                            + netbed.ssh_argv(node, "true")[1:], capture_output=True, timeout=60)
    assert direct.returncode == 255


def test_links_are_shaped_at_the_asked_rate(netbed):
    rate = received_rate(netbed, netbed.nodes[0], 12 << 20)
    assert 0.9 * LINK_RATE <= rate <= 1.1 * LINK_RATE, f"{rate / 1e6:.1f} Mbit/s"


def test_slow_link_fault(netbed):
    node = netbed.nodes[1]
    netbed.fault(node, "slow-link=8mbit")
    try:
        rate = received_rate(netbed, node, 3 << 20)
        assert 0.9 * 8e6 <= rate <= 1.1 * 8e6, f"{rate / 1e6:.1f} Mbit/s"
    finally:
        netbed.clear(node)
    rate = received_rate(netbed, node, 12 << 20)
    assert 0.9 * LINK_RATE <= rate <= 1.1 * LINK_RATE, f"{rate / 1e6:.1f} Mbit/s after clear"
