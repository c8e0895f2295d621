"""kabin.ssh against the testbed's real sshd: commands, stdin, sends, failures, host keys."""

import dataclasses
import shutil
import threading
import time

import paramiko
import pytest
import yaml

from kabin import config
from kabin.ssh import ConnectionLost, HostKeyStore, SshError, SshPool, collect

pytestmark = pytest.mark.testbed


def config_copy(testbed, directory, server=None, cluster=None, clusters=None):
    """A copy of the testbed's configuration with some values changed; its Config.

    ``server`` / ``cluster``: functions that change the loaded server.yml /
    cluster-local.yml data in place; ``clusters``: the same for clusters.yml.
    """
    target = directory / "config"
    shutil.copytree(testbed.config_dir, target)
    for name, change in (("server.yml", server), ("cluster-local.yml", cluster),
                         ("clusters.yml", clusters)):
        if change:
            data = yaml.safe_load((target / name).read_text())
            change(data)
            (target / name).write_text(yaml.safe_dump(data))
    return config.Config(target)


def bring_up(testbed):
    """Every node of the testbed runs the deployment environment (after a test that broke one)."""
    for node, record in testbed.status().items():
        if record["power"] != "on":
            testbed.power(node, "on")
        elif record["booted"] not in ("deploy", "booting"):
            testbed.power(node, "cycle")
    testbed.wait_booted(testbed.nodes, "deploy", timeout=60)
    return testbed


@pytest.fixture
def up(testbed):
    return bring_up(testbed)


@pytest.fixture
def pool(up):
    with SshPool(up.config, "deploy") as pool:
        yield pool


def test_run_collects_rc_and_both_outputs(pool):
    result = pool.run("node-1", "echo out; echo err >&2; exit 3", timeout=20)
    assert (result.rc, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert not result.ok and result.error() == "exit code 3: err"
    assert pool.run("node-1", "echo $KABIN_NODE", timeout=20).stdout == "node-1\n"


def test_connection_is_reused(pool):
    pool.run("node-2", "true", timeout=20)
    first = pool.transport("node-2")
    pool.run("node-2", "true", timeout=20)
    assert pool.transport("node-2") is first
    pool.forget("node-2")
    assert pool.transport("node-2") is not first


def test_stdin_from_bytes_and_from_a_file(pool, tmp_path):
    data = bytes(range(256)) * 4096                  # 1 MiB, every byte value
    assert pool.run("node-1", "md5sum", timeout=30, stdin=data).stdout.split()[0] == \
        __import__("hashlib").md5(data).hexdigest()
    local = tmp_path / "blob"
    local.write_bytes(data)
    assert pool.run("node-1", "wc -c", timeout=30, stdin=local).stdout.strip() == str(len(data))


def test_env_values_are_quoted(pool):
    value = "a b $(touch /tmp/pwned) 'q' \"d\""
    result = pool.run("node-1", 'printf %s "$X"; test ! -e /tmp/pwned', timeout=20,
                      env={"X": value})
    assert result.ok and result.stdout == value


def test_timeout_gives_no_rc_and_the_pool_goes_on(pool):
    result = pool.run("node-3", "echo started; sleep 30", timeout=1)
    assert result.rc is None and result.stdout == "started\n"
    assert result.error().startswith("timeout after")
    assert pool.run("node-3", "true", timeout=20).ok


def test_send_is_atomic_keeps_the_mode_and_streams_files(pool, tmp_path):
    assert pool.send("node-4", b"#!/bin/sh\necho hi\n", "/tmp/sub/dir/hello", 0o750).ok
    assert pool.run("node-4", "stat -c %a /tmp/sub/dir/hello && /tmp/sub/dir/hello",
                    timeout=20).stdout == "750\nhi\n"
    local = tmp_path / "big"
    local.write_bytes(b"x" * (3 << 20))
    assert pool.send("node-4", local, "/tmp/big").ok
    assert pool.run("node-4", "wc -c < /tmp/big; ls /tmp | grep -c kabin-",
                    timeout=20).stdout == f"{3 << 20}\n0\n", "no temporary file left"
    failed = pool.send("node-4", b"x", "/proc/none/file")
    assert not failed.ok and "cannot create" in failed.stderr


def test_unreachable_node_raises(up):
    up.power("node-5", "off")
    up.wait_booted("node-5", "off", timeout=30)
    with SshPool(up.config, "deploy") as pool:
        # refused; or reset when the connection came while the node's sshd was dying
        with pytest.raises(SshError,
                           match="failed: (connection refused|connection closed by the node|no SSH handshake: .*reset)"):
            pool.run("node-5", "true", timeout=10)


def test_frozen_sshd_is_bounded_by_the_connect_timeout(up, tmp_path):
    cfg = config_copy(up, tmp_path, server=lambda s: s["ssh"].update(connect_timeout=1))
    up.fault("node-6", "ssh-dead")
    with SshPool(cfg, "deploy") as pool:
        with pytest.raises(SshError, match="no SSH handshake within 1 s"):
            pool.run("node-6", "true", timeout=10)


def test_connection_lost_when_the_node_goes_down_under_a_command(pool, up):
    channel = pool.open("node-7", "echo started; sleep 30", timeout=25)
    try:
        assert channel.recv(100) == b"started\n"      # the command runs
        up.power("node-7", "off")
        with pytest.raises(ConnectionLost):
            collect(channel, time.monotonic() + 25, threading.Event())
    finally:
        channel.close()


# ---------------------------------------------------------------- host keys

def known_hosts_config(testbed, tmp_path):
    return config_copy(testbed, tmp_path, server=lambda s: s["ssh"].update(
        host_key_policy="known_hosts", known_hosts=str(tmp_path / "kh.system"),
        known_hosts_deploy=str(tmp_path / "kh.deploy")))


def test_keys_are_learnt_on_first_use_by_every_connection(up, tmp_path):
    cfg = known_hosts_config(up, tmp_path)
    with SshPool(cfg, "deploy") as pool:
        threads = [threading.Thread(target=pool.run, args=(n, "true", 20)) for n in up.nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    keys = paramiko.HostKeys(str(tmp_path / "kh.deploy"))
    assert sorted(keys.keys()) == sorted(up.address(n) for n in up.nodes)
    assert not (tmp_path / "kh.system").exists(), "the other target's file is untouched"
    with SshPool(cfg, "deploy") as pool:                # known now: accepted
        assert pool.run("node-1", "true", timeout=20).ok


def test_a_changed_key_is_refused(up, tmp_path):
    cfg = known_hosts_config(up, tmp_path)
    store = HostKeyStore(tmp_path / "kh.deploy")
    impostor = paramiko.Ed25519Key.from_private_key_file(str(cfg.server.ssh.key))
    store.check(up.address("node-2"), 22, impostor)     # a key the node does not have
    store.save()
    with SshPool(cfg, "deploy") as pool:
        with pytest.raises(SshError, match="host key of .* changed"):
            pool.run("node-2", "true", timeout=20)
        assert pool.run("node-3", "true", timeout=20).ok


def test_a_config_whose_key_is_missing_is_a_config_error(up, tmp_path):
    from kabin.errors import ConfigError
    cfg = config_copy(up, tmp_path, server=lambda s: s["ssh"].update(key=str(tmp_path / "none")))
    with SshPool(cfg, "deploy") as pool, pytest.raises(ConfigError, match="SSH key"):
        pool.run("node-1", "true", timeout=20)


def test_targets_are_checked():
    cfg = dataclasses.make_dataclass("C", ["server"])(None)
    with pytest.raises(ValueError):
        SshPool(cfg, "elsewhere")


def test_nodes_are_told_the_keys_the_pool_knows(tmp_path):
    """What a node's ssh -A gets for a tree launch: the pool's user, and with the
    known_hosts policy the pool's keys of those hosts only (strict checking)."""
    key = paramiko.RSAKey.generate(1024)
    store = HostKeyStore(tmp_path / "known_hosts")
    store.check("10.0.0.1", 25300, key)
    store.check("10.0.0.2", 22, key)
    lines = store.known_lines([("10.0.0.1", 25300), ("10.0.0.2", 22), ("10.0.0.3", 22)])
    assert lines == [f"[10.0.0.1]:25300 ssh-rsa {key.get_base64()}",
                     f"10.0.0.2 ssh-rsa {key.get_base64()}"]
