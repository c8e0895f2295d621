"""Pure logic of kabin.reboot: level plans, window schedules, kexec quoting, reasons.

Real sockets for the probes (a listening socket on 127.0.0.1 stands for a node's port).
"""

import shlex
import socket
import threading

import pytest
import yaml
from click.testing import CliRunner

from kabin import config, reboot
from kabin.cli import reboot as reboot_cli
from kabin.config import RemoteOp
from kabin.errors import UsageError
from kabin.parallel import Deadline


def write_config(directory, node_remoteops=None, reboot_levels=None):
    """A cluster 'c' of nodes c-[1-4]; c-1 may have its own reboot levels."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "server.yml").write_text(yaml.safe_dump({"paths": {"state_dir": str(directory)}}))
    entry = {"names": "c-[2-4]", "address": "127.0.0.[2-4]"}
    first = {"names": "c-1", "address": "127.0.0.1"}
    if node_remoteops:
        first["remoteops"] = node_remoteops
    (directory / "clusters.yml").write_text(yaml.safe_dump(
        {"clusters": [{"name": "c", "nodes": [first, entry]}]}))
    (directory / "cluster-c.yml").write_text(yaml.safe_dump({
        "partitioning": {"partitions": {"deploy": 3}},
        "boot": {"kernels": {"deploy": {"vmlinuz": "k", "initrd": "i"}}},
        "remoteops": {"reboot": reboot_levels or [
            {"name": "soft", "type": "ssh", "cmd": "reboot"},
            {"name": "hard", "type": "ipmi", "action": "cycle"},
            {"name": "very_hard", "type": "ipmi", "action": "off_on", "wait": 2}],
            "power_off": [{"name": "soft", "type": "ssh", "cmd": "poweroff"}]},
        "timeouts": {"reboot": "10 + n", "kexec": 7},
        "automata": {"SetDeploymentEnv": [{"type": "Untrusted", "timeout": 100}],
                     "BroadcastEnv": [{"type": "Chain", "timeout": 100}],
                     "BootNewEnv": [{"type": "Classical", "timeout": 100}]}}))
    return config.Config(directory)


@pytest.fixture
def cfg(tmp_path):
    return write_config(tmp_path / "etc", node_remoteops={
        "reboot": [{"name": "hard", "type": "command", "cmd": "pdu-cycle HOSTNAME_SHORT"}]})


def names(levels):
    return [op.name for op in levels]


# ---------------------------------------------------------------- levels

def test_parse_levels():
    assert reboot.parse_levels("soft,hard, very_hard") == ("soft", "hard", "very_hard")
    with pytest.raises(UsageError):
        reboot.parse_levels(" , ")
    with pytest.raises(UsageError, match="twice"):
        reboot.parse_levels("soft,soft")


def test_plan_takes_every_level_in_order_by_default(cfg):
    assert names(reboot.plan(cfg, "c-2", "reboot")) == ["soft", "hard", "very_hard"]


def test_plan_follows_the_order_asked_and_skips_levels_a_node_lacks(cfg):
    assert names(reboot.plan(cfg, "c-2", "reboot", ("hard", "soft"))) == ["hard", "soft"]
    # c-1 has its own reboot levels (a single PDU 'hard'): the override wins
    levels = reboot.plan(cfg, "c-1", "reboot", ("soft", "hard"))
    assert [(op.name, op.type) for op in levels] == [("hard", "command")]
    with pytest.raises(UsageError, match="no level very_hard"):
        reboot.plan(cfg, "c-1", "reboot", ("very_hard",))


def test_kexec_comes_first_then_the_levels_asked(cfg):
    kexec = reboot.Kexec("/mnt/dest/vmlinuz")
    assert names(reboot.plan(cfg, "c-2", "reboot", None, kexec)) == ["kexec"]
    assert names(reboot.plan(cfg, "c-2", "reboot", ("hard",), kexec)) == ["kexec", "hard"]


def test_kexec_command_quotes_every_value():
    hostile = "/boot/vmlinuz; touch /tmp/pwned"
    kexec = reboot.Kexec(hostile, initrd="/boot/initrd $(id)", append="root=/dev/sda3 'x'")
    words = shlex.split(kexec.command().split(" && ")[0])
    assert words == ["kexec", "-l", hostile, "--initrd=/boot/initrd $(id)",
                     "--append=root=/dev/sda3 'x'"]
    assert kexec.command().endswith(" && kexec -e")
    assert kexec.level() == RemoteOp(name="kexec", type="ssh", cmd=kexec.command())


def test_level_budget_and_default_deadline(cfg):
    soft, hard, very_hard = reboot.plan(cfg, "c-2", "reboot")
    assert reboot.level_budget(very_hard, 10, 1, 30) == 30 + 2 + 1 + 10
    rebooter = reboot.Rebooter(cfg, reboot.Options())
    try:
        # n = 1 node seen: the cluster's "10 + n" gives 11 s to come back after each level
        per_level = [reboot.level_budget(op, 11, 20, reboot.COMMAND_TIMEOUT)
                     for op in (soft, hard, very_hard)]
        assert rebooter._deadline("c-2", (soft, hard, very_hard)) == sum(per_level)
        kexec = reboot.Kexec("/k").level()
        assert rebooter._boot_timeout("c-2", kexec) == 7
    finally:
        rebooter.pool.close()
        rebooter.power.close()


def test_unknown_level_is_a_usage_error_before_any_node(cfg, tmp_path):
    result = CliRunner().invoke(reboot_cli.cli, ["-m", "c-2", "--level", "soft,warm",
                                                 "--config", str(tmp_path / "etc")])
    assert isinstance(result.exception, UsageError)
    assert "unknown reboot level warm" in str(result.exception)


# ---------------------------------------------------------------- windows

@pytest.mark.parametrize("count, size, sleep, starts", [
    (0, 50, 10, []),
    (1, 50, 10, [0]),
    (50, 50, 10, [0]),
    (51, 50, 10, [0, 10]),
    (100, 30, 2.5, [0, 2.5, 5.0, 7.5]),
])
def test_window_schedule(count, size, sleep, starts):
    assert reboot.window_schedule(count, size, sleep) == starts
    assert reboot.schedule_lower_bound(count, size, sleep) == (starts[-1] if starts else 0)


# ---------------------------------------------------------------- probes (real sockets)

@pytest.fixture
def listener():
    sock = socket.create_server(("127.0.0.1", 0))
    yield sock
    sock.close()


def free_port():
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


def test_booted_tells_the_deployment_environment_from_the_system(listener):
    ssh_port = listener.getsockname()[1]
    with socket.create_server(("127.0.0.1", 0)) as marker:
        marker_port = marker.getsockname()[1]
        assert reboot.booted("127.0.0.1", ssh_port, marker_port, "deploy")
        assert not reboot.booted("127.0.0.1", ssh_port, marker_port, "system")
        assert reboot.booted("127.0.0.1", ssh_port, marker_port, "any")
    assert not reboot.booted("127.0.0.1", ssh_port, marker_port, "deploy")
    assert reboot.booted("127.0.0.1", ssh_port, marker_port, "system")
    assert not reboot.booted("127.0.0.1", free_port(), marker_port, "any")


def test_sentinel_sees_the_listener_go_away(listener):
    port = listener.getsockname()[1]
    sentinel = reboot.Sentinel("127.0.0.1", port)
    peer, _ = listener.accept()
    stop = threading.Event()
    assert sentinel.held
    assert not sentinel.wait_down(Deadline(0.3), stop), "the node is still up"
    listener.close()   # the node goes down: no more listener, its connection ends
    peer.close()
    assert sentinel.wait_down(Deadline(10), stop)
    sentinel.close()


def test_sentinel_ignores_a_connection_dropped_by_a_live_server(listener):
    """sshd drops idle unauthenticated clients: that is not the node going down."""
    port = listener.getsockname()[1]
    sentinel = reboot.Sentinel("127.0.0.1", port)
    peer, _ = listener.accept()
    peer.sendall(b"SSH-2.0-test\r\n")
    peer.close()
    assert not sentinel.wait_down(Deadline(0.5), threading.Event())
    assert sentinel.held, "it connected again"
    sentinel.close()


def test_sentinel_on_a_closed_port_is_not_held():
    sentinel = reboot.Sentinel("127.0.0.1", free_port())
    assert not sentinel.held


def test_options_reject_an_unknown_wait(cfg):
    with pytest.raises(UsageError, match="--wait"):
        reboot.BootCheck(cfg, "sometimes", threading.Event())
