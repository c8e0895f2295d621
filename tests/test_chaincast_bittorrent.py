"""ka-chaincast --method bittorrent on six netns nodes: a tracker and a seeder on the
frontend, aria2c on every node, real sshd, real bridges and shaped links."""

import json
import subprocess
import threading

import pytest
from chaincast_support import (
    kill_midstream,
    netns_instance,
    netns_pids,
    padded_tar_zst,
    peak_memory,
    remote_tree_digest_command,
    tree_digest,
)
from deploy_support import kadeploy, on_frontend

pytestmark = pytest.mark.testbed

NODES = [f"node-{i}" for i in range(1, 7)]
PADDING_MB, RING_MB = 40, 4


@pytest.fixture(scope="module")
def bed():
    yield from netns_instance("bt", len(NODES))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A small system-like tree and random data, larger than a relay's ring."""
    return padded_tar_zst(tmp_path_factory.mktemp("bt"), PADDING_MB)


def chaincast(bed, path, dest, stdin):
    done = on_frontend(bed, "ka-chaincast", "--method", "bittorrent", "--image", str(path),
                       "--to", dest, "--stall-timeout", "10", "--ring-size", str(RING_MB),
                       "--format", "json", "-v", input=stdin, text=True, timeout=300)
    assert done.returncode in (0, 1), done.stderr
    return {r["node"]: r for r in map(json.loads, done.stdout.splitlines())}, done


def test_every_node_gets_the_same_tree_in_bounded_memory(bed, image):
    root, path = image
    out, done = chaincast(bed, path, "/tmp/bt", "\n".join(NODES) + "\n")
    assert done.returncode == 0, done.stderr
    assert "repaired by unicast" not in done.stderr     # the swarm carried it all
    assert sorted(out) == NODES
    peaks = peak_memory(done.stderr)
    for node in NODES:
        assert out[node]["status"] == "ok", out[node]
        seen = bed.ssh(node, remote_tree_digest_command("/tmp/bt"))
        assert seen.stdout.strip() == tree_digest(root), node
        # the agent pours the fetched file through its ring: its memory is not the image's
        assert peaks[node] < PADDING_MB, (node, peaks)
    assert not any(netns_pids(bed, node, "aria2c") for node in NODES)


def test_a_killed_node_is_ko_a_ko_record_passes_and_a_lost_download_is_repaired(bed, image):
    """node-3 is powered off mid-download: KO. node-5's aria2c is killed mid-download: the
    source sends it the image by unicast: OK. node-6 comes in KO and passes untouched."""
    root, path = image
    stdin = "".join(json.dumps({"node": n, "status": "ok"}) + "\n" for n in NODES[:5])
    stdin += json.dumps({"node": "node-6", "status": "ko", "error": "earlier", "step": "x"}) + "\n"
    killed = threading.Event()
    killer = threading.Thread(target=kill_midstream, daemon=True,
                              args=(bed, "node-5", "aria2c", "node-3", 1.0, killed))
    killer.start()
    try:
        out, done = chaincast(bed, path, "/tmp/bt2", stdin)
    finally:
        killer.join(70)
        bed.power("node-3", "on")
    assert killed.is_set(), done.stderr
    assert done.returncode == 1, done.stderr
    assert out["node-6"] == {"node": "node-6", "status": "ko", "error": "earlier", "step": "x"}
    assert out["node-3"]["status"] == "ko" and out["node-3"]["error"], out["node-3"]
    assert "repaired by unicast" in done.stderr, done.stderr
    for node in ("node-1", "node-2", "node-4", "node-5"):
        assert out[node]["status"] == "ok", out[node]
        seen = bed.ssh(node, remote_tree_digest_command("/tmp/bt2"))
        assert seen.stdout.strip() == tree_digest(root), node
    assert bed.ssh("node-6", "test -e /tmp/bt2").returncode == 1


def test_kadeploy_broadcast_env_bittorrent_deploys_every_node(bed):
    """BroadcastEnv's Bittorrent variant: the environment goes through the swarm, every node OK."""
    subprocess.run(["ka-testbed", "mkenv", "--instance", bed.instance, "-q"], env=bed.env,
                   check=True, capture_output=True, timeout=300)
    done, out = kadeploy(bed, "-e", "testenv-tzst", "-m", ",".join(NODES), "--force-steps",
                         "SetDeploymentEnv|Untrusted:90:0&BroadcastEnv|Bittorrent:90:0"
                         "&BootNewEnv|Classical:90:0")
    assert done.returncode == 0, done.stderr
    assert {n: (r["status"], r["variant"]["BroadcastEnv"]) for n, r in out.items()} == \
        {n: ("ok", "Bittorrent") for n in NODES}
