"""ka-chaincast --launch tree on seven netns nodes: the frontend starts two agents over
SSH, agents start the others with OpenSSH's client through the frontend's forwarded
agent (real sshd, real ssh -A), and every agent reports to the frontend on its own.

Launch tree (fanout 2, in broadcast order): the frontend starts node-1 and node-2;
node-1 starts node-3 and node-4, node-2 starts node-5 and node-6, node-3 node-7."""

import json
import re

import pytest
from chaincast_support import (
    netns_instance,
    padded_tar_zst,
    remote_tree_digest_command,
    tree_digest,
)
from deploy_support import on_frontend

pytestmark = pytest.mark.testbed

NODES = [f"node-{i}" for i in range(1, 8)]
LAUNCHER = {"node-3": "node-1", "node-4": "node-1", "node-5": "node-2", "node-6": "node-2",
            "node-7": "node-3"}
PADDING_MB = 16


@pytest.fixture(scope="module")
def bed():
    yield from netns_instance("tree", len(NODES))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return padded_tar_zst(tmp_path_factory.mktemp("tree"), PADDING_MB)


def chaincast(bed, path, dest):
    done = on_frontend(bed, "ka-chaincast", "--launch", "tree", "--launch-fanout", "2",
                       "--image", str(path), "--to", dest, "--stall-timeout", "10",
                       "--format", "json", "-vv", "-m", ",".join(NODES), text=True, timeout=300)
    assert done.returncode in (0, 1), done.stderr
    return {r["node"]: r for r in map(json.loads, done.stdout.splitlines())}, done.stderr


def started_from(stderr):
    """node -> the address its agent was started from (ka-chaincast -vv says it)."""
    return dict(re.findall(r"(node-\d+): agent ready, started from (\S+)", stderr))


def test_agents_start_agents_and_every_node_gets_the_tree(bed, image):
    root, path = image
    out, stderr = chaincast(bed, path, "/tmp/tree")
    assert sorted(out) == NODES and all(r["status"] == "ok" for r in out.values()), stderr
    via = started_from(stderr)
    frontend = via["node-1"]
    assert via["node-2"] == frontend and frontend not in map(bed.address, NODES)
    for node, launcher in LAUNCHER.items():
        assert via[node] == bed.address(launcher), (node, via)
    assert "2 agent(s) started from here" in stderr
    for node in NODES:
        seen = bed.ssh(node, remote_tree_digest_command("/tmp/tree"))
        assert seen.stdout.strip() == tree_digest(root), node


def test_the_children_of_a_dead_launcher_are_started_from_the_frontend(bed, image):
    """node-2 is off: KO with the reason; node-5 and node-6, its launch children, are
    started by the frontend and get the image."""
    _, path = image
    bed.power("node-2", "off")
    try:
        out, stderr = chaincast(bed, path, "/tmp/tree2")
    finally:
        bed.power("node-2", "on")
    assert out["node-2"]["status"] == "ko"
    assert "cannot start the relay agent" in out["node-2"]["error"], out["node-2"]
    via = started_from(stderr)
    for node in ("node-5", "node-6"):
        assert out[node]["status"] == "ok", out[node]
        assert via[node] == via["node-1"], (node, via)     # the frontend's address
    assert all(out[n]["status"] == "ok" for n in NODES if n != "node-2"), out
    bed.wait_booted(["node-2"], "deploy", timeout=60)


def test_agents_outlive_their_launcher(bed, image):
    """node-1 crashes at half the image (all its processes die, its ssh clients to
    node-3 and node-4 among them): it is KO, the agents it started go on and finish."""
    root, path = image
    bed.fault("node-1", f"die-after-bytes={PADDING_MB // 2}M")
    try:
        out, stderr = chaincast(bed, path, "/tmp/tree3")
    finally:
        bed.clear("node-1")
        bed.power("node-1", "cycle")
    assert out["node-1"]["status"] == "ko" and out["node-1"]["error"], out["node-1"]
    via = started_from(stderr)
    for node in ("node-3", "node-4"):
        assert via[node] == bed.address("node-1"), (node, via)
        assert out[node]["status"] == "ok", (out[node], stderr)
        seen = bed.ssh(node, remote_tree_digest_command("/tmp/tree3"))
        assert seen.stdout.strip() == tree_digest(root), node
    assert all(out[n]["status"] == "ok" for n in NODES[1:]), out
    bed.wait_booted(["node-1"], "deploy", timeout=60)
