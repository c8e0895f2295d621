"""The environment library on a real SQLite database: owners, visibility, versions, checksums."""

import functools
import http.server
import threading

import pytest

from kabin import db, envdesc, envs
from kabin.envs import ChecksumMismatch, EnvironmentFileError, PermissionDenied
from kabin.errors import EnvironmentNotFound, UsageError


@pytest.fixture
def database(tmp_path):
    with db.Database(tmp_path / "state" / "kabin.db") as database:
        yield database


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "images" / "tiny.tgz"
    path.parent.mkdir()
    path.write_bytes(b"not really a tarball, but bytes to checksum\n" * 100)
    return path


def describe(image, name="tiny", version=1, visibility="private", **extra):
    return envdesc.normalize({"name": name, "version": version, "visibility": visibility,
                              "image": {"file": str(image), "kind": "tar",
                                        "compression": "gzip"},
                              "boot": {"kernel": "/vmlinuz"}, "filesystem": "ext4", **extra},
                             "test")


@pytest.fixture
def http_root(tmp_path):
    """A real HTTP server on 127.0.0.1 serving a directory."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def test_add_records_owner_and_checksums(database, image):
    env = envs.add(database, describe(image), "alice")
    assert (env.owner, env.visibility, env.version) == ("alice", "private", 1)
    [recorded] = env.files
    assert recorded.role == "image" and recorded.size == image.stat().st_size
    assert recorded.sha256 == envs.measure(str(image))[1]
    envs.verify(env)  # unchanged: fine


def test_same_name_version_owner_twice_is_refused(database, image):
    envs.add(database, describe(image), "alice")
    with pytest.raises(UsageError, match="tiny version 1 of alice already exists"):
        envs.add(database, describe(image), "alice")
    envs.add(database, describe(image), "bob")  # another owner: fine


def test_lookup_rules_for_three_users(database, image):
    envs.add(database, describe(image, "env-a", visibility="private"), "alice")
    envs.add(database, describe(image, "env-s", visibility="shared"), "alice")
    envs.add(database, describe(image, "env-p", visibility="public"), "root")
    envs.add(database, describe(image, "env-p", visibility="private"), "bob")

    # alice sees her own ones without naming herself
    assert envs.resolve(database, "env-a", "alice").owner == "alice"
    assert envs.resolve(database, "env-s", "alice").owner == "alice"
    # bob: alice's private one never, her shared one only when naming her
    with pytest.raises(EnvironmentNotFound, match="shared one needs its owner"):
        envs.resolve(database, "env-s", "bob")
    assert envs.resolve(database, "env-s", "bob", owner="alice").owner == "alice"
    with pytest.raises(EnvironmentNotFound):
        envs.resolve(database, "env-a", "bob", owner="alice")
    # public: anyone; but your own one of the same name comes first
    assert envs.resolve(database, "env-p", "alice").owner == "root"
    assert envs.resolve(database, "env-p", "bob").owner == "bob"
    assert envs.resolve(database, "env-p", "bob", owner="root").owner == "root"
    # the administrator sees everything when naming the owner
    assert envs.resolve(database, "env-a", "root", owner="alice").name == "env-a"

    listed = {(e.name, e.owner) for e in envs.list_environments(database, "bob")}
    assert listed == {("env-p", "root"), ("env-p", "bob")}
    listed = {e.name for e in envs.list_environments(database, "bob", owner="alice")}
    assert listed == {"env-s"}
    listed = {e.name for e in envs.list_environments(database, "alice", pattern="env-[as]")}
    assert listed == {"env-a", "env-s"}


def test_versions_latest_by_default(database, image):
    for version in (1, 3, 2):
        envs.add(database, describe(image, version=version), "alice")
    assert envs.resolve(database, "tiny", "alice").version == 3
    assert envs.resolve(database, "tiny@2", "alice").version == 2
    assert envs.resolve(database, "tiny", "alice", version=1).version == 1
    with pytest.raises(EnvironmentNotFound, match="tiny version 7"):
        envs.resolve(database, "tiny@7", "alice")
    with pytest.raises(UsageError, match="conflicts"):
        envs.resolve(database, "tiny@2", "alice", version=3)
    with pytest.raises(UsageError, match="NAME@VERSION"):
        envs.resolve(database, "tiny@latest", "alice")
    assert [e.version for e in envs.list_environments(database, "alice")] == [3]
    assert [e.version for e in envs.list_environments(database, "alice", all_versions=True)] \
        == [1, 2, 3]
    [gone] = envs.delete(database, "alice", "tiny")  # the latest
    assert gone.version == 3
    assert envs.resolve(database, "tiny", "alice").version == 2
    assert len(envs.delete(database, "alice", "tiny", all_versions=True)) == 2
    assert envs.list_environments(database, "alice", all_versions=True) == []


def test_rights(database, image):
    with pytest.raises(PermissionDenied, match="only the administrator"):
        envs.add(database, describe(image, visibility="public"), "alice")
    envs.add(database, describe(image), "alice")
    with pytest.raises(PermissionDenied, match="only the administrator"):
        envs.set_visibility(database, "alice", "tiny", "public")
    with pytest.raises(PermissionDenied, match="only alice or the administrator"):
        envs.delete(database, "bob", "tiny", owner="alice")
    with pytest.raises(PermissionDenied):
        envs.move_files(database, "alice", "/", "/x/")
    assert envs.set_visibility(database, "alice", "tiny", "shared").visibility == "shared"
    assert envs.set_visibility(database, "root", "tiny", "public", owner="alice").visibility \
        == "public"
    env = envs.toggle_destructive(database, "alice", "tiny")
    assert env.destructive and env.description["destructive"] is True
    assert not envs.toggle_destructive(database, "root", "tiny", owner="alice").destructive
    assert "visibility: public" in envs.resolve(database, "tiny", "bob").to_yaml()


def test_checksum_mismatch_names_the_file_and_the_fix(database, image):
    envs.add(database, describe(image), "alice")
    image.write_bytes(b"changed behind our back")
    env = envs.resolve(database, "tiny", "alice")
    with pytest.raises(ChecksumMismatch) as info:
        envs.verify(env)
    message = str(info.value)
    assert str(image) in message
    assert "ka-env update-checksums tiny --version 1 -u alice" in message
    envs.update_checksums(database, "alice", "tiny")
    envs.verify(envs.resolve(database, "tiny", "alice"))
    image.unlink()
    with pytest.raises(EnvironmentFileError, match="cannot read"):
        envs.verify(envs.resolve(database, "tiny", "alice"))


def test_http_files_are_checksummed_and_verified(database, http_root):
    root, url = http_root
    (root / "tiny.tgz").write_bytes(b"served over http\n" * 1000)
    (root / "post.tgz").write_bytes(b"postinstall\n")
    desc = describe(f"{url}/tiny.tgz",
                    postinstalls=[{"archive": f"{url}/post.tgz", "compression": "gzip",
                                   "script": "run.sh"}])
    env = envs.add(database, desc, "alice")
    assert {f.role: f.size for f in env.files} == {"image": 17000, "postinstalls[0]": 12}
    envs.verify(env)
    with envs.open_file(env.image_file) as stream:
        assert stream.read(6) == b"served"
    (root / "post.tgz").write_bytes(b"another postinstall\n")
    with pytest.raises(ChecksumMismatch, match=r"postinstalls\[0\] file http://127.0.0.1"):
        envs.verify(env)
    with pytest.raises(EnvironmentFileError, match="HTTP 404"):
        envs.add(database, describe(f"{url}/missing.tgz", name="other"), "alice")
    assert [e.name for e in envs.list_environments(database, "alice")] == ["tiny"]


def test_a_missing_file_stores_nothing(database, tmp_path):
    with pytest.raises(EnvironmentFileError, match="No such file"):
        envs.add(database, describe(tmp_path / "nope.tgz"), "alice")
    assert database.query("SELECT COUNT(*) FROM environments")[0][0] == 0


def test_an_invalid_description_file_stores_nothing(database, tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("name: x\nimage: {file: /x, kind: zip, compression: gzip}\n")
    with pytest.raises(envdesc.InvalidDescription, match="image.kind"):
        envs.add_file(database, bad, "alice")
    assert database.query("SELECT COUNT(*) FROM environments")[0][0] == 0


def test_move_files_rewrites_prefixes(database, image, tmp_path):
    envs.add(database, describe(image), "alice")
    new_dir = tmp_path / "moved"
    image.parent.rename(new_dir)
    [moved] = envs.move_files(database, "root", str(image.parent) + "/", str(new_dir) + "/")
    assert moved.image_file == str(new_dir / "tiny.tgz")
    assert moved.files[0].location == moved.image_file
    envs.verify(envs.resolve(database, "tiny", "alice"))  # same bytes: checksums still hold


def test_several_public_owners_of_one_name_is_ambiguous(database, image):
    envs.add(database, describe(image, "pub", visibility="public"), "root")
    database.conn.execute("UPDATE environments SET owner = 'ops'")
    envs.add(database, describe(image, "pub", visibility="public"), "root")
    with pytest.raises(UsageError, match="several owners"):
        envs.resolve(database, "pub", "alice")
    assert envs.resolve(database, "pub", "alice", owner="ops").owner == "ops"


def test_anonymous_environment_from_a_file(tmp_path, image):
    path = tmp_path / "anon.yml"
    path.write_text(envdesc.dump(describe(image, "anon")))
    env = envs.from_file(path, "alice")
    assert (env.id, env.owner, env.image_file, env.kernel) == (None, "alice", str(image),
                                                               "/vmlinuz")
    envs.verify(env)  # nothing recorded: nothing to compare


def test_schema_version_and_refusal_of_newer_databases(tmp_path):
    path = tmp_path / "k.db"
    with db.Database(path) as first:
        assert first.query("PRAGMA user_version")[0][0] == db.SCHEMA_VERSION
        assert first.query("PRAGMA journal_mode")[0][0] == "wal"
        first.conn.execute(f"PRAGMA user_version = {db.SCHEMA_VERSION + 1}")
    with pytest.raises(db.DatabaseError, match="newer than this kabin"):
        db.Database(path)


def test_a_failed_transaction_leaves_the_database_as_it_was(database, image):
    envs.add(database, describe(image), "alice")
    with pytest.raises(RuntimeError):
        with database.transaction() as conn:
            conn.execute("DELETE FROM environments")
            raise RuntimeError("boom")
    assert envs.resolve(database, "tiny", "alice").name == "tiny"


def test_an_older_database_is_migrated_and_keeps_its_data(tmp_path, image, monkeypatch):
    path = tmp_path / "k.db"
    with db.Database(path) as old:
        envs.add(old, describe(image), "alice")
    # the next kabin ships one more migration (our own module constants: no mock involved)
    monkeypatch.setattr(db, "MIGRATIONS", db.MIGRATIONS + (
        "ALTER TABLE environments ADD COLUMN note TEXT;\n"
        "UPDATE environments SET note = 'migrated';",))
    monkeypatch.setattr(db, "SCHEMA_VERSION", len(db.MIGRATIONS))
    with db.Database(path) as new:
        assert new.query("PRAGMA user_version")[0][0] == db.SCHEMA_VERSION
        assert new.query("SELECT name, note FROM environments")[0][:] == ("tiny", "migrated")
        assert envs.resolve(new, "tiny", "alice").files[0].size == image.stat().st_size
