"""What the kadeploy tests on the testbed share: running it, resetting the nodes, a padded image."""

import json
import os
import signal
import subprocess
import threading

import pytest
import yaml

from kabin import stats
from kabin.testbed.instance import exec_argv

KABIN_PROCESSES = "kabin-chaincast|/(kadeploy|ka-exec|ka-reboot|ka-pxe|ka-chaincast)( |$)"


def on_frontend(bed, *argv, **kwargs):
    """Run a kabin command where the instance's frontend is (its namespace on the netns tier)."""
    return subprocess.run(exec_argv(bed.instance, list(argv)), env=bed.env, capture_output=True,
                          **kwargs)


def reset(bed):
    bed.clear()
    on_frontend(bed, "ka-pxe", "set", "deploy", "-m", "node-[1-8]", "--format", "json",
                check=True, timeout=60)
    for node in bed.nodes:
        bed.power(node, "cycle")
    bed.wait_booted(bed.nodes, "deploy", timeout=90)
    # no system left on the disks: no active partition, no file system on the deploy one
    on_frontend(bed, "ka-exec", "-m", "node-[1-8]", "--format", "json", "--",
                "sfdisk --quiet --activate /dev/sda - && wipefs -q -a /dev/sda3",
                check=True, timeout=120)


def kadeploy(bed, *args, timeout=400):
    done = on_frontend(bed, "kadeploy", "--format", "json", *args, text=True, timeout=timeout)
    return done, {r["node"]: r for r in map(json.loads, done.stdout.splitlines())}


def kadeploy_faulted_at(bed, args, macro, faults, deadline):
    """Run kadeploy with ``args``, giving each node of ``faults`` (node -> fault) its fault
    as ``macro`` starts: kadeploy is stopped (SIGSTOP) from its "MACRO-Variant: N node(s)
    in" line until every fault is in. (exit code, records by node, stderr); a failure if
    it runs past ``deadline`` seconds or ``macro`` never starts."""
    run = subprocess.Popen(exec_argv(bed.instance, ["kadeploy", "--format", "json", *args]),
                           env=bed.env, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    said, injected = [], threading.Event()

    def watch():
        for line in run.stderr:
            said.append(line)
            if not injected.is_set() and f": {macro}-" in line and "node(s) in" in line:
                os.kill(run.pid, signal.SIGSTOP)
                try:
                    for node, fault in faults.items():
                        bed.fault(node, fault)
                finally:
                    os.kill(run.pid, signal.SIGCONT)
                injected.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        stdout = run.stdout.read()
        run.wait(timeout=deadline)
    except subprocess.TimeoutExpired:
        pytest.fail(f"kadeploy ran past {deadline} s with faults at {macro}: {''.join(said)}")
    finally:
        run.kill()
        watcher.join(10)
    assert injected.is_set(), f"{macro} never started: {''.join(said)}"
    return run.returncode, {r["node"]: r for r in map(json.loads, stdout.splitlines())}, \
        "".join(said)


def assert_ok_or_ko_with_a_reason(out, nodes, stderr):
    """One record per node of ``nodes`` in ``out`` (by node), each OK or KO with an error
    (never an internal one) and the step it failed in."""
    assert sorted(out) == sorted(nodes), stderr
    for record in out.values():
        assert record["status"] in ("ok", "ko"), record
        if record["status"] == "ko":
            assert record["error"] and "internal error" not in record["error"], record
            assert record["step"], record


def macro_entries(record, macro):
    return [h for h in record["history"] if h["step"] == macro and "variant" in h]


def padded_env(bed, tmp_path, megabytes):
    """An anonymous environment: testenv-tzst plus ``megabytes`` of random data (so that a
    transfer lasts long enough for the testbed to see a node's byte count grow)."""
    desc = yaml.safe_load(subprocess.run(["ka-env", "show", "testenv-tzst"], env=bed.env,
                                         text=True, capture_output=True, check=True).stdout)
    pad = tmp_path / "pad"
    pad.mkdir()
    (pad / "padding").write_bytes(os.urandom(megabytes << 20))
    plain = tmp_path / "padded.tar"
    subprocess.run(["zstd", "-q", "-d", desc["image"]["file"], "-o", str(plain)], check=True)
    subprocess.run(["tar", "-rf", str(plain), "-C", str(pad), "padding"], check=True)
    subprocess.run(["zstd", "-q", "--rm", str(plain)], check=True)
    desc.update(name="padded", image=dict(desc["image"], file=f"{plain}.zst"))
    path = tmp_path / "padded.yml"
    path.write_text(yaml.safe_dump(desc))
    return path


def leftovers(bed):
    """kabin processes still running (here or on the nodes) and nodes still held."""
    procs = subprocess.run(["pgrep", "-af", KABIN_PROCESSES], capture_output=True,
                           text=True).stdout.splitlines()
    states = subprocess.run(["ka-stats", "nodes", "--format", "json"], env=bed.env, text=True,
                            capture_output=True, check=True).stdout
    held = {r["node"]: r["state"] for r in map(json.loads, states.splitlines())
            if r["state"] in stats.IN_PROGRESS}
    return [p for p in procs if "pgrep" not in p], held
