"""ka-exec on the testbed: mixed results, scripts, sends, KADEPLOY_* variables, gathered view."""

import json
import re
import subprocess

import pytest

from kabin import exec as exec_mod
from kabin import records

from test_ssh import bring_up, config_copy

pytestmark = pytest.mark.testbed


@pytest.fixture
def up(testbed):
    return bring_up(testbed)

MIXED = """case $KABIN_NODE in
node-1|node-2) echo fine ;;
node-3) echo broken >&2; exit 1 ;;
node-4) sleep 60 ;;
*) echo fine ;;
esac"""


def ka_exec(testbed, *argv, stdin=None):
    done = subprocess.run(["ka-exec", *argv], input=stdin, capture_output=True, text=True,
                          env=testbed.env, timeout=120)
    lines = done.stdout.splitlines()
    return done.returncode, lines, done.stderr


def by_node(lines):
    return {r["node"]: r for r in map(json.loads, lines)}


def test_mixed_results_on_every_node(up, tmp_path):
    up.power("node-5", "off")
    up.wait_booted("node-5", "off", timeout=30)
    up.fault("node-6", "ssh-dead")
    cfg = config_copy(up, tmp_path, server=lambda s: s["ssh"].update(connect_timeout=2))
    code, lines, err = ka_exec(up, "-m", "node-[1-8]", "-t", "3", "--format", "json",
                               "--config", str(cfg.dir), "--", MIXED)
    assert code == 1, err
    out = by_node(lines)
    assert sorted(out) == up.nodes
    for node in ("node-1", "node-2", "node-7", "node-8"):
        assert out[node]["status"] == "ok"
        assert (out[node]["rc"], out[node]["stdout"], out[node]["stderr"]) == (0, "fine\n", "")
        assert out[node]["time"] > 0 and out[node]["history"][-1]["step"] == "exec"
    assert out["node-3"]["status"] == "ko" and out["node-3"]["rc"] == 1
    assert out["node-3"]["error"] == "exit code 1: broken"
    assert out["node-4"]["status"] == "ko" and out["node-4"]["rc"] is None
    assert out["node-4"]["error"] == "timeout after 3 s"
    assert re.fullmatch(rf"ssh to {up.address('node-5')}:22 failed: "
                        r"(connection refused|no SSH handshake: .*reset.*)", out["node-5"]["error"])
    assert "rc" not in out["node-5"]
    assert out["node-6"]["error"].endswith("no SSH handshake within 2 s")
    # completion order: the quick ones come out before the node that hangs
    order = [json.loads(line)["node"] for line in lines]
    assert order.index("node-4") > max(order.index(n) for n in ("node-1", "node-2", "node-3"))


def test_ko_records_pass_through_unchanged_and_first(up):
    ko = records.ko(records.new("node-2"), "pxe", "no profile")
    stdin = json.dumps(ko) + "\nnode-1\n"
    code, lines, _ = ka_exec(up, "--format", "json", "--", "sleep 1", stdin=stdin)
    assert code == 1
    assert json.loads(lines[0]) == ko
    assert json.loads(lines[1])["node"] == "node-1"


def test_script_with_arguments_and_interpreter(up, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text("#!/usr/bin/env python3\nimport sys, os\n"
                      "print(os.environ.get('KABIN_NODE'), sys.argv[1:])\n")
    code, lines, err = ka_exec(up, "-m", "node-[1-3]", "--format", "json", "--script",
                               str(script), "--", "a b", "$(id)")
    assert code == 0, err
    out = by_node(lines)
    for node in ("node-1", "node-2", "node-3"):
        assert out[node]["stdout"] == f"{node} ['a b', '$(id)']\n"
    assert up.ssh("node-1", "ls /tmp | grep -c kabin-script || true").stdout == "0\n"


def test_send_files_then_run(up, tmp_path):
    tool = tmp_path / "tool.sh"
    tool.write_text("#!/bin/sh\necho tool $1\n")
    tool.chmod(0o750)
    data = tmp_path / "data.bin"
    data.write_bytes(bytes(range(256)) * 1000)
    code, lines, err = ka_exec(up, "-m", "node-[1-4]", "--format", "json",
                               "--send", f"{tool}:/tmp/kabin-test/", "--send",
                               f"{data}:/tmp/kabin-test/data.bin", "--",
                               "stat -c %a /tmp/kabin-test/tool.sh; /tmp/kabin-test/tool.sh ok;"
                               " md5sum < /tmp/kabin-test/data.bin")
    assert code == 0, err
    digest = __import__("hashlib").md5(data.read_bytes()).hexdigest()
    for record in by_node(lines).values():
        assert record["stdout"] == f"750\ntool ok\n{digest}  -\n"
    code, lines, _ = ka_exec(up, "-m", "node-1", "--format", "json",
                             "--send", f"{tool}:/proc/nowhere/tool.sh")
    assert code == 1 and "cannot send" in json.loads(lines[0])["error"]


def test_kadeploy_variables(up):
    env = {"name": "debian12", "version": 1, "os": "linux", "filesystem": "ext4",
           "partition_type": 131, "boot": {"kernel": "/vmlinuz", "initrd": "/initrd.img"}}
    stdin = json.dumps(dict(records.new("node-1"), env=env)) + "\nnode-2\n"
    code, lines, err = ka_exec(up, "--kadeploy-env", "--format", "json", "--",
                               "env | grep ^KADEPLOY_ | sort", stdin=stdin)
    assert code == 0, err
    out = by_node(lines)
    seen = dict(line.split("=", 1) for line in out["node-1"]["stdout"].splitlines())
    assert seen["KADEPLOY_CLUSTER"] == "local"
    assert seen["KADEPLOY_DEPLOY_PART"] == "/dev/sda3"
    assert seen["KADEPLOY_ENV"] == "debian12" and seen["KADEPLOY_FS_TYPE"] == "ext4"
    assert seen["KADEPLOY_PART_TYPE"] == "83" and seen["KADEPLOY_ENV_KERNEL"] == "/vmlinuz"
    assert seen["KADEPLOY_ENV_EXTRACTION_DIR"] == "/mnt/dest"
    assert "KADEPLOY_ENV=" not in out["node-2"]["stdout"], "node-2's record names no env"
    code, lines, _ = ka_exec(up, "-m", "node-1", "--format", "json", "--", "env")
    assert "KADEPLOY_" not in json.loads(lines[0])["stdout"], "only with --env"


def test_gathered_view_and_node_lists(up, tmp_path):
    ok_file, ko_file = tmp_path / "ok", tmp_path / "ko"
    code, lines, _ = ka_exec(up, "-m", "node-[1-8]", "-b", "--ok", str(ok_file),
                             "--ko", str(ko_file), "--",
                             'case $KABIN_NODE in node-[1-5]) echo same ;; '
                             'node-6) echo other ;; *) exit 4 ;; esac')
    assert code == 1
    assert "\n".join(lines) == ("---------------\nnode-[1-5] (5)\n---------------\nsame\n"
                                "---------------\nnode-6 (1)\n---------------\nother\n"
                                "---------------\nnode-[7-8] (2) KO: exit code 4\n"
                                "---------------")
    assert sorted(ok_file.read_text().split()) == [f"node-{i}" for i in range(1, 7)]
    assert sorted(ko_file.read_text().split()) == ["node-7", "node-8"]


def test_library_call_streams_records(up):
    options = exec_mod.Options(command="echo $KABIN_NODE", timeout=20, fanout=3)
    out = list(exec_mod.run(up.config, map(records.new, up.nodes), options))
    assert sorted(r["stdout"] for r in out) == sorted(f"{n}\n" for n in up.nodes)


def test_usage_errors(up):
    code, _, err = ka_exec(up, "-m", "node-1")
    assert code == 2 and "nothing to do" in err
    code, _, err = ka_exec(up, "-m", "node-1", "--send", "nofile:/tmp/x")
    assert code == 2 and "cannot read nofile" in err
    code, _, err = ka_exec(up, "-m", "node-1;id", "--", "true")
    assert code == 2 and "invalid node set" in err
