"""ka-testbed mkenv: real busybox images (tar gz/xz/zstd, ext4 dd), described and registered."""

import gzip
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import zstandard

from kabin import db, envdesc, envs
from kabin.errors import UsageError
from kabin.testbed import mkenv

REPO = Path(__file__).resolve().parent.parent
NAMES = ("testenv-tgz", "testenv-txz", "testenv-tzst", "testenv-dd")
RUN = ("import sys\nfrom kabin.cli import common\nfrom kabin.cli.testbed_mkenv import "
       "mkenv_command\nsys.exit(common.run(mkenv_command, 'ka-testbed mkenv', sys.argv[1:]))")



def as_root(test):
    """mkenv runs as root (root-owned images, administrator's environments)."""
    return pytest.mark.testbed(pytest.mark.skipif(os.geteuid() != 0, reason="needs root")(test))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One mkenv run (through the command) with 1 MiB of padding, in a temporary state dir."""
    base = tmp_path_factory.mktemp("mkenv")
    shutil.copytree(REPO / "etc" / "kadeploy", base / "cfg")
    server = base / "cfg" / "server.yml"
    server.write_text(server.read_text().replace("state_dir: /var/lib/kabin",
                                                 f"state_dir: {base / 'state'}"))
    proc = subprocess.run([sys.executable, "-c", RUN, "--out", str(base / "envs"),
                           "--pad-size", "1M", "--format", "json"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "KABIN_CONFIG": str(base / "cfg")})
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    return base, base / "envs", rows


def tar_members(path):
    """``{name: (TarInfo, bytes or None)}`` of a tar.gz / tar.xz / tar.zst."""
    if path.name.endswith(".zst"):
        with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as plain, \
                tarfile.open(fileobj=plain, mode="r|") as tar:
            return {m.name: (m, tar.extractfile(m).read() if m.isfile() else None) for m in tar}
    with tarfile.open(path) as tar:
        return {m.name: (m, tar.extractfile(m).read() if m.isfile() else None) for m in tar}


@as_root
def test_images_and_descriptions_are_written_and_registered(built):
    base, out, rows = built
    assert [r["name"] for r in rows] == list(NAMES)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["testenv-tgz.tar.gz", "testenv-txz.tar.xz", "testenv-tzst.tar.zst",
         "testenv-dd.dd.gz"] + [f"{n}.yml" for n in NAMES])
    with db.Database(base / "state" / "kabin.db") as database:
        for name in NAMES:
            env = envs.resolve(database, name, "alice")  # public: anyone finds it
            assert (env.owner, env.visibility, env.kernel, env.initrd) == (
                "root", "public", "/boot/vmlinuz", "/boot/initrd.img")
            assert envdesc.load_file(out / f"{name}.yml") == env.description
            assert env.partition_type == 131 and env.filesystem == "ext4"
            envs.verify(env)
            assert env.file("image").size > 2**20  # the incompressible padding is there


@as_root
@pytest.mark.parametrize("name, suffix", [("testenv-tgz", ".tar.gz"), ("testenv-txz", ".tar.xz"),
                                          ("testenv-tzst", ".tar.zst")])
def test_tar_images_hold_a_root_owned_busybox_system(built, name, suffix):
    members = tar_members(built[1] / f"{name}{suffix}")
    assert all((m.uid, m.gid, m.uname, m.gname) == (0, 0, "root", "root")
               for m, _ in members.values())
    assert members["./bin/sh"][0].issym() and members["./bin/sh"][0].linkname == "/bin/busybox"
    assert members["./bin/busybox"][0].mode == 0o755
    assert members["./tmp"][0].mode == 0o1777 and members["./root"][0].mode == 0o700
    assert members["./etc/shadow"][0].mode == 0o600
    assert members["./etc/passwd"][1].startswith(b"root:x:0:0:root:/root:/bin/sh")
    assert f"VARIANT_ID={name}".encode() in members["./etc/os-release"][1]
    assert name.encode() in members["./boot/vmlinuz"][1]
    assert members["./boot/initrd.img"][1]
    assert len(members["./" + mkenv.PAD_FILE][1]) == 2**20


@as_root
def test_the_extracted_system_runs_its_shell(built, tmp_path):
    target = tmp_path / "root"
    target.mkdir()
    subprocess.run(["tar", "--zstd", "-xf", built[1] / "testenv-tzst.tar.zst", "-C", target],
                   check=True, timeout=60)
    out = subprocess.run(["chroot", target, "/bin/sh", "-c", ". /etc/os-release; echo $ID; "
                          "ls /usr/bin/env"], capture_output=True, text=True, check=True,
                         timeout=60).stdout.split()
    assert out == ["kabin-testenv", "/usr/bin/env"]


@as_root
def test_the_dd_image_is_a_clean_ext4_file_system(built, tmp_path):
    raw = tmp_path / "image.ext4"
    with gzip.open(built[1] / "testenv-dd.dd.gz") as source, open(raw, "wb") as target:
        shutil.copyfileobj(source, target)
    subprocess.run(["e2fsck", "-fn", raw], check=True, capture_output=True, timeout=60)

    def debugfs(request):
        return subprocess.run(["debugfs", "-R", request, raw], capture_output=True, text=True,
                              check=True, timeout=60).stdout

    assert "VARIANT_ID=testenv-dd" in debugfs("cat /etc/os-release")
    assert "testenv-dd" in debugfs("cat /boot/vmlinuz")
    busybox = debugfs("stat /bin/busybox")
    assert "User:     0   Group:     0" in busybox and "Mode:  0755" in busybox
    assert "Fast link dest: \"/bin/busybox\"" in debugfs("stat /bin/sh")


@as_root
def test_a_second_run_replaces_the_environments(tmp_path):
    with db.Database(tmp_path / "k.db") as database:
        first = mkenv.mkenv(database, tmp_path / "envs")
        second = mkenv.mkenv(database, tmp_path / "envs")
        assert [e.name for e in second] == list(NAMES)
        assert {e.id for e in first}.isdisjoint(e.id for e in second)
        assert len(envs.list_environments(database, "root", all_versions=True)) == 4
        for env in second:
            envs.verify(env)
    assert not any(p.name.startswith(".") for p in (tmp_path / "envs").iterdir())


@as_root
def test_only_some_environments(tmp_path):
    with db.Database(tmp_path / "k.db") as database:
        made = mkenv.mkenv(database, tmp_path / "envs", only=["testenv-tzst"])
    assert [e.name for e in made] == ["testenv-tzst"]
    with pytest.raises(UsageError, match="unknown test environment testenv-rar"):
        mkenv.select(["testenv-rar"])


def test_tree_layout(tmp_path):
    root = mkenv.build_tree(tmp_path / "rootfs")
    assert (root / "bin/sh").readlink() == Path("/bin/busybox")
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    assert len([p for p in root.rglob("*") if p.is_symlink()]) > 100  # the applets
