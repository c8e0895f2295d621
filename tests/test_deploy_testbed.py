"""kadeploy end to end on the testbed: real reboots, real chain broadcast, real faults."""

import json
import signal
import socket
import subprocess
import time

import pytest

from deploy_support import kadeploy, macro_entries, padded_env, reset

pytestmark = pytest.mark.testbed

FOUR = "node-[1-4]"


@pytest.fixture(scope="module")
def bed(testbed):
    """The testbed with its environments built (ka-testbed mkenv)."""
    subprocess.run(["ka-testbed", "mkenv", "--instance", testbed.instance, "-q"],
                   env=testbed.env, check=True, capture_output=True, timeout=300)
    return testbed


@pytest.fixture(autouse=True)
def back_to_deploy_env(bed):
    """Each test starts from nodes in the deployment environment and leaves them so."""
    yield
    reset(bed)


def port_open(address, port):
    try:
        socket.create_connection((address, port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("env", ["testenv-tzst", "testenv-dd"])
def test_deploy_and_log_in(bed, env):
    done, out = kadeploy(bed, "-e", env, "-m", "node-[1-8]")
    assert done.returncode == 0, done.stderr
    assert sorted(out) == bed.nodes and all(r["status"] == "ok" for r in out.values())
    for node in bed.nodes:
        login = bed.ssh(node, "cat /etc/os-release")
        assert login.returncode == 0 and 'NAME="kabin-testenv"' in login.stdout
        assert not port_open(bed.address(node), bed.config.server.deploy_marker_port)
    states = subprocess.run(["ka-stats", "nodes", "--format", "json"], env=bed.env, text=True,
                            capture_output=True, check=True).stdout
    assert {json.loads(line)["state"] for line in states.splitlines()} == {"deployed"}
    record = out["node-1"]
    assert record["env"] == f"{env}@1" and record["deployment"].startswith("D-")
    assert set(record["variant"]) == {"SetDeploymentEnv", "BroadcastEnv", "BootNewEnv"}


def test_nodes_losing_their_first_reboot_are_replayed(bed):
    for node in ("node-1", "node-2"):
        bed.fault(node, "returns-on-boot=2")
    done, out = kadeploy(bed, "-e", "testenv-tzst", "-m", FOUR,
                         "--force-steps", "SetDeploymentEnv|Untrusted:25:1")
    assert done.returncode == 0, done.stderr
    assert all(r["status"] == "ok" for r in out.values())
    first, second = macro_entries(out["node-1"], "SetDeploymentEnv")
    assert first["status"] == "ko" and first["error"] == "Timeout in the SetDeploymentEnv-Untrusted step"
    assert second["status"] == "ok" and second["retries"] == 1
    assert [h["status"] for h in macro_entries(out["node-3"], "SetDeploymentEnv")] == ["ok"]


def test_dead_bmc_and_dead_ssh_node_ends_ko_with_the_reason(bed):
    bed.fault("node-3", "bmc-dead")
    bed.fault("node-3", "ssh-dead")
    done, out = kadeploy(bed, "-e", "testenv-tzst", "-m", FOUR,
                         "--force-steps", "SetDeploymentEnv|Untrusted:90:0")
    assert done.returncode == 1
    assert out["node-3"]["status"] == "ko" and out["node-3"]["error"]
    assert {n: r["status"] for n, r in out.items() if n != "node-3"} == \
        {"node-1": "ok", "node-2": "ok", "node-4": "ok"}


def test_node_dying_during_the_broadcast_is_ko_the_others_ok(bed, tmp_path):
    env = padded_env(bed, tmp_path, 32)
    bed.fault("node-2", "die-after-bytes=8M")
    done, out = kadeploy(bed, "-a", str(env), "-m", FOUR,
                         "--force-steps", "BroadcastEnv|Chain:60:0")
    assert done.returncode == 1
    assert out["node-2"]["status"] == "ko"
    assert macro_entries(out["node-2"], "BroadcastEnv")[-1]["status"] == "ko"
    assert all(out[n]["status"] == "ok" for n in ("node-1", "node-3", "node-4"))


def test_a_variant_timing_out_falls_back_to_the_next(bed):
    done, out = kadeploy(bed, "-e", "testenv-tzst", "-m", FOUR,
                         "--force-steps", "BootNewEnv|Classical:1:0,HardReboot:90:0")
    assert done.returncode == 0, done.stderr
    for record in out.values():
        tries = macro_entries(record, "BootNewEnv")
        assert [(t["variant"], t["status"]) for t in tries] == [("Classical", "ko"),
                                                                ("HardReboot", "ok")]
        assert tries[0]["error"] == "Timeout in the BootNewEnv-Classical step"


def test_breakpoint_and_custom_operation(bed, tmp_path):
    custom = tmp_path / "custom.yml"
    custom.write_text("SetDeploymentEnv:\n  mount_deploy_part:\n    post-ops:\n"
                      "      - {action: exec, command: 'echo custom > /mnt/dest/kabin-mark'}\n")
    done, out = kadeploy(bed, "-e", "testenv-tzst", "-m", FOUR, "--custom-steps", str(custom),
                         "--breakpoint", "SetDeploymentEnv")
    assert done.returncode == 0, done.stderr
    for node, record in out.items():
        assert record["breakpoint"] == "SetDeploymentEnv"
        assert "BroadcastEnv" not in record["variant"]
        assert bed.ssh(node, "cat /mnt/dest/kabin-mark").stdout == "custom\n"
    assert bed.status()["node-1"]["booted"] == "deploy"


def test_second_run_refused_then_ctrl_c_aborts_cleanly(bed):
    first = subprocess.Popen(["kadeploy", "--format", "json", "-e", "testenv-tzst", "-m", FOUR],
                             env=bed.env, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while "deploying" not in _states(bed).values():
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.2)
        done, out = kadeploy(bed, "-e", "testenv-tzst", "-m", "node-2")
        assert done.returncode == 1
        assert "use --force" in out["node-2"]["error"]
        first.send_signal(signal.SIGINT)
        stdout, stderr = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130, stderr
    assert stderr.rstrip().endswith("kadeploy: error: interrupted: unfinished nodes are marked aborted")
    records = [json.loads(line) for line in stdout.splitlines()]
    assert {r["error"] for r in records} == {"Aborted"} and len(records) == 4
    assert set(_states(bed).values()) == {"aborted"}
    relays = subprocess.run(["pgrep", "-f", "kabin-chaincast"], capture_output=True, text=True)
    assert relays.stdout == ""


def _states(bed):
    out = subprocess.run(["ka-stats", "nodes", "--format", "json", "-m", FOUR], env=bed.env,
                         text=True, capture_output=True, check=True).stdout
    return {r["node"]: r["state"] for r in map(json.loads, out.splitlines())}


def test_printed_pipeline_gives_the_same_outcomes(bed):
    done, out = kadeploy(bed, "-e", "testenv-tzst", "-m", FOUR)
    assert done.returncode == 0, done.stderr
    script = subprocess.run(["kadeploy", "-e", "testenv-tzst", "-m", FOUR, "--print-pipeline"],
                            env=bed.env, text=True, capture_output=True, check=True).stdout
    piped = subprocess.run(["bash", "-o", "pipefail", "-c", script.rstrip() + " --format json"],
                           env=bed.env, text=True, capture_output=True, timeout=400)
    assert piped.returncode == 0, piped.stderr
    outcomes = {r["node"]: r["status"] for r in map(json.loads, piped.stdout.splitlines())}
    assert outcomes == {n: r["status"] for n, r in out.items()}
    for node in out:
        assert 'NAME="kabin-testenv"' in bed.ssh(node, "cat /etc/os-release").stdout


SCENARIOS = {   # faults, kadeploy's options, what the script says on stderr
    "replay": ({"node-1": "returns-on-boot=2", "node-2": "returns-on-boot=2"},
               ["--force-steps", "SetDeploymentEnv|Untrusted:25:1"],
               "SetDeploymentEnv-Untrusted: retry 1/1"),
    "fallback": ({}, ["--force-steps", "BootNewEnv|Classical:1:0,HardReboot:90:0"],
                 "BootNewEnv-HardReboot: 4 node(s)"),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_the_printed_script_replays_and_falls_back_as_kadeploy(bed, tmp_path, scenario):
    faults, args, said = SCENARIOS[scenario]
    outcomes = []
    for run in ("kadeploy", "script"):
        for node, fault in faults.items():
            bed.fault(node, fault)
        if run == "kadeploy":
            done, out = kadeploy(bed, "-e", "testenv-tzst", "-m", FOUR, *args)
        else:
            script = tmp_path / "deploy.sh"
            script.write_text(subprocess.run(
                ["kadeploy", "-e", "testenv-tzst", "-m", FOUR, *args, "--print-pipeline"],
                env=bed.env, text=True, capture_output=True, check=True).stdout)
            done = subprocess.run(["sh", str(script)], env=bed.env, text=True,
                                  capture_output=True, timeout=600)
            out = {r["node"]: r for r in map(json.loads, done.stdout.splitlines())}
            assert said in done.stderr, done.stderr[-2000:]
        outcomes.append((done.returncode, {n: r["status"] for n, r in out.items()}))
        reset(bed)
    assert outcomes[0] == outcomes[1] == (0, dict.fromkeys(out, "ok"))
    assert sorted(out) == ["node-1", "node-2", "node-3", "node-4"]


def test_anonymous_env_post_install_keys_no_kexec_no_bootloader(bed, tmp_path):
    post = tmp_path / "post"
    post.mkdir()
    (post / "post.sh").write_text('echo "$KADEPLOY_ENV $KADEPLOY_DEPLOY_PART" '
                                  '> "$KADEPLOY_ENV_EXTRACTION_DIR/kabin-post"\n')
    subprocess.run(["tar", "-czf", str(tmp_path / "post.tgz"), "-C", str(post), "post.sh"],
                   check=True)
    desc = subprocess.run(["ka-env", "show", "testenv-tzst"], env=bed.env, text=True,
                          capture_output=True, check=True).stdout
    desc = desc.replace("name: testenv-tzst", "name: anon-post") + (
        f"postinstalls:\n- {{archive: {tmp_path / 'post.tgz'}, compression: gzip, "
        "script: sh post.sh}\n")
    (tmp_path / "anon.yml").write_text(desc)
    (tmp_path / "keys").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKabinTestKey kabin@test\n")
    done, out = kadeploy(bed, "-a", str(tmp_path / "anon.yml"), "-m", "node-[1-2]",
                         "-k", str(tmp_path / "keys"), "--no-kexec",
                         "--disable-bootloader-install")
    assert done.returncode == 0, done.stderr
    for node, record in out.items():
        assert record["variant"]["BootNewEnv"] == "Classical"
        assert bed.ssh(node, "cat /kabin-post").stdout == "anon-post /dev/sda3\n"
        assert "kabin@test" in bed.ssh(node, "cat /root/.ssh/authorized_keys").stdout
        assert bed.ssh(node, "test -e /boot/kabin-root").returncode == 1
