"""ka-chaincast --method multicast on six netns nodes: udpcast's sender on the frontend,
its receiver piped into each node's sink, real sshd, real bridges and shaped links."""

import json
import subprocess
import threading

import pytest
from chaincast_support import (
    kill_midstream,
    netns_instance,
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
    yield from netns_instance("mcast", len(NODES))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A small system-like tree and random data, larger than a relay's ring."""
    return padded_tar_zst(tmp_path_factory.mktemp("mcast"), PADDING_MB)


def chaincast(bed, image, *args):
    done = on_frontend(bed, "ka-chaincast", "--method", "multicast", "--image", str(image),
                       "--to", "/tmp/mcast", "--stall-timeout", "10", "--format", "json",
                       "--ring-size", str(RING_MB), "-v", "-m", ",".join(NODES), *args,
                       text=True, timeout=300)
    assert done.returncode in (0, 1), done.stderr
    return {r["node"]: r for r in map(json.loads, done.stdout.splitlines())}, done


def test_every_node_gets_the_same_tree_in_bounded_memory(bed, image):
    root, path = image
    out, done = chaincast(bed, path)
    assert done.returncode == 0, done.stderr
    assert sorted(out) == NODES
    peaks = peak_memory(done.stderr)
    for node in NODES:
        assert out[node]["status"] == "ok", out[node]
        seen = bed.ssh(node, remote_tree_digest_command("/tmp/mcast"))
        assert seen.stdout.strip() == tree_digest(root), node
        assert peaks[node] < PADDING_MB, (node, peaks)   # the stream goes through the ring


def test_a_killed_node_is_ko_a_ko_record_passes_and_a_lost_receiver_is_repaired(bed, image):
    """node-3 is powered off mid-stream: KO. node-5's receiver is
    killed mid-stream: the source sends it the rest by unicast, from its offset: OK.
    node-6 comes in KO: its record passes through untouched, nothing is sent to it."""
    root, path = image
    stdin = "".join(json.dumps({"node": n, "status": "ok"}) + "\n" for n in NODES[:5])
    stdin += json.dumps({"node": "node-6", "status": "ko", "error": "earlier", "step": "x"}) + "\n"
    killed = threading.Event()
    killer = threading.Thread(target=kill_midstream, daemon=True,
                              args=(bed, "node-5", "udp-receiver", "node-3", 0.5, killed))
    killer.start()
    try:
        done = on_frontend(bed, "ka-chaincast", "--method", "multicast", "--image", str(path),
                           "--to", "/tmp/mcast2", "--stall-timeout", "10", "--format", "json",
                           "-v", input=stdin, text=True, timeout=300)
    finally:
        killer.join(70)
        bed.power("node-3", "on")
    assert killed.is_set(), done.stderr
    out = {r["node"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert done.returncode == 1, done.stderr
    assert out["node-6"] == {"node": "node-6", "status": "ko", "error": "earlier", "step": "x"}
    assert out["node-3"]["status"] == "ko" and out["node-3"]["error"], out["node-3"]
    assert "repaired by unicast" in done.stderr, done.stderr
    for node in ("node-1", "node-2", "node-4", "node-5"):
        assert out[node]["status"] == "ok", out[node]
        seen = bed.ssh(node, remote_tree_digest_command("/tmp/mcast2"))
        assert seen.stdout.strip() == tree_digest(root), node
    assert bed.ssh("node-6", "test -e /tmp/mcast2").returncode == 1


def test_kadeploy_broadcast_env_multicast_deploys_every_node(bed):
    """BroadcastEnv's Multicast variant: the environment goes by udpcast, every node OK."""
    subprocess.run(["ka-testbed", "mkenv", "--instance", bed.instance, "-q"], env=bed.env,
                   check=True, capture_output=True, timeout=300)
    done, out = kadeploy(bed, "-e", "testenv-tzst", "-m", ",".join(NODES), "--force-steps",
                         "SetDeploymentEnv|Untrusted:90:0&BroadcastEnv|Multicast:90:0"
                         "&BootNewEnv|Classical:90:0")
    assert done.returncode == 0, done.stderr
    assert {n: (r["status"], r["variant"]["BroadcastEnv"]) for n, r in out.items()} == \
        {n: ("ok", "Multicast") for n in NODES}
