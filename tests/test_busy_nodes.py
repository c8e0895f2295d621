"""A node another live run holds (a kadeploy) is left alone by the commands that change
nodes: ka-pxe set, ka-reboot, ka-exec end it KO with the holder named, unless --force.

A real second process holds the node through the deployment log (stats.hold_nodes) for
as long as its stdin stays open; the commands run as installed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "qemu"))
from cluster import make_config  # noqa: E402

HOLDER = """import sys
from kabin import config, db, stats
with db.open_database(config.load(sys.argv[1])) as database:
    refused = stats.hold_nodes(database, ["node-1"], "deploy", "D-holder", "alice")
print("held" if not refused else refused, flush=True)
sys.stdin.read()
"""


@pytest.fixture
def held(tmp_path):
    cfg = make_config(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(cfg.dir)], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == "held\n"
        yield cfg, dict(os.environ, KABIN_CONFIG=str(cfg.dir))
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def run(env, *argv):
    """``argv`` run; its options go before a ka-exec command's ``--``."""
    argv = list(argv)
    if "--" in argv:
        end = argv.index("--")
        command, argv = argv[end:end + 2], argv[:end] + argv[end + 2:]
        argv += command
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    return done.returncode, {r["node"]: r for r in map(json.loads, done.stdout.splitlines())}


@pytest.mark.parametrize("argv", [
    ["ka-pxe", "set", "deploy"],
    ["ka-reboot", "--level", "hard", "--deadline", "3", "--command-timeout", "1"],
    ["ka-reboot", "power", "off", "--deadline", "3", "--command-timeout", "1"],
    ["ka-exec", "-t", "3", "--", "true"],
])
def test_a_held_node_is_ko_and_left_alone_unless_forced(held, argv):
    cfg, env = held
    tree = sorted(Path(cfg.server.pxe_root).rglob("*")) if Path(cfg.server.pxe_root).exists() \
        else []
    code, out = run(env, *argv, "-m", "node-[1-2]", "--format", "json")
    assert code == 1
    assert out["node-1"]["status"] == "ko"
    assert "being deployed by alice (deployment D-holder" in out["node-1"]["error"]
    assert "--force" in out["node-1"]["error"]
    assert "being deployed" not in (out["node-2"].get("error") or "")
    if argv[0] == "ka-pxe":       # node-2 got its profile, node-1 none
        assert out["node-2"]["status"] == "ok"
        assert [p.name for p in Path(cfg.server.pxe_root).rglob("*") if p.is_file()
                and p not in tree] == ["7F000102"]
    _, forced = run(env, *argv, "-m", "node-1", "--force", "--format", "json")
    assert "being deployed" not in (forced["node-1"].get("error") or "")
    if argv[0] == "ka-pxe":
        assert forced["node-1"]["status"] == "ok"


def test_reading_the_power_is_not_refused(held):
    _, env = held
    _, out = run(env, "ka-reboot", "power", "status", "-m", "node-1", "--command-timeout", "1",
                 "--format", "json")
    assert "being deployed" not in (out["node-1"].get("error") or "")


def test_check_destructive_refuses_a_node_running_a_destructive_environment(tmp_path):
    cfg = make_config(tmp_path)
    env = dict(os.environ, KABIN_CONFIG=str(cfg.dir))
    image = tmp_path / "disk.dd.gz"
    image.write_bytes(b"\x1f\x8b" + bytes(64))
    desc = tmp_path / "wipe.yml"
    desc.write_text(f"name: wipe\nversion: 1\ndestructive: true\nvisibility: public\n"
                    f"image: {{file: {image}, kind: dd, compression: gzip}}\n")
    subprocess.run(["ka-env", "add", str(desc)], env=env, check=True, capture_output=True)
    deployed = json.dumps({"node": "node-1", "status": "ok", "env": "wipe@1"})
    subprocess.run(["ka-stats", "record", "--operation", "deploy"], input=deployed, env=env,
                   text=True, check=True, capture_output=True)
    reboot = ["ka-reboot", "--level", "hard", "--deadline", "3", "--command-timeout", "1"]
    _, out = run(env, *reboot, "-c", "-m", "node-[1-2]", "--format", "json")
    assert out["node-1"]["status"] == "ko"
    assert out["node-1"]["error"] == ("node-1 runs wipe@1, an environment marked destructive "
                                      "(--check-destructive)")
    assert "destructive" not in (out["node-2"].get("error") or "")
    _, out = run(env, *reboot, "-m", "node-1", "--format", "json")
    assert "destructive" not in (out["node-1"].get("error") or "")
