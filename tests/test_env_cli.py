"""ka-env as a user runs it: subprocesses, a temporary configuration, real Unix users.

Other users: the child process starts as root, loads kabin, then drops to the
user's uid and gid for good before running the command (the interpreter here
may live where other users cannot read it), so ka-env really runs as them.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from kabin import db

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
USERS = ("daemon", "nobody")  # present on every Debian system

RUN_AS = """
import os, pwd, sys
import difflib, tabulate, urllib.request  # imported lazily (by click, ka-env): load them as root
from kabin.cli import env
if sys.argv[1] != "root":
    user = pwd.getpwnam(sys.argv[1])
    os.setgroups([])
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)
env.main(sys.argv[2:])
"""


@pytest.fixture
def site():
    """A configuration and state directory every test user may use (pytest's tmp is 0700)."""
    base = Path(tempfile.mkdtemp(prefix="kabin-env-test-"))
    try:
        base.chmod(0o777)
        shutil.copytree(REPO / "etc" / "kadeploy", base / "cfg")
        server = base / "cfg" / "server.yml"
        server.write_text(server.read_text().replace("state_dir: /var/lib/kabin",
                                                     f"state_dir: {base / 'state'}"))
        (base / "state").mkdir(mode=0o777)
        (base / "state").chmod(0o777)
        with db.Database(base / "state" / "kabin.db"):
            pass
        (base / "state" / "kabin.db").chmod(0o666)  # the users of this site may all write
        image = base / "images" / "tiny.tgz"
        image.parent.mkdir()
        image.write_bytes(os.urandom(4096))
        image.chmod(0o644)
        image.parent.chmod(0o755)
        yield base
    finally:
        shutil.rmtree(base)


def ka_env(site, *args, user="root", check=None):
    env = {**os.environ, "KABIN_CONFIG": str(site / "cfg")}
    proc = subprocess.run([sys.executable, "-c", RUN_AS, user, *map(str, args)], cwd=site,
                          env=env, capture_output=True, text=True, timeout=60)
    if check is not None:
        assert proc.returncode == check, proc.stderr
    return proc


def describe(site, name="tiny", version=1, visibility="private"):
    path = site / f"{name}-{version}-{visibility}.yml"
    path.write_text(yaml.safe_dump({
        "name": name, "version": version, "visibility": visibility,
        "image": {"file": "images/tiny.tgz", "kind": "tar", "compression": "zstd"},
        "boot": {"kernel": "/boot/vmlinuz"}, "filesystem": "ext4"}))
    path.chmod(0o644)
    return path


def rows(proc):
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_add_list_show_round_trip(site):
    [added] = rows(ka_env(site, "add", describe(site), "--format", "json", check=0))
    assert added | {"description": ""} == {
        "name": "tiny", "version": 1, "owner": "root", "visibility": "private",
        "destructive": False, "kind": "tar", "compression": "zstd", "description": ""}
    shown = ka_env(site, "show", "tiny", check=0).stdout
    assert yaml.safe_load(shown)["image"]["file"] == str(site / "images" / "tiny.tgz")
    (site / "shown.yml").write_text(shown.replace("version: 1", "version: 2"))
    ka_env(site, "add", site / "shown.yml", check=0)
    assert [r["version"] for r in rows(ka_env(site, "list", "--all-versions", "--format",
                                              "json", check=0))] == [1, 2]
    table = ka_env(site, "list", "--format", "table", check=0).stdout
    assert "tiny" in table and "zstd" in table
    csv_text = ka_env(site, "list", "t*", "--format", "csv", check=0).stdout
    assert csv_text.splitlines()[0] == "name,version,owner,visibility,destructive,kind," \
                                       "compression,description"


def test_changes_and_deletion(site):
    ka_env(site, "add", describe(site), check=0)
    [row] = rows(ka_env(site, "set-visibility", "tiny", "public", check=0))
    assert row["visibility"] == "public"
    [row] = rows(ka_env(site, "toggle-destructive", "tiny@1", check=0))
    assert row["destructive"] is True
    [row] = rows(ka_env(site, "move-files", str(site / "images"), str(site / "moved"), check=0))
    (site / "images").rename(site / "moved")
    assert "moved/tiny.tgz" in ka_env(site, "show", "tiny", check=0).stdout
    ka_env(site, "verify", "tiny", check=0)
    ka_env(site, "delete", "tiny", check=0)
    proc = ka_env(site, "show", "tiny", check=3)
    assert "ka-env: error: no environment tiny visible to root" in proc.stderr


def test_invalid_description_is_a_usage_error_and_stores_nothing(site):
    bad = site / "bad.yml"
    bad.write_text("name: bad\nimage: {file: /x.tgz, kind: tar, compression: rar}\n")
    proc = ka_env(site, "add", bad, check=2)
    assert proc.stderr.strip() == (
        f"ka-env: error: {bad}: field 'image.compression': expected one of gzip, bzip2, xz, "
        "zstd, got 'rar'")
    assert proc.stdout == ""
    assert rows(ka_env(site, "list", "--format", "json", check=0)) == []


def test_checksum_mismatch_before_use(site):
    ka_env(site, "add", describe(site), check=0)
    (site / "images" / "tiny.tgz").write_bytes(b"tampered")
    proc = ka_env(site, "verify", "tiny", check=3)
    assert f"image file {site}/images/tiny.tgz of environment tiny" in proc.stderr
    assert "run: ka-env update-checksums tiny --version 1 -u root" in proc.stderr
    ka_env(site, "update-checksums", "tiny", "--version", "1", check=0)
    ka_env(site, "verify", "tiny", check=0)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_owners_are_the_calling_unix_users(site):
    alice, bob = USERS
    [row] = rows(ka_env(site, "add", describe(site, "mine"), user=alice, check=0))
    assert row["owner"] == alice
    ka_env(site, "add", describe(site, "ours", visibility="shared"), user=alice, check=0)
    proc = ka_env(site, "add", describe(site, "all", visibility="public"), user=alice, check=2)
    assert "only the administrator (root) may add a public environment" in proc.stderr
    ka_env(site, "add", describe(site, "all", visibility="public"), check=0)

    assert {r["name"] for r in rows(ka_env(site, "list", user=bob, check=0))} == {"all"}
    assert {r["name"] for r in rows(ka_env(site, "list", "-u", alice, user=bob, check=0))} \
        == {"ours"}
    ka_env(site, "show", "ours", user=bob, check=3)
    ka_env(site, "show", "ours", "-u", alice, user=bob, check=0)
    ka_env(site, "show", "mine", "-u", alice, user=bob, check=3)
    proc = ka_env(site, "delete", "ours", "-u", alice, user=bob, check=2)
    assert f"only {alice} or the administrator" in proc.stderr
    ka_env(site, "show", "mine", "-u", alice, check=0)  # root, the administrator
    ka_env(site, "delete", "mine", "-u", alice, check=0)
    assert {r["name"] for r in rows(ka_env(site, "list", user=alice, check=0))} == {"ours", "all"}
