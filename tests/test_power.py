"""Power backends against the testbed's BMCs (kabin.testbed.bmc) over real UDP, and
command templates run by a real shell."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from kabin import config, power
from kabin.config import BmcConfig, NodeConfig, RemoteOp, Secret
from kabin.errors import UsageError
from kabin.parallel import Deadline
from kabin.testbed import bmc

PORT = 623 if os.geteuid() == 0 else 16623
PASSWORD = "Xk4-power.t3st"
FIRST = 100  # BMCs at 127.0.250.100 and up (the BMC tests use the addresses below)


def bmc_address(i):
    return f"127.0.250.{FIRST + i}"


def write_config(directory, count, password=PASSWORD, remoteops=None, node_remoteops=None):
    """A cluster 't' of nodes n-1..n-COUNT whose BMCs are 127.0.250.FIRST+1...."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bmc.secret").write_text(password + "\n")
    (directory / "server.yml").write_text(yaml.safe_dump({"paths": {"state_dir": str(directory)},
                                                          "fanout": 16}))
    entry = {"names": f"n-[1-{count}]", "address": f"127.0.252.[1-{count}]",
             "bmc": [bmc_address(i + 1) for i in range(count)]}
    if node_remoteops:
        entry = [dict(entry, names="n-1", address="127.0.252.1", bmc=bmc_address(1),
                      remoteops=node_remoteops),
                 dict(entry, names=f"n-[2-{count}]", address=f"127.0.252.[2-{count}]",
                      bmc=[bmc_address(i + 1) for i in range(1, count)])]
    else:
        entry = [entry]
    (directory / "clusters.yml").write_text(yaml.safe_dump({"clusters": [{
        "name": "t", "file": "cluster-t.yml", "nodes": entry,
        "bmc": {"user": "admin", "password_file": "bmc.secret", "port": PORT}}]}))
    (directory / "cluster-t.yml").write_text(yaml.safe_dump({
        "partitioning": {"partitions": {"deploy": 3}},
        "boot": {"kernels": {"deploy": {"vmlinuz": "k", "initrd": "i"}}},
        "remoteops": remoteops or {"reboot": [{"name": "hard", "type": "ipmi", "action": "cycle"}]},
        "automata": {"SetDeploymentEnv": [{"type": "Untrusted", "timeout": 100}],
                     "BroadcastEnv": [{"type": "Chain", "timeout": 100}],
                     "BootNewEnv": [{"type": "Classical", "timeout": 100}]}}))
    return config.Config(directory)


@pytest.fixture
def nodes():
    return [bmc.MemoryNode(on=i % 2 == 0) for i in range(4)]


@pytest.fixture
def journal(tmp_path):
    return tmp_path / "bmc.log"


@pytest.fixture
def farm(nodes, journal):
    entries = [(bmc_address(i + 1), PORT, b"admin", PASSWORD.encode(), node, f"n-{i + 1}")
               for i, node in enumerate(nodes)]
    with bmc.BmcFarm(entries, journal) as running:
        yield running


@pytest.fixture
def cfg(tmp_path):
    return write_config(tmp_path / "etc", 4)


def actions(journal):
    lines = map(json.loads, journal.read_text().splitlines())
    return [(line["node"], line["action"]) for line in lines]


def quick_power(cfg, **options):
    options = {"bmc_timeout": 1.0, "retries": 1, "backoff": 0.1, "settle": 0.5, **options}
    return power.Power(cfg, **options)


# ---------------------------------------------------------------- IPMI

def test_power_status_of_many_nodes(farm, cfg):
    results = power.power_status(cfg, sorted(cfg.nodes))
    assert sorted((r.node, r.ok, r.state, r.level) for r in results) == [
        ("n-1", True, "on", None), ("n-2", True, "off", None),
        ("n-3", True, "on", None), ("n-4", True, "off", None)]
    record = results[0].record({"node": results[0].node, "status": "ok"})
    assert record["status"] == "ok" and record["power"] in ("on", "off")
    assert record["history"][-1]["step"] == "power"


def test_actions_are_read_back(farm, nodes, cfg, journal):
    with quick_power(cfg) as pw:
        assert pw.act("n-1", "off") == "off"
        assert pw.act("n-1", "on") == "on"
        assert pw.act("n-2", "cycle") == "on"
        assert pw.act("n-3", "reset") == "on"
        assert pw.act("n-4", "status") == "off"
    assert [n.on for n in nodes] == [True, True, True, False]
    assert actions(journal) == [("n-1", "off"), ("n-1", "on"), ("n-2", "cycle"), ("n-3", "reset")]


def test_off_on_level(farm, nodes, cfg, journal):
    op = RemoteOp(name="very_hard", type="ipmi", action="off_on", wait=0.2)
    with quick_power(cfg) as pw:
        assert pw.act("n-1", power.level_action("reboot", op), op=op) == "on"
    assert actions(journal) == [("n-1", "off"), ("n-1", "on")]


def test_one_session_per_bmc_reused_then_closed(farm, cfg):
    with quick_power(cfg) as pw:
        for action in ("status", "off", "on", "status"):
            pw.act("n-1", action)
        assert len(farm.bmcs[0].sessions) == 1
    # pyghmi sends Close Session without waiting: the next request to that BMC is served after it
    with quick_power(cfg) as pw:
        pw.act("n-1", "status")
        assert len(farm.bmcs[0].sessions) == 1


def test_a_lying_bmc_is_caught_by_reading_the_state_back(farm, nodes, cfg):
    nodes[0].faults.add("bmc-lies")
    with quick_power(cfg) as pw, pytest.raises(power.PowerNotApplied,
                                               match="answered 'done' to power off but the "
                                                     "power is still on"):
        pw.act("n-1", "off")
    assert nodes[0].on


def test_a_dead_bmc_is_retried_then_reported_the_others_are_not_delayed(farm, nodes, cfg):
    nodes[1].faults.add("bmc-dead")
    with quick_power(cfg, retries=2) as pw:
        results = {r.node: r for r in pw.run(sorted(cfg.nodes), "off", timeout=30)}
    assert not results["n-2"].ok
    where = bmc_address(2) if PORT == 623 else f"{bmc_address(2)}:{PORT}"
    assert results["n-2"].error == f"BMC {where}: no answer to power off (3 attempts, 1 s each)"
    assert all(results[n].ok and results[n].state == "off" for n in ("n-1", "n-3", "n-4"))
    assert [n.on for n in nodes] == [False, False, False, False]


def test_the_deadline_bounds_a_run(farm, nodes, cfg):
    for node in nodes:
        node.faults.add("bmc-dead")
    with quick_power(cfg, retries=5) as pw:
        results = list(pw.run(sorted(cfg.nodes), "status", timeout=1.5, fanout=2))
    assert sorted(r.node for r in results) == ["n-1", "n-2", "n-3", "n-4"]
    assert all(not r.ok and ("no answer" in r.error or "deadline" in r.error) for r in results)


def test_wrong_credentials_are_not_retried(farm, tmp_path):
    cfg = write_config(tmp_path / "bad", 1, password="not-the-password")
    with quick_power(cfg) as pw, pytest.raises(power.BmcRefused, match="refused the credentials"):
        pw.act("n-1", "status")


def test_a_node_without_bmc(tmp_path):
    cfg = write_config(tmp_path / "etc", 1)
    node = cfg.nodes["n-1"]
    cfg.nodes["n-1"] = NodeConfig(node.name, node.cluster, node.address, None, None, 22, {})
    [result] = power.power_status(cfg, ["n-1"])
    assert not result.ok and result.error == "no BMC in the configuration for this node"


def test_interrupted_run(farm, cfg):
    stop = threading.Event()
    stop.set()
    results = power.run_power(cfg, sorted(cfg.nodes), "off", stop=stop)
    assert {r.error for r in results} == {"interrupted"}


def test_unknown_action_and_ssh_levels_are_usage_errors(cfg):
    with power.Power(cfg) as pw:
        with pytest.raises(UsageError, match="unknown power action"):
            pw.act("n-1", "explode")
        with pytest.raises(UsageError, match="SSH levels are run by kabin.reboot"):
            pw.backend(RemoteOp(name="soft", type="ssh", cmd="reboot"))


# ---------------------------------------------------------------- levels from the config

def test_levels_come_from_the_config_with_node_overrides(farm, tmp_path):
    log = tmp_path / "pdu.log"
    remoteops = {"reboot": [{"name": "soft", "type": "ssh", "cmd": "reboot"},
                            {"name": "hard", "type": "ipmi", "action": "cycle"}],
                 "power_status": [{"name": "hard", "type": "ipmi", "action": "status"}]}
    override = {"power_status": [{"name": "pdu", "type": "command",
                                  "cmd": f"echo {{action}} HOSTNAME_SHORT >> {log}; "
                                         "echo Power is off"}]}
    cfg = write_config(tmp_path / "etc", 4, remoteops=remoteops, node_remoteops=override)
    results = {r.node: r for r in power.power_status(cfg, sorted(cfg.nodes))}
    # n-1 is on, but its own level (the PDU template) is asked
    assert (results["n-1"].state, results["n-1"].level) == ("off", "pdu")
    assert (results["n-3"].state, results["n-3"].level) == ("on", "hard")
    assert log.read_text() == "status n-1\n"
    with power.Power(cfg) as pw:
        assert pw.level("n-2", "reboot").name == "hard"


# ---------------------------------------------------------------- command templates

def node_config(name="n-1", address="127.0.252.1", bmc_address="127.0.250.1"):
    bmc_config = BmcConfig(bmc_address, 623, "admin", Secret(env="UNUSED")) if bmc_address else None
    return NodeConfig(name, "t", address, None, bmc_config, 22, {})


def test_fill_template_quotes_every_value():
    node = node_config("a.b.c", "10.0.0.1", "10.0.1.1")
    assert power.fill_template("pdu HOSTNAME_FQDN HOSTNAME_SHORT {node} {address} {bmc} {action}"
                               " ${HOME} {other}", node, "off") == \
        "pdu a.b.c a a.b.c 10.0.0.1 10.0.1.1 off ${HOME} {other}"
    evil = node_config("x;id", "$(id)", "`id`")
    assert power.fill_template("{node} {address} {bmc}", evil, "on") == "'x;id' '$(id)' '`id`'"
    with pytest.raises(power.PowerError, match="uses {bmc}"):
        power.fill_template("ping {bmc}", node_config(bmc_address=None), "on")


def test_a_node_name_cannot_inject_a_command(tmp_path):
    evil = ["x; touch INJECTED1", "$(touch INJECTED2)", "`touch INJECTED3`",
            "a' ; touch INJECTED4 '",
            "a\ntouch INJECTED5", "x\" && touch INJECTED6 \""]
    out = tmp_path / "out"
    for name in evil:
        template = (f"cd {tmp_path} && printf '%s|' HOSTNAME_FQDN HOSTNAME_SHORT {{node}} "
                    f"{{address}} {{bmc}} >> {out}; echo")
        backend = power.CommandBackend(template)
        backend.act(node_config(name, name, name), "off", Deadline(10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert out.read_text() == "".join(f"{name}|" * 5 for name in evil)


def test_command_status_and_failures(tmp_path):
    node, deadline = node_config(), Deadline(30)
    assert power.CommandBackend("echo 'Chassis Power is on'").status(node, deadline) == "on"
    with pytest.raises(power.PowerCommandFailed, match="printed no power state"):
        power.CommandBackend("echo maybe").status(node, deadline)
    with pytest.raises(power.PowerCommandFailed,
                       match="the off command exited with status 3: outlet HOSTNAME is stuck"):
        power.CommandBackend("echo outlet HOSTNAME is stuck >&2; exit 3").act(node, "off", deadline)
    with pytest.raises(power.PowerCommandFailed, match="the on command timed out after 0.3 s"):
        power.CommandBackend("sleep 30 | cat", timeout=0.3).act(node, "on", deadline)


def test_command_level_through_power(tmp_path, cfg):
    log = tmp_path / "pdu.log"
    op = RemoteOp(name="pdu", type="command", cmd=f"echo {{action}} {{node}} >> {log}")
    with power.Power(cfg) as pw:
        assert pw.act("n-2", power.level_action("reboot", op), op=op) is None  # not read back
        assert pw.act("n-2", "off_on", op=RemoteOp("pdu", "command", op.cmd, "off_on")) is None
    assert log.read_text() == "cycle n-2\noff n-2\non n-2\n"


def test_importing_the_module_does_not_import_pyghmi():
    code = "import sys, kabin.power; assert not any(m.startswith('pyghmi') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_pyghmi_session_tables_share_one_lock():
    """pyghmi takes its two table locks in both orders: kabin makes them one (no deadlock)."""
    from pyghmi.ipmi.private import session

    power._ipmi_client()
    assert session.KEEPALIVE_SESSIONS is session.WAITING_SESSIONS
