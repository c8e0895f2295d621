"""The environment library (Kadeploy3's kaenv3): stored descriptions, owners, versions.

An environment is a validated Kadeploy3 description (``kabin.envdesc``) stored
with its owner, version, visibility and the size + SHA-256 of every file it
names (image, preinstall, postinstalls), recorded when it is added.

Owners and rights: the owner of what a command adds is the calling Unix user
(``current_user()``); ``root`` is the administrator. Visibility ``private``
(the owner only), ``shared`` (anyone who names the owner), ``public`` (anyone;
set by the administrator only). Only the owner or the administrator changes or
deletes an environment.

Lookup (Kadeploy3's rules): without an owner, your own environments, then the
public ones; shared ones only when their owner is named; the latest version
unless one is asked for.

For the other commands (ka-pxe, ka-chaincast, kadeploy), ``--env NAME[@VERSION]``
with ``-u OWNER`` resolves through one function::

    from kabin import db, envs
    with db.open_database(config) as database:
        env = envs.resolve(database, "debian12@2", envs.current_user(), owner=None)
    envs.verify(env)        # before use: ChecksumMismatch names the file and the fix
    env.image_file, env.image_kind, env.image_compression   # what to broadcast
    env.kernel, env.initrd, env.kernel_params, env.filesystem, env.partition_type
    with envs.open_file(env.image_file) as stream: ...       # a local path or an http(s) URL
    envs.local_path(env.image_file)     # its path when local (also server:///x), else None

Everything else of the description (preinstall, postinstalls, options) is in
``env.description``, a dict with Kadeploy3's field names. ``kadeploy -a DESC.yml``
(an anonymous environment, not stored): ``envs.from_file(path, user)``. Errors:
``EnvironmentNotFound``, ``EnvironmentFileError`` / ``ChecksumMismatch`` (exit 3),
``envdesc.InvalidDescription`` / ``PermissionDenied`` (usage errors, exit 2).
"""

import fnmatch
import hashlib
import json
import logging
import os
import pwd
import time
from dataclasses import dataclass

from . import envdesc
from .errors import EXIT_CONFIG, EnvironmentNotFound, KabinError, UsageError

log = logging.getLogger(__name__)
progress = logging.getLogger("kabin.progress")

ADMIN = "root"
FETCH_TIMEOUT = 30.0
_CHUNK = 1 << 20


class EnvironmentFileError(KabinError):
    """A file an environment names cannot be read."""

    exit_code = EXIT_CONFIG


class ChecksumMismatch(EnvironmentFileError):
    """A file no longer matches the checksum recorded when its environment was added."""


class PermissionDenied(UsageError):
    pass


def current_user():
    """The requesting user: the one sudo ran kabin for ($SUDO_USER, when root runs it), else
    the calling Unix user (real uid). It owns what it adds; root without sudo is the admin."""
    uid = os.getuid()
    if uid == 0 and os.environ.get("SUDO_USER"):
        return os.environ["SUDO_USER"]
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def is_admin(user):
    return user == ADMIN


@dataclass(frozen=True)
class EnvFile:
    role: str               # image, preinstall, postinstalls[i]
    location: str           # absolute path or http(s) URL
    size: int | None        # None: not recorded (anonymous environment)
    sha256: str | None


@dataclass(frozen=True)
class Environment:
    name: str
    version: int
    owner: str | None
    visibility: str
    destructive: bool
    description: dict       # the normalized Kadeploy3 description
    files: tuple = ()
    id: int | None = None

    @property
    def spec(self):
        return f"{self.name}@{self.version}"

    @property
    def label(self):
        owner = f", owner {self.owner}" if self.owner else ""
        return f"{self.name} (version {self.version}{owner})"

    image_file = property(lambda self: self.description["image"]["file"])
    image_kind = property(lambda self: self.description["image"]["kind"])
    image_compression = property(lambda self: self.description["image"]["compression"])
    kernel = property(lambda self: self.description.get("boot", {}).get("kernel"))
    initrd = property(lambda self: self.description.get("boot", {}).get("initrd"))
    kernel_params = property(lambda self: self.description.get("boot", {}).get("kernel_params", ""))
    filesystem = property(lambda self: self.description.get("filesystem"))
    partition_type = property(lambda self: self.description.get("partition_type"))
    os = property(lambda self: self.description["os"])

    def file(self, role="image"):
        """The recorded file of ``role`` (image, preinstall, postinstalls[i])."""
        return next(f for f in self.files if f.role == role)

    def to_yaml(self):
        return envdesc.dump(self.description)

    def summary(self):
        """The row ``ka-env list`` prints."""
        return {"name": self.name, "version": self.version, "owner": self.owner,
                "visibility": self.visibility, "destructive": self.destructive,
                "kind": self.image_kind, "compression": self.image_compression,
                "description": self.description.get("description", "")}


# ---------------------------------------------------------------- files

def open_file(location, timeout=FETCH_TIMEOUT):
    """A binary stream of a local file or an http(s) URL (a context manager)."""
    import urllib.error  # imported late: urllib.request costs 35 ms at start-up
    import urllib.request

    path = envdesc.local_path(location)
    try:
        if path is None:
            return urllib.request.urlopen(location, timeout=timeout)
        return open(path, "rb")
    except urllib.error.HTTPError as exc:
        raise EnvironmentFileError(f"cannot fetch {location}: HTTP {exc.code} {exc.reason}") \
            from None
    except urllib.error.URLError as exc:
        raise EnvironmentFileError(f"cannot fetch {location}: {exc.reason}") from None
    except OSError as exc:
        raise EnvironmentFileError(f"cannot read {location}: {exc.strerror or exc}") from None


local_path = envdesc.local_path


def measure(location, timeout=FETCH_TIMEOUT):
    """``(size, sha256 hex)`` of a file or URL, read as a stream."""
    digest, size = hashlib.sha256(), 0
    with open_file(location, timeout) as stream:
        try:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        except OSError as exc:  # includes socket timeouts in the middle of a download
            raise EnvironmentFileError(f"cannot read {location}: {exc}") from None
    return size, digest.hexdigest()


def _measure_all(desc):
    files = []
    for role, location in envdesc.file_locations(desc):
        progress.info("checksumming %s", location)
        size, sha = measure(location)
        files.append(EnvFile(role, location, size, sha))
    return tuple(files)


def verify(env):
    """Check every file of ``env`` against its recorded size and SHA-256."""
    for recorded in env.files:
        if recorded.sha256 is None:
            continue
        size, sha = measure(recorded.location)
        if (size, sha) != (recorded.size, recorded.sha256):
            owner = f" -u {env.owner}" if env.owner else ""
            raise ChecksumMismatch(
                f"{recorded.role} file {recorded.location} of environment {env.label} changed "
                f"since it was recorded ({size} bytes, sha256 {sha[:12]}..., recorded "
                f"{recorded.size} bytes, {recorded.sha256[:12]}...); if the change is "
                f"intended, run: ka-env update-checksums {env.name} --version {env.version}"
                f"{owner}")


# ---------------------------------------------------------------- reading the database

def _environment(row, files):
    return Environment(name=row["name"], version=row["version"], owner=row["owner"],
                       visibility=row["visibility"], destructive=bool(row["destructive"]),
                       description=json.loads(row["description"]), id=row["id"],
                       files=tuple(EnvFile(f["role"], f["location"], f["size"], f["sha256"])
                                   for f in files))


def _fetch(db, where="1", params=()):
    rows = db.query(f"SELECT * FROM environments WHERE {where} "
                    "ORDER BY name, owner, version", params)
    if not rows:
        return []
    files = {}
    for f in db.query("SELECT * FROM environment_files WHERE environment IN (SELECT value FROM "
                      "json_each(?)) ORDER BY environment, role",
                      [json.dumps([r["id"] for r in rows])]):
        files.setdefault(f["environment"], []).append(f)
    return [_environment(r, files.get(r["id"], [])) for r in rows]


def parse_spec(spec, version=None):
    """``NAME[@VERSION]`` (plus an optional separate version) -> ``(name, version or None)``."""
    name, _, text = spec.partition("@")
    spec_version = None
    if text:
        if not text.isdigit() or int(text) < 1:
            raise UsageError(f"invalid environment {spec!r}: expected NAME or NAME@VERSION "
                             "(a positive integer)")
        spec_version = int(text)
    if spec_version and version and spec_version != version:
        raise UsageError(f"environment {spec!r} conflicts with version {version}")
    if not name:
        raise UsageError(f"invalid environment {spec!r}: the name is empty")
    return name, version or spec_version


def _visible(env, user, owner_named):
    if env.owner == user or is_admin(user) or env.visibility == "public":
        return True
    return owner_named and env.visibility == "shared"


def _latest(candidates):
    return max(candidates, key=lambda e: e.version)


def resolve(db, spec, user, owner=None, version=None):
    """The environment ``spec`` (NAME or NAME@VERSION) names for ``user``.

    With ``owner``: that owner's environment if ``user`` may see it (private: the
    owner and the administrator; shared and public: anyone). Without: ``user``'s
    own, else a public one. The latest version unless ``version`` (or @VERSION).
    """
    name, version = parse_spec(spec, version)
    where, params = "name = ?", [name]
    if version:
        where, params = where + " AND version = ?", params + [version]
    if owner:
        found = [e for e in _fetch(db, where + " AND owner = ?", params + [owner])
                 if _visible(e, user, owner_named=True)]
    else:
        found = _fetch(db, where + " AND owner = ?", params + [user]) or \
            _fetch(db, where + " AND visibility = 'public'", params)
        owners = sorted({e.owner for e in found})
        if len(owners) > 1:
            raise UsageError(f"environment {spec} is public for several owners "
                             f"({', '.join(owners)}): name one with -u OWNER")
    if not found:
        raise EnvironmentNotFound(_not_found(name, version, user, owner))
    return _latest(found)


def _not_found(name, version, user, owner):
    what = f"{name} version {version}" if version else name
    if owner:
        return f"no environment {what} of {owner} visible to {user}"
    return (f"no environment {what} visible to {user} (own or public; a shared one needs "
            "its owner: -u OWNER)")


def get(db, name, owner, version=None):
    """``owner``'s environment ``name`` (latest version unless given), whatever its visibility."""
    where, params = "name = ? AND owner = ?", [name, owner]
    if version:
        where, params = where + " AND version = ?", params + [version]
    found = _fetch(db, where, params)
    if not found:
        what = f"{name} version {version}" if version else name
        raise EnvironmentNotFound(f"no environment {what} owned by {owner}")
    return _latest(found)


def list_environments(db, user, owner=None, pattern=None, all_versions=False):
    """What ``user`` may see: own and public ones, or ``owner``'s when named."""
    if owner:
        found = [e for e in _fetch(db, "owner = ?", [owner]) if _visible(e, user, True)]
    else:
        found = _fetch(db, "owner = ? OR visibility = 'public'", [user])
    if pattern:
        found = [e for e in found if fnmatch.fnmatchcase(e.name, pattern)]
    if not all_versions:
        latest = {}
        for env in found:
            key = (env.name, env.owner)
            if key not in latest or env.version > latest[key].version:
                latest[key] = env
        found = list(latest.values())
    return sorted(found, key=lambda e: (e.name, e.owner, e.version))


# ---------------------------------------------------------------- adding

def from_description(desc, owner=None):
    """An Environment (not stored, no checksums) from a normalized description."""
    files = tuple(EnvFile(role, loc, None, None) for role, loc in envdesc.file_locations(desc))
    return Environment(desc["name"], desc["version"], owner, desc["visibility"],
                       desc["destructive"], desc, files)


def from_file(path, user=None):
    """An anonymous environment (``kadeploy -a DESC.yml``): validated, not stored."""
    return from_description(envdesc.load_file(path), user)


def add(db, desc, user, replace=False):
    """Store a normalized description for ``user``, with the checksums of its files.

    An environment with the same name, version and owner is an error, unless
    ``replace`` (then it is replaced, in the same transaction).
    """
    return add_many(db, [desc], user, replace)[0]


def add_many(db, descriptions, user, replace=False):
    """Store several descriptions for ``user`` in one transaction (see ``add``)."""
    for desc in descriptions:
        if desc["visibility"] == "public" and not is_admin(user):
            raise PermissionDenied(f"only the administrator ({ADMIN}) may add a public "
                                   f"environment ({desc['name']}): make it shared or private")
        if not replace and db.query(_SAME, _key(desc, user)):  # early, before reading files
            raise _taken(desc, user)
    measured = [(desc, _measure_all(desc)) for desc in descriptions]
    with db.transaction() as conn:
        for desc, files in measured:
            if replace:
                conn.execute("DELETE FROM environments WHERE name = ? AND version = ? AND "
                             "owner = ?", _key(desc, user))
            elif conn.execute(_SAME, _key(desc, user)).fetchone():
                raise _taken(desc, user)
            env_id = conn.execute(
                "INSERT INTO environments (name, version, owner, visibility, destructive, "
                "description, added) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (desc["name"], desc["version"], user, desc["visibility"],
                 int(desc["destructive"]), json.dumps(desc), time.time())).lastrowid
            _store_files(conn, env_id, files)
    for desc in descriptions:
        log.info("added %s version %d for %s", desc["name"], desc["version"], user)
    return [get(db, d["name"], user, d["version"]) for d in descriptions]


_SAME = "SELECT 1 FROM environments WHERE name = ? AND version = ? AND owner = ?"


def _key(desc, user):
    return desc["name"], desc["version"], user


def _taken(desc, user):
    return UsageError(f"environment {desc['name']} version {desc['version']} of {user} "
                      "already exists: delete it first or raise its version")


def add_file(db, path, user):
    """``ka-env add DESC.yml``: validate, checksum and store."""
    return add(db, envdesc.load_file(path), user)


def _store_files(conn, env_id, files):
    conn.execute("DELETE FROM environment_files WHERE environment = ?", (env_id,))
    conn.executemany("INSERT INTO environment_files (environment, role, location, size, sha256) "
                     "VALUES (?, ?, ?, ?, ?)",
                     [(env_id, f.role, f.location, f.size, f.sha256) for f in files])


# ---------------------------------------------------------------- changing

def _owned(db, user, name, owner=None, version=None):
    """The environment ``user`` wants to change, if allowed (owner or administrator)."""
    owner = owner or user
    if owner != user and not is_admin(user):
        raise PermissionDenied(f"only {owner} or the administrator may change {owner}'s "
                               "environments")
    return get(db, name, owner, version)


def delete(db, user, name, owner=None, version=None, all_versions=False):
    """Delete the latest version (or ``version``, or all); returns what was deleted."""
    target = _owned(db, user, name, owner, version)
    doomed = _fetch(db, "name = ? AND owner = ?", [name, target.owner]) if all_versions \
        else [target]
    with db.transaction() as conn:
        conn.executemany("DELETE FROM environments WHERE id = ?", [(e.id,) for e in doomed])
    return doomed


def _update(db, env, **changes):
    """Store new visibility / destructive / description / files for ``env``; return it again."""
    desc = dict(changes.get("description", env.description))
    for key in ("visibility", "destructive"):
        if key in changes:
            desc[key] = changes[key]
    with db.transaction() as conn:
        conn.execute("UPDATE environments SET visibility = ?, destructive = ?, description = ? "
                     "WHERE id = ?", (desc["visibility"], int(desc["destructive"]),
                                      json.dumps(desc), env.id))
        if "files" in changes:
            _store_files(conn, env.id, changes["files"])
    return get(db, env.name, env.owner, env.version)


def set_visibility(db, user, name, visibility, owner=None, version=None):
    if visibility not in envdesc.VISIBILITIES:
        raise UsageError(f"invalid visibility {visibility!r}: expected one of "
                         f"{', '.join(envdesc.VISIBILITIES)}")
    if visibility == "public" and not is_admin(user):
        raise PermissionDenied(f"only the administrator ({ADMIN}) may make an environment public")
    return _update(db, _owned(db, user, name, owner, version), visibility=visibility)


def toggle_destructive(db, user, name, owner=None, version=None):
    env = _owned(db, user, name, owner, version)
    return _update(db, env, destructive=not env.destructive)


def update_checksums(db, user, name, owner=None, version=None):
    """Record the current size and SHA-256 of every file of the environment."""
    env = _owned(db, user, name, owner, version)
    return _update(db, env, files=_measure_all(env.description))


def move_files(db, user, old_prefix, new_prefix):
    """Rewrite file locations starting with ``old_prefix`` (administrator); returns the changed."""
    if not is_admin(user):
        raise PermissionDenied(f"only the administrator ({ADMIN}) may move files")
    if not old_prefix:
        raise UsageError("the old prefix is empty")
    changed = []
    with db.transaction() as conn:
        for env in _fetch(db, "1"):
            moved = {f.role: new_prefix + f.location[len(old_prefix):] for f in env.files
                     if f.location.startswith(old_prefix)}
            if not moved:
                continue
            desc = envdesc.with_locations(env.description, moved)
            conn.execute("UPDATE environments SET description = ? WHERE id = ?",
                         (json.dumps(desc), env.id))
            for role, location in moved.items():
                conn.execute("UPDATE environment_files SET location = ? WHERE environment = ? "
                             "AND role = ?", (location, env.id, role))
            changed.append(env)
    return [get(db, e.name, e.owner, e.version) for e in changed]
