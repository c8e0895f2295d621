"""The testbed's BMCs, over real UDP, driven by ipmitool (-I lanplus) and pyghmi's client.

The node controller here is a plain recorder of power state: the BMC is the
thing under test (the testbed core wires real nodes to it).
"""

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kabin.errors import SystemRequirementError
from kabin.testbed import bmc

pytestmark = pytest.mark.skipif(shutil.which("ipmitool") is None,
                                reason="needs ipmitool (apt package ipmitool)")

PORT = 623 if os.geteuid() == 0 else 16623
USER, PASSWORD = b"admin", b"Zq8-pw.t3stbed"


def address(i, subnet=250):
    return f"127.0.{subnet}.{i}"


def entries(nodes, subnet=250, first=1):
    return [(address(first + i, subnet), PORT, USER, PASSWORD, node, f"node-{first + i}")
            for i, node in enumerate(nodes)]


@pytest.fixture
def nodes():
    return [bmc.MemoryNode() for _ in range(4)]


@pytest.fixture
def journal(tmp_path):
    return tmp_path / "bmc.log"


@pytest.fixture
def farm(nodes, journal):
    with bmc.BmcFarm(entries(nodes), journal) as running:
        yield running


def ipmitool(host, *args, user=USER, password=PASSWORD, cipher=None, wait=2, retries=3):
    command = ["ipmitool", "-I", "lanplus", "-H", host, "-p", str(PORT), "-U", user.decode(),
               "-P", password.decode(), "-N", str(wait), "-R", str(retries)]
    if cipher is not None:
        command += ["-C", str(cipher)]
    return subprocess.run(command + list(args), check=False, capture_output=True, text=True,
                          timeout=60)


def power_status(host, **kwargs):
    result = ipmitool(host, "power", "status", **kwargs)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()[-1]


def pyghmi_command(host, password=PASSWORD):
    from pyghmi.ipmi import command
    return command.Command(bmc=host, userid=USER, password=password, port=PORT)


def read_journal(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- ipmitool

def test_ipmitool_drives_power_and_boot_device(farm, nodes, journal):
    host = address(2)
    assert power_status(host) == "off"
    for action in ("on", "cycle", "reset", "soft", "on", "off"):
        result = ipmitool(host, "power", action)
        assert result.returncode == 0, result.stderr
    assert nodes[1].actions == ["on", "cycle", "reset", "off", "on", "off"]
    assert power_status(host) == "off"
    assert ipmitool(host, "chassis", "bootdev", "pxe").returncode == 0
    assert nodes[1].bootdev == "network"
    assert [n.actions for n in nodes if n is not nodes[1]] == [[], [], []]
    lines = read_journal(journal)
    assert [(line["node"], line["action"]) for line in lines] == [
        ("node-2", "on"), ("node-2", "cycle"), ("node-2", "reset"), ("node-2", "soft-off"),
        ("node-2", "on"), ("node-2", "off"), ("node-2", "bootdev")]
    assert lines[-1]["device"] == "network"
    assert all(isinstance(line["time"], float) for line in lines)


@pytest.mark.parametrize("cipher", [None, 3, 17])
def test_cipher_suites_3_and_17(farm, nodes, cipher):
    nodes[0].on = True
    assert power_status(address(1), cipher=cipher) == "on"


def test_unsupported_cipher_suite_is_refused_at_once(farm):
    result = ipmitool(address(1), "power", "status", cipher=1, retries=0)
    assert result.returncode != 0
    assert "no matching cipher suite" in result.stderr


def test_ipmitool_default_is_suite_17(farm):
    result = ipmitool(address(1), "-vv", "power", "status")
    assert result.returncode == 0
    assert "Negotiated authenticatin algorithm : hmac_sha256" in result.stdout + result.stderr


@pytest.mark.parametrize("user, password", [(USER, b"wrong-password"), (b"nobody", PASSWORD)])
def test_bad_credentials_fail(farm, nodes, user, password):
    result = ipmitool(address(1), "power", "on", user=user, password=password, retries=0)
    assert result.returncode != 0
    assert nodes[0].actions == []


def test_sessions_are_closed_by_the_client(farm):
    for _ in range(3):
        power_status(address(1))
    assert farm.bmcs[0].sessions == {}


# ---------------------------------------------------------------- pyghmi's client

def test_pyghmi_client(farm, nodes):
    ipmi = pyghmi_command(address(3))
    try:
        assert ipmi.get_power() == {"powerstate": "off"}
        ipmi.set_power("on")
        assert nodes[2].on and ipmi.get_power() == {"powerstate": "on"}
        ipmi.set_bootdev("network")
        assert nodes[2].bootdev == "network"
        assert ipmi.get_bootdev()["bootdev"] == "network"
    finally:
        ipmi.ipmi_session.logout()


@pytest.mark.parametrize("password, message", [(b"wrong-password", "Incorrect password"),
                                               (None, "Unauthorized name")])
def test_pyghmi_bad_credentials(farm, password, message):
    from pyghmi.exceptions import IpmiException
    from pyghmi.ipmi import command
    with pytest.raises(IpmiException, match=message):
        if password is None:
            command.Command(bmc=address(1), userid=b"nobody", password=PASSWORD, port=PORT)
        else:
            pyghmi_command(address(1), password)


def test_bmcs_sharing_a_port_keep_their_sessions_apart(farm, nodes):
    """pyghmi talks to these 4 BMCs from one socket; each session stays with its BMC."""
    nodes[0].on = nodes[2].on = True
    sessions = [pyghmi_command(address(i + 1)) for i in range(4)]
    try:
        for _ in range(3):
            assert [s.get_power()["powerstate"] for s in sessions] == ["on", "off", "on", "off"]
        sessions[1].set_power("on")
        sessions[0].set_power("off")
        assert [n.on for n in nodes] == [False, True, True, False]
        assert [n.actions for n in nodes] == [["off"], ["on"], [], []]
    finally:
        for s in sessions:
            s.ipmi_session.logout()


def test_a_request_sent_again_is_answered_again_not_redone(farm, nodes):
    ipmi = pyghmi_command(address(1))
    try:
        ipmi.raw_command(netfn=0, command=2, data=[2])  # power cycle
        client = ipmi.ipmi_session
        for _ in range(2):  # the very same packet, as a client retrying a lost answer sends it
            client.socket.sendto(client.netpacket, client.sockaddr)
        assert ipmi.get_power() == {"powerstate": "on"}  # served after the copies
    finally:
        ipmi.ipmi_session.logout()
    assert nodes[0].actions == ["cycle"]


# ---------------------------------------------------------------- faults

def test_dead_bmc_answers_nothing_and_the_others_still_do(farm, nodes):
    nodes[0].faults.add("bmc-dead")
    result = ipmitool(address(1), "power", "status", wait=1, retries=1)
    assert result.returncode != 0
    assert power_status(address(2)) == "off"
    nodes[0].faults.clear()
    assert power_status(address(1)) == "off"


def test_lying_bmc_says_done_and_does_nothing(farm, nodes, journal):
    nodes[0].on = True
    nodes[0].faults.add("bmc-lies")
    result = ipmitool(address(1), "power", "off")
    assert result.returncode == 0
    assert nodes[0].on and nodes[0].actions == []
    assert power_status(address(1)) == "on"
    assert read_journal(journal) == [{"time": pytest.approx(read_journal(journal)[0]["time"]),
                                      "node": "node-1", "action": "off", "lied": True}]


def test_a_failing_controller_gives_an_error_not_a_dead_bmc(farm, nodes):
    def broken():
        raise RuntimeError("the launcher crashed")
    nodes[0].power_on = broken
    assert ipmitool(address(1), "power", "on", retries=0).returncode != 0
    assert power_status(address(1)) == "off"


# ---------------------------------------------------------------- robustness

def _rmcp_plus(payload_type, payload, session_id=0):
    return (b"\x06\x00\xff\x07" + bytes([6, payload_type]) + struct.pack("<II", session_id, 0)
            + struct.pack("<H", len(payload)) + payload)


def _open_request(client_session_id):
    return _rmcp_plus(0x10, bytes([1, 0, 0, 0]) + struct.pack("<I", client_session_id)
                      + bytes([0, 0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 8, 4, 0, 0, 0,
                               2, 0, 0, 8, 1, 0, 0, 0]))


def test_malformed_packets_are_dropped(farm, nodes):
    garbage = [b"", b"\x06", b"\x06\x00\xff\x07", b"\x06\x00\xff\x07" + bytes(40),
               _rmcp_plus(0x10, b"\x01\x00"), _rmcp_plus(0x10, bytes(12)),
               _rmcp_plus(0x12, bytes(30)), _rmcp_plus(0x14, bytes(3)),
               _rmcp_plus(0x40, bytes(40), session_id=1234), _rmcp_plus(0xC0, bytes(3), 7),
               b"\x06\x00\xff\x07\x00" + bytes(9) + b"\x09" + bytes(20), os.urandom(3000)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for packet in garbage:
            sock.sendto(packet, (address(1), PORT))
    assert power_status(address(1)) == "off"


def test_sessions_left_open_do_not_exhaust_the_bmc(farm):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        for i in range(bmc.MAX_SESSIONS + 20):
            sock.sendto(_open_request(i + 1), (address(1), PORT))
            reply = sock.recv(512)
            assert reply[5] == 0x11 and reply[17] == 0  # open session response, no error
    assert len(farm.bmcs[0].sessions) <= bmc.MAX_SESSIONS
    assert power_status(address(1)) == "off"


def test_an_open_session_request_sent_again_opens_one_session(farm):
    """ipmitool resends its request when our answer is late: it then closes one session only."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        replies = []
        for _ in range(3):
            sock.sendto(_open_request(77), (address(1), PORT))
            replies.append(sock.recv(512))
        sock.sendto(_open_request(78), (address(1), PORT))  # another one: a new session
        other = sock.recv(512)
    managed = {reply[24:28] for reply in replies}
    assert all(reply[5] == 0x11 and reply[17] == 0 for reply in replies + [other])
    assert len(managed) == 1 and other[24:28] not in managed
    assert len(farm.bmcs[0].sessions) == 2


def test_each_bmc_binds_its_own_address(farm, nodes, journal):
    assert [b.serversocket.getsockname() for b in farm.bmcs] == \
        [(address(i + 1), PORT) for i in range(4)]
    with pytest.raises(SystemRequirementError, match=address(3)):
        bmc.BmcFarm(entries([bmc.MemoryNode()], first=3))


def test_serve_bmcs_in_the_calling_thread_until_stopped(journal):
    node, stop = bmc.MemoryNode(on=True), threading.Event()
    server = threading.Thread(target=bmc.serve_bmcs, args=(entries([node], first=9), stop, journal))
    server.start()
    try:
        # the sockets are bound in the server thread: ipmitool's retries cover the start
        assert power_status(address(9)) == "on"
    finally:
        stop.set()
        server.join(10)
    assert not server.is_alive()
    with pytest.raises(SystemRequirementError, match="cannot bind"):
        bmc.serve_bmcs([("192.0.2.1", PORT, USER, PASSWORD, node, "x")], stop)


def test_ipv6_address():
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback on this machine")
    with bmc.BmcFarm([("::1", PORT, USER, PASSWORD, bmc.MemoryNode(on=True), "node-v6")]):
        assert power_status("::1") == "on"


def test_importing_the_module_does_not_import_pyghmi():
    code = ("import sys, kabin.testbed.bmc; "
            "assert not any(m.startswith('pyghmi') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- scale

def test_200_bmcs_stay_responsive_under_repeated_sessions():
    """In-process pyghmi sessions (pyghmi's I/O thread runs beside the BMC thread: the
    setting of pyghmi's blocking recvfrom race) and ipmitool processes, repeatedly.

    In a fresh process: pyghmi's client keeps process-wide sessions, so sessions that
    earlier tests left to dead BMCs must not be in the way.
    """
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "import test_testbed_bmc as t; t.responsive_200()")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)


def responsive_200():
    count = 200
    nodes = [bmc.MemoryNode(on=i % 2 == 0) for i in range(count)]
    expected = ["on" if i % 2 == 0 else "off" for i in range(count)]
    hosts = [address(i + 1, subnet=251) for i in range(count)]

    def pyghmi_round(host):
        ipmi = pyghmi_command(host)
        try:
            return ipmi.get_power()["powerstate"]
        finally:
            ipmi.ipmi_session.logout()

    with bmc.BmcFarm(entries(nodes, subnet=251)) as farm, ThreadPoolExecutor(32) as pool:
        for _ in range(2):
            assert list(pool.map(pyghmi_round, hosts, timeout=240)) == expected
            assert list(pool.map(lambda h: power_status(h, wait=2, retries=4), hosts,
                                 timeout=240)) == expected
        # pyghmi does not wait for Close Session; ipmitool, served after it, does
        assert all(len(b.sessions) == 0 for b in farm.bmcs)
