"""Real shell pipelines of installed commands (subprocesses, not CliRunner)."""

import json
import os
import shutil
import subprocess

import pytest
import yaml

from kabin import paths


@pytest.fixture
def confdir(tmp_path):
    """The sample config, with nodes on addresses where nothing listens."""
    target = tmp_path / "etc"
    shutil.copytree(paths.sample_config_dir(), target)
    server = yaml.safe_load((target / "server.yml").read_text())
    server["paths"]["state_dir"] = str(tmp_path / "state")
    server["ssh"]["connect_timeout"] = 2
    (target / "server.yml").write_text(yaml.safe_dump(server))
    clusters = yaml.safe_load((target / "clusters.yml").read_text())
    clusters["clusters"][0]["nodes"][0]["address"] = "127.0.254.[1-8]"
    (target / "clusters.yml").write_text(yaml.safe_dump(clusters))
    return target


def shell(command, confdir, stdin=""):
    env = dict(os.environ, KABIN_CONFIG=str(confdir))
    return subprocess.run(["bash", "-o", "pipefail", "-c", command], input=stdin, text=True,
                          capture_output=True, env=env, timeout=120)


def test_two_commands_ko_pass_through_and_history(confdir):
    ko = json.dumps({"node": "node-8", "status": "ko", "error": "dead before", "x": {"k": 1}})
    done = shell("ka-stats record --operation reboot --format json "
                 "| ka-exec --format json -t 5 -- true", confdir,
                 stdin=f"# the nodes\nnode-[1-2]\n{ko}\n")
    assert done.returncode == 1, done.stderr
    out = {r["node"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert out["node-8"] == json.loads(ko), "a KO record passes through unchanged"
    for node in ("node-1", "node-2"):
        assert out[node]["status"] == "ko" and "127.0.254" in out[node]["error"]
        assert out[node]["history"][-1]["step"] == "exec"


def test_output_streams_before_the_input_ends(confdir):
    env = dict(os.environ, KABIN_CONFIG=str(confdir))
    upstream = subprocess.Popen(["ka-stats", "record", "--operation", "reboot", "--format",
                                 "json"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, env=env)
    downstream = subprocess.Popen(["ka-stats", "record", "--operation", "reboot", "--format",
                                   "json"], stdin=upstream.stdout, stdout=subprocess.PIPE,
                                  text=True, env=env)
    upstream.stdout.close()
    upstream.stdin.write("node-1\n")
    upstream.stdin.flush()
    first = json.loads(downstream.stdout.readline())  # arrives while stdin is still open
    assert first["node"] == "node-1"
    upstream.stdin.write("node-2\n")
    upstream.stdin.close()
    rest = [json.loads(line) for line in downstream.stdout]
    assert [r["node"] for r in rest] == ["node-2"]
    assert upstream.wait(30) == 0 and downstream.wait(30) == 0


def test_malformed_line_exit_2_names_the_line(confdir):
    done = shell("ka-stats record --format json", confdir, stdin="node-1\n{bad json\n")
    assert done.returncode == 2
    assert "<stdin>:2: malformed JSON record" in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_broken_pipe_is_quiet(confdir):
    done = shell("ka-stats record --format json -m 'node-[1-50000]' | head -1", confdir)
    assert done.returncode == 141, done.stderr
    assert done.stderr == ""
    assert json.loads(done.stdout)["node"] == "node-1"


def test_unknown_option_exit_2_and_config_error_exit_3(confdir, tmp_path):
    done = shell("ka-exec --no-such-option -- true", confdir)
    assert done.returncode == 2 and done.stderr.startswith("ka-exec: error: ")
    (confdir / "server.yml").write_text("fanout: many\n")
    done = shell("ka-exec -m node-1 -- true", confdir)
    assert done.returncode == 3
    assert done.stderr == f"ka-exec: error: {confdir / 'server.yml'}: key 'fanout': " \
                          "expected an integer, got 'many'\n"
