"""ka-chaincast --method multicast on six netns nodes: udpcast's sender on the frontend,
its receiver piped into each node's sink, real sshd, real bridges and shaped links."""

import io
import json
import os
import signal
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest
from chaincast_support import (
    compress,
    make_tree,
    peak_memory,
    remote_tree_digest_command,
    tree_digest,
)
from deploy_support import kadeploy, on_frontend

from kabin.testbed.instance import Testbed

pytestmark = pytest.mark.testbed

NODES = [f"node-{i}" for i in range(1, 7)]
PADDING_MB, RING_MB = 40, 4


@pytest.fixture(scope="module")
def bed():
    if os.geteuid() != 0:
        pytest.skip("the testbed needs root")
    name = os.environ.get("KABIN_TESTBED_INSTANCE", "pytest") + "-mcast"
    bed = Testbed(name).up(len(NODES), netns=True, link_rate="100mbit", boot_delay=1.0)
    yield bed
    if os.environ.get("KABIN_TESTBED_KEEP") != "1":
        bed.down()


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A small system-like tree and random data, larger than a relay's ring."""
    where = tmp_path_factory.mktemp("mcast")
    root = where / "root"
    make_tree(root)
    (root / "padding").write_bytes(os.urandom(PADDING_MB << 20))
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w", format=tarfile.GNU_FORMAT) as archive:
        archive.add(root, arcname=".")
    path = where / "image.tar.zst"
    path.write_bytes(compress("zstd", data.getvalue()))
    return root, path


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


def netns_pids(bed, node, name):
    """The pids of the processes called ``name`` in ``node``'s namespace."""
    netns = f"{bed.layout.netns_prefix}{node}"
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout
    return [pid for pid in pids.split()
            if Path(f"/proc/{pid}/comm").read_text().strip() == name]


def test_a_killed_node_is_ko_a_ko_record_passes_and_a_lost_receiver_is_repaired(bed, image):
    """node-3 is powered off mid-stream: KO. node-5's receiver is
    killed mid-stream: the source sends it the rest by unicast, from its offset: OK.
    node-6 comes in KO: its record passes through untouched, nothing is sent to it."""
    root, path = image
    stdin = "".join(json.dumps({"node": n, "status": "ok"}) + "\n" for n in NODES[:5])
    stdin += json.dumps({"node": "node-6", "status": "ko", "error": "earlier", "step": "x"}) + "\n"
    killed = threading.Event()

    def kill_node5_receiver_and_node3():
        deadline = time.monotonic() + 60
        while not killed.is_set() and time.monotonic() < deadline:
            for pid in netns_pids(bed, "node-5", "udp-receiver"):
                time.sleep(0.5)                   # mid-stream: it has joined and received
                os.kill(int(pid), signal.SIGKILL)
                bed.power("node-3", "off")
                killed.set()
            time.sleep(0.1)

    killer = threading.Thread(target=kill_node5_receiver_and_node3, daemon=True)
    killer.start()
    try:
        done = on_frontend(bed, "ka-chaincast", "--method", "multicast", "--image", str(path),
                           "--to", "/tmp/mcast2", "--stall-timeout", "10", "--format", "json",
                           "-v", input=stdin, text=True, timeout=300)
    finally:
        killer.join(70)
        bed.power("node-3", "on")
    assert killed.is_set()
    out = {r["node"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert done.returncode == 1, done.stderr
    assert out["node-6"] == {"node": "node-6", "status": "ko", "error": "earlier", "step": "x"}
    assert out["node-3"]["status"] == "ko" and out["node-3"]["error"], out["node-3"]
    assert "repaired by unicast" in done.stderr
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
