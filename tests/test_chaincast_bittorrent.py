"""ka-chaincast --method bittorrent on six netns nodes: a tracker and a seeder on the
frontend, aria2c on every node, real sshd, real bridges and shaped links."""

import io
import json
import os
import signal
import subprocess
import tarfile
import threading
import time

import pytest
from chaincast_support import (
    compress,
    make_tree,
    peak_memory,
    remote_tree_digest_command,
    tree_digest,
)
from deploy_support import kadeploy, on_frontend
from test_chaincast_multicast import netns_pids

from kabin.testbed.instance import Testbed

pytestmark = pytest.mark.testbed

NODES = [f"node-{i}" for i in range(1, 7)]
PADDING_MB, RING_MB = 40, 4


@pytest.fixture(scope="module")
def bed():
    if os.geteuid() != 0:
        pytest.skip("the testbed needs root")
    name = os.environ.get("KABIN_TESTBED_INSTANCE", "pytest") + "-bt"
    bed = Testbed(name).up(len(NODES), netns=True, link_rate="100mbit", boot_delay=1.0)
    yield bed
    if os.environ.get("KABIN_TESTBED_KEEP") != "1":
        bed.down()


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A small system-like tree and random data, larger than a relay's ring."""
    where = tmp_path_factory.mktemp("bt")
    root = where / "root"
    make_tree(root)
    (root / "padding").write_bytes(os.urandom(PADDING_MB << 20))
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w", format=tarfile.GNU_FORMAT) as archive:
        archive.add(root, arcname=".")
    path = where / "image.tar.zst"
    path.write_bytes(compress("zstd", data.getvalue()))
    return root, path


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

    def kill_node5_download_and_node3():
        deadline = time.monotonic() + 60
        while not killed.is_set() and time.monotonic() < deadline:
            for pid in netns_pids(bed, "node-5", "aria2c"):
                time.sleep(1.0)                   # mid-download: it has joined the swarm
                os.kill(int(pid), signal.SIGKILL)
                bed.power("node-3", "off")
                killed.set()
            time.sleep(0.1)

    killer = threading.Thread(target=kill_node5_download_and_node3, daemon=True)
    killer.start()
    try:
        out, done = chaincast(bed, path, "/tmp/bt2", stdin)
    finally:
        killer.join(70)
        bed.power("node-3", "on")
    assert killed.is_set()
    assert done.returncode == 1, done.stderr
    assert out["node-6"] == {"node": "node-6", "status": "ko", "error": "earlier", "step": "x"}
    assert out["node-3"]["status"] == "ko" and out["node-3"]["error"], out["node-3"]
    assert "repaired by unicast" in done.stderr
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
