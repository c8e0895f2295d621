"""ka-chaincast on the testbed: real sshd per node, agents sent over SSH, real disks.

Run as root: ``python -m pytest -m testbed tests/test_chaincast_testbed.py``.
"""

import hashlib
import io
import json
import os
import subprocess
import tarfile
import time

import pytest
from chaincast_support import (
    compress,
    make_tree,
    remote_tree_digest_command,
    tree_digest,
)

pytestmark = pytest.mark.testbed

NODES = "node-[1-8]"
ALL = [f"node-{i}" for i in range(1, 9)]


def chaincast(testbed, *args, stdin=None):
    """Run ka-chaincast; its records by node (and the finished process)."""
    done = subprocess.run(["ka-chaincast", "--stall-timeout", "5", *args], input=stdin, check=False,
                          capture_output=True, text=True, timeout=300, env=testbed.env)
    assert done.returncode in (0, 1), done.stderr
    out = [json.loads(line) for line in done.stdout.splitlines()]
    return {r["node"]: r for r in out}, done


def on_node(testbed, node, command):
    done = testbed.ssh(node, command)
    assert done.returncode == 0, (node, command, done.stderr)
    return done.stdout.strip()


@pytest.fixture(scope="module")
def tar_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb-source") / "root"
    make_tree(root)
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w", format=tarfile.GNU_FORMAT) as archive:
        archive.add(root, arcname=".")
    return root, data.getvalue()


def assert_ok(results, nodes, sha):
    for node in nodes:
        record = results[node]
        assert record["status"] == "ok", (node, record.get("error"))
        assert record["sha256"] == sha


@pytest.mark.parametrize("compression", ["gzip", "xz", "zstd"])
def test_tar_is_identical_on_8_nodes(testbed, tmp_path, tar_source, compression):
    root, raw = tar_source
    image = tmp_path / f"image.tar.{compression}"
    image.write_bytes(compress(compression, raw))
    dest = f"/mnt/dest/chaincast-{compression}"
    try:
        results, done = chaincast(testbed, "-m", NODES, "--image", str(image), "--to", dest)
        assert done.returncode == 0
        assert_ok(results, ALL, hashlib.sha256(image.read_bytes()).hexdigest())
        assert "8/8 nodes done" in done.stderr
        expected = tree_digest(root)
        for node in ALL:
            assert on_node(testbed, node, remote_tree_digest_command(dest)) == expected
    finally:
        for node in ALL:
            testbed.ssh(node, f"rm -rf {dest}")


def test_dd_to_the_deploy_partition(testbed, tmp_path):
    disk = os.urandom(2 << 20) + bytes(6 << 20)
    image = tmp_path / "disk.img.zst"
    image.write_bytes(compress("zstd", disk))
    results, done = chaincast(testbed, "-m", NODES, "--image", str(image), "--kind", "dd")
    assert done.returncode == 0
    assert_ok(results, ALL, hashlib.sha256(image.read_bytes()).hexdigest())
    expected = hashlib.sha256(disk).hexdigest()
    for node in ALL:  # the cluster's deploy partition: /dev/sda3
        got = on_node(testbed, node, f"head -c {len(disk)} /dev/sda3 | sha256sum")
        assert got.split()[0] == expected


def test_a_node_dying_mid_stream(testbed, tmp_path):
    disk = os.urandom(24 << 20)
    image = tmp_path / "disk.img"
    image.write_bytes(disk)
    testbed.fault("node-4", "die-after-bytes=8M")
    try:
        results, done = chaincast(testbed, "-m", NODES, "--image", str(image), "--kind", "dd",
                                  "--to", "/tmp/disk.img", "--max-rate", "8")
        assert done.returncode == 1
        assert results["node-4"]["status"] == "ko"
        assert "% of the image" in results["node-4"]["error"]
        others = [n for n in ALL if n != "node-4"]
        assert_ok(results, others, hashlib.sha256(disk).hexdigest())
        for node in others:
            assert on_node(testbed, node, "sha256sum /tmp/disk.img").split()[0] == \
                hashlib.sha256(disk).hexdigest()
    finally:
        testbed.clear("node-4")
        testbed.power("node-4", "cycle")
        testbed.wait_booted("node-4", "deploy")
        for node in ALL:
            testbed.ssh(node, "rm -f /tmp/disk.img")


def test_a_node_whose_reports_are_late_but_takes_data_is_not_failed(testbed, tmp_path):
    """node-3's sshd session is frozen: its reports stop while its agent keeps taking data
    (as when they share its saturated link with the data). It is alive: not failed."""
    disk = os.urandom(24 << 20)
    image = tmp_path / "disk.img"
    image.write_bytes(disk)
    session = "$(ps -o ppid= -p $(pgrep -f kabin-chaincast-agen[t]))"  # the agent's sshd
    proc = subprocess.Popen(["ka-chaincast", "--stall-timeout", "2", "-m", NODES, "--image",
                             str(image), "--kind", "dd", "--to", "/tmp/late.img",
                             "--max-rate", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=testbed.env)
    try:
        on_node(testbed, "node-3", "timeout 60 sh -c 'until [ $(stat -c %s /tmp/late.img "
                                   "2>/dev/null || echo 0) -gt 2000000 ]; do sleep 0.1; done'")
        on_node(testbed, "node-3", f"kill -STOP {session}")
        time.sleep(3 * 2 + 1)  # frozen for more than twice the stall timeout
        on_node(testbed, "node-3", f"kill -CONT {session}")
        out, err = proc.communicate(timeout=120)
    finally:
        testbed.ssh("node-3", f"kill -CONT {session}")
        proc.kill()
        for node in ALL:
            testbed.ssh(node, "rm -f /tmp/late.img")
    assert proc.returncode == 0, err
    results = {r["node"]: r for r in map(json.loads, out.splitlines())}
    assert_ok(results, ALL, hashlib.sha256(disk).hexdigest())


def test_a_full_disk_fails_that_node_with_the_reason(testbed, tmp_path, tar_source):
    image = tmp_path / "image.tar.gz"
    image.write_bytes(compress("gzip", tar_source[1]))
    on_node(testbed, "node-3", "mkfs.ext4 -q -F /dev/sda4 && mkdir -p /mnt/full && "
                               "mount /dev/sda4 /mnt/full")
    testbed.fault("node-3", "disk-full")
    try:
        results, done = chaincast(testbed, "-m", NODES, "--image", str(image),
                                  "--to", "/mnt/full/tree")
        assert done.returncode == 1
        assert results["node-3"]["status"] == "ko"
        assert "No space left on device" in results["node-3"]["error"]
        assert_ok(results, [n for n in ALL if n != "node-3"],
                  hashlib.sha256(image.read_bytes()).hexdigest())
    finally:
        testbed.clear("node-3")
        testbed.ssh("node-3", "umount /mnt/full")
        for node in ALL:
            testbed.ssh(node, "rm -rf /mnt/full")


def test_ko_records_pass_through(testbed, tmp_path, tar_source):
    image = tmp_path / "image.tar.gz"
    image.write_bytes(compress("gzip", tar_source[1]))
    failed = {"node": "node-2", "status": "ko", "error": "reboot failed", "step": "reboot"}
    stdin = "node-1\n" + json.dumps(failed) + "\n"
    try:
        results, done = chaincast(testbed, "--image", str(image), "--to", "/mnt/dest/ko",
                                  stdin=stdin)
        assert done.returncode == 1
        assert results["node-2"] == failed
        assert done.stdout.splitlines()[0] == json.dumps(failed, separators=(",", ":"))
        assert results["node-1"]["status"] == "ok"
    finally:
        testbed.ssh("node-1", "rm -rf /mnt/dest/ko")


def test_malicious_tar_members_do_not_escape(testbed, tmp_path):
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as archive:
        link = tarfile.TarInfo("sneaky")
        link.type, link.linkname = tarfile.SYMTYPE, "/root"
        archive.addfile(link)
        member = tarfile.TarInfo("sneaky/escaped-by-chaincast")
        member.size = 4
        archive.addfile(member, io.BytesIO(b"evil"))
    image = tmp_path / "evil.tar.gz"
    image.write_bytes(compress("gzip", data.getvalue()))
    try:
        results, done = chaincast(testbed, "-m", "node-[1-2]", "--image", str(image),
                                  "--to", "/mnt/dest/evil")
        assert done.returncode == 1
        for node in ("node-1", "node-2"):
            assert "through a link" in results[node]["error"]
            assert "escaped-by-chaincast" not in on_node(testbed, node, "ls /root")
    finally:
        for node in ("node-1", "node-2"):
            testbed.ssh(node, "rm -rf /mnt/dest/evil /root/escaped-by-chaincast")


def test_an_environment_by_name(testbed, tmp_path):
    """--env: the image of a registered environment (ka-testbed mkenv's testenv-tzst)."""
    made = subprocess.run(["ka-testbed", "mkenv", "--instance", testbed.instance,
                           "--only", "testenv-tzst", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=testbed.env,
                          check=False)
    assert made.returncode == 0, made.stderr
    try:
        results, done = chaincast(testbed, "-m", NODES, "--env", "testenv-tzst",
                                  "--to", "/mnt/dest/env")
        assert done.returncode == 0, done.stderr
        assert_ok(results, ALL, hashlib.sha256((tmp_path / "testenv-tzst.tar.zst")
                                               .read_bytes()).hexdigest())
        for node in ALL:
            assert "testenv-tzst" in on_node(testbed, node, "cat /mnt/dest/env/etc/os-release")
    finally:
        for node in ALL:
            testbed.ssh(node, "rm -rf /mnt/dest/env")
