"""Helpers shared by the ka-chaincast tests: images and tree digests."""

import bz2
import gzip
import hashlib
import io
import lzma
import os
import re
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import zstandard


def compress(kind, data):
    half = len(data) // 2
    if kind == "gzip":  # two members, as pigz or cat a.gz b.gz make
        return gzip.compress(data[:half]) + gzip.compress(data[half:])
    if kind == "bzip2":
        return bz2.compress(data[:half]) + bz2.compress(data[half:])
    if kind == "xz":
        return lzma.compress(data)
    if kind == "zstd":  # two frames
        cctx = zstandard.ZstdCompressor()
        return cctx.compress(data[:half]) + cctx.compress(data[half:])
    return data


def make_tree(root):
    """A small system-like tree: random and compressible files, links, modes."""
    (root / "usr/bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "usr/bin/big").write_bytes(os.urandom(3 << 20))
    (root / "usr/bin/zeros").write_bytes(bytes(2 << 20))
    (root / "usr/bin/tool").write_bytes(b"#!/bin/sh\necho tool\n")
    os.chmod(root / "usr/bin/tool", 0o4755)
    for i in range(50):
        (root / "etc" / f"conf{i}").write_text(f"setting {i}\n" * (i + 1))
    os.symlink("/usr/bin/tool", root / "etc/abs-link")
    os.symlink("../usr/bin/big", root / "etc/rel-link")
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-again")


def tree_digest(root):
    """One digest of names, types, modes, owners, link targets and contents under ``root``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*")):
        st = path.lstat()
        digest.update(f"{path.relative_to(root)} {st.st_mode:o} {st.st_uid} {st.st_gid}\n".encode())
        if path.is_symlink():
            digest.update(os.readlink(path).encode())
        elif path.is_file():
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def write_image(tmp_path, raw, compression, name="image"):
    path = tmp_path / f"{name}.{compression}"
    path.write_bytes(compress(compression, raw))
    return path


def remote_tree_digest_command(directory):
    """A shell command printing ``tree_digest(directory)`` on a node (its python3)."""
    import inspect
    import shlex

    code = ("import hashlib, os, sys\nfrom pathlib import Path\n"
            + inspect.getsource(tree_digest) + "print(tree_digest(Path(sys.argv[1])))\n")
    return f"python3 -c {shlex.quote(code)} {shlex.quote(directory)}"


def peak_memory(stderr):
    """node -> its agent's peak memory in MB, as ka-chaincast -v logs it."""
    return {m[1]: float(m[2]) for m in re.finditer(r"(node-\d+): received and written .*"
                                                   r"peak memory ([\d.]+) MB", stderr)}


def padded_tar_zst(where, padding_mb):
    """(root, image path): make_tree plus ``padding_mb`` MB of random data, as a tar.zst."""
    root = where / "root"
    make_tree(root)
    (root / "padding").write_bytes(os.urandom(padding_mb << 20))
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w", format=tarfile.GNU_FORMAT) as archive:
        archive.add(root, arcname=".")
    path = where / "image.tar.zst"
    path.write_bytes(compress("zstd", data.getvalue()))
    return root, path


def netns_pids(bed, node, name):
    """The pids of the processes called ``name`` in ``node``'s namespace."""
    netns = f"{bed.layout.netns_prefix}{node}"
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout
    return [pid for pid in pids.split() if _command_name(pid) == name]


def _command_name(pid):
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:     # it ended meanwhile
        return None


def kill_midstream(bed, receiver, program, victim, after, killed):
    """Once ``program`` runs on ``receiver`` (and ``after`` seconds more), kill it
    and power ``victim`` off; ``killed`` is set then. Gives up after 60 s."""
    deadline = time.monotonic() + 60
    while not killed.is_set() and time.monotonic() < deadline:
        for pid in netns_pids(bed, receiver, program):
            time.sleep(after)
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                continue
            bed.power(victim, "off")
            killed.set()
        time.sleep(0.1)


def netns_instance(suffix, count, link_rate="100mbit"):
    """A netns testbed instance of ``count`` nodes (a module fixture's body: yields it)."""
    import pytest

    from kabin.testbed.instance import Testbed

    if os.geteuid() != 0:
        pytest.skip("the testbed needs root")
    name = os.environ.get("KABIN_TESTBED_INSTANCE", "pytest") + "-" + suffix
    bed = Testbed(name).up(count, netns=True, link_rate=link_rate, boot_delay=1.0)
    yield bed
    if os.environ.get("KABIN_TESTBED_KEEP") != "1":
        bed.down()
