"""Rights: the administrator grants users nodes; commands refuse a run (exit 3, nothing done)
with a node the requesting user ($SUDO_USER, through sudo) has no right on; the scheduler
hooks grant a job's nodes and take them back. Real commands, a real database."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "qemu"))
from cluster import make_config  # noqa: E402

from kabin import db, rights  # noqa: E402
from kabin.errors import RightsError  # noqa: E402

HOOKS = Path(__file__).resolve().parents[1] / "etc" / "kadeploy" / "hooks"


@pytest.fixture
def site(tmp_path):
    cfg = make_config(tmp_path)
    admin = {k: v for k, v in os.environ.items() if k != "SUDO_USER"}
    admin["KABIN_CONFIG"] = str(cfg.dir)
    return cfg, admin, dict(admin, SUDO_USER="alice")


def run(env, *argv, stdin=None):
    return subprocess.run(argv, env=env, input=stdin, capture_output=True, text=True,
                          timeout=120)


def listed(env, *args):
    done = run(env, "ka-rights", "list", "--format", "json", *args)
    assert done.returncode == 0, done.stderr
    return [(r["user"], r["node"], r["part"]) for r in map(json.loads, done.stdout.splitlines())]


def pxe_files(cfg):
    root = Path(cfg.server.pxe_root)
    return sorted(p.name for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_the_administrator_grants_lists_and_revokes(site):
    _, admin, _ = site
    assert run(admin, "ka-rights", "add", "-u", "alice", "-m", "node-[1-3]").returncode == 0
    assert run(admin, "ka-rights", "add", "-u", "bob", "-m", "node-4", "--part", "3"
               ).returncode == 0
    assert listed(admin) == [("alice", "node-1", "*"), ("alice", "node-2", "*"),
                             ("alice", "node-3", "*"), ("bob", "node-4", "3")]
    assert listed(admin, "-u", "bob") == [("bob", "node-4", "3")]
    assert run(admin, "ka-rights", "delete", "-u", "alice", "-m", "node-2").returncode == 0
    assert listed(admin, "-u", "alice") == [("alice", "node-1", "*"), ("alice", "node-3", "*")]


def test_only_the_administrator_grants(site):
    _, _, alice = site
    done = run(alice, "ka-rights", "add", "-u", "alice", "-m", "node-[1-8]")
    assert done.returncode == 3
    assert done.stderr.strip() == ("ka-rights: error: only the administrator (root) may grant "
                                   "rights (you are alice)")


def test_a_run_with_one_node_not_the_users_does_nothing(site):
    cfg, admin, alice = site
    run(admin, "ka-rights", "add", "-u", "alice", "-m", "node-[1-2]")
    done = run(alice, "ka-pxe", "set", "deploy", "-m", "node-[1-3]")
    assert done.returncode == 3 and done.stdout == ""
    assert done.stderr.strip() == ("ka-pxe: error: alice has no right on node-3 (1 of 3 "
                                   "nodes): nothing was done (ka-rights list; the "
                                   "administrator grants them)")
    assert pxe_files(cfg) == []          # not even node-1's and node-2's profiles
    for argv in (["ka-reboot", "--level", "hard"], ["ka-exec", "--", "true"],
                 ["ka-chaincast", "--image", "/etc/hostname"]):
        refused = run(alice, *argv[:1], "-m", "node-[2-3]", *argv[1:])
        assert refused.returncode == 3 and "no right on node-3" in refused.stderr
    allowed = run(alice, "ka-pxe", "set", "deploy", "-m", "node-[1-2]", "--format", "json")
    assert allowed.returncode == 0, allowed.stderr
    assert pxe_files(cfg) == ["7F000101", "7F000102"]
    assert run(admin, "ka-pxe", "set", "deploy", "-m", "node-3").returncode == 0


def test_a_right_on_one_partition(site):
    cfg, admin, _ = site
    run(admin, "ka-rights", "add", "-u", "bob", "-m", "node-4", "--part", "2")
    with db.open_database(cfg) as database:
        rights.check(database, "bob", ["node-4"], part=2)
        rights.check(database, "bob", ["node-4"])                  # any right will do
        with pytest.raises(RightsError, match="no right on the partition deployed to"):
            rights.check(database, "bob", ["node-4"], part=lambda node: 3)


def test_environments_belong_to_the_requesting_user(site, tmp_path):
    _, _, alice = site
    image = tmp_path / "disk.dd.gz"
    image.write_bytes(b"\x1f\x8b" + bytes(64))
    desc = tmp_path / "mine.yml"
    desc.write_text(f"name: mine\nversion: 1\nimage: {{file: {image}, kind: dd, "
                    "compression: gzip}\n")
    assert run(alice, "ka-env", "add", str(desc)).returncode == 0
    shown = run(alice, "ka-env", "list", "--format", "json")
    assert [json.loads(line)["owner"] for line in shown.stdout.splitlines()] == ["alice"]


def test_slurm_hooks_grant_then_revoke_the_jobs_nodes(site):
    _, admin, _ = site
    job = dict(admin, SUDO_USER="slurm", SLURM_JOB_ID="42", SLURM_JOB_USER="alice",
               SLURM_JOB_NODELIST="node-[1-2]", KABIN_REFERENCE_ENV="")
    done = run(job, str(HOOKS / "slurm-prolog"))
    assert done.returncode == 0, done.stderr
    assert listed(admin) == [("alice", "node-1", "*"), ("alice", "node-2", "*")]
    done = run(job, str(HOOKS / "slurm-epilog"))
    assert done.returncode == 0, done.stderr
    assert listed(admin) == []


def test_oar_hooks_read_the_node_file(site, tmp_path):
    _, admin, _ = site
    node_file = tmp_path / "OAR_NODEFILE"
    node_file.write_text("node-3\nnode-3\nnode-5\nnode-5\n")      # once per core
    job = dict(admin, SUDO_USER="oar", KABIN_REFERENCE_ENV="")
    done = run(job, str(HOOKS / "oar-prologue"), "7", "bob", str(node_file))
    assert done.returncode == 0, done.stderr
    assert listed(admin) == [("bob", "node-3", "*"), ("bob", "node-5", "*")]
    done = run(job, str(HOOKS / "oar-epilogue"), "7", "bob", str(node_file))
    assert done.returncode == 0, done.stderr
    assert listed(admin) == []


@pytest.mark.testbed
def test_the_epilog_redeploys_the_reference_environment(testbed):
    subprocess.run(["ka-testbed", "mkenv", "--instance", testbed.instance, "-q",
                    "--only", "testenv-tzst"], env=testbed.env, check=True, capture_output=True,
                   timeout=300)
    job = dict(testbed.env, SLURM_JOB_USER="alice", SLURM_JOB_NODELIST="node-[7-8]",
               KABIN_REFERENCE_ENV="testenv-tzst")
    assert run(job, str(HOOKS / "slurm-prolog")).returncode == 0
    try:
        done = run(job, str(HOOKS / "slurm-epilog"))
        assert done.returncode == 0, done.stderr
        assert listed(testbed.env, "-u", "alice") == []
        for node in ("node-7", "node-8"):
            assert 'NAME="kabin-testenv"' in testbed.ssh(node, "cat /etc/os-release").stdout
    finally:
        subprocess.run(["ka-pxe", "set", "deploy", "-m", "node-[7-8]"], env=testbed.env,
                       capture_output=True, timeout=60)
        for node in ("node-7", "node-8"):
            testbed.power(node, "cycle")
        testbed.wait_booted(["node-7", "node-8"], "deploy", timeout=90)
        subprocess.run(["ka-exec", "-m", "node-[7-8]", "--", "sfdisk --quiet --activate "
                        "/dev/sda - && wipefs -q -a /dev/sda3"], env=testbed.env,
                       capture_output=True, timeout=120)   # no system left on the disks
