"""The embedded SQLite database: environments, deployment log, node states.

One file (``server.database`` in the configuration), in WAL mode so readers
never wait for writers. Its schema version is SQLite's ``user_version``; the
migrations below bring any older file up to date, in one transaction, the
first time a newer kabin opens it.

Every write a command makes goes through ``Database.transaction()``: a single
``BEGIN IMMEDIATE ... COMMIT``, so a failure leaves the database as it was. The
write lock is taken at ``BEGIN``; a concurrent writer waits for it (the busy
timeout, 60 s by default) instead of failing, so several deployments recording
at once lose nothing.

Every user who adds environments or records runs writes this file directly:
give them write access to it and to its directory (WAL needs its -wal and -shm
files beside it), e.g. a group ``kadeploy`` with ``chmod 2775`` on the directory
and ``664`` on the file. The owner checks of ka-env are kabin's, not the file's.
"""

import contextlib
import logging
import os
import sqlite3
import threading
from pathlib import Path

from .errors import DatabaseError

log = logging.getLogger(__name__)

BUSY_TIMEOUT = 60.0

# Each entry upgrades the schema from version i to i + 1; never edit a shipped one.
MIGRATIONS = (
    """
    CREATE TABLE environments (
        id          INTEGER PRIMARY KEY,
        name        TEXT NOT NULL,
        version     INTEGER NOT NULL,
        owner       TEXT NOT NULL,
        visibility  TEXT NOT NULL CHECK (visibility IN ('private', 'shared', 'public')),
        destructive INTEGER NOT NULL DEFAULT 0,
        description TEXT NOT NULL,          -- the normalized description, JSON
        added       REAL NOT NULL,
        UNIQUE (name, version, owner)
    );
    CREATE TABLE environment_files (
        environment INTEGER NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
        role        TEXT NOT NULL,          -- image, preinstall, postinstalls[0], ...
        location    TEXT NOT NULL,          -- absolute path or http(s) URL
        size        INTEGER NOT NULL,
        sha256      TEXT NOT NULL,
        PRIMARY KEY (environment, role)
    );
    CREATE TABLE runs (                     -- one node in one deployment/reboot/power
        id          INTEGER PRIMARY KEY,
        deployment  TEXT NOT NULL,
        node        TEXT NOT NULL,
        operation   TEXT NOT NULL CHECK (operation IN ('deploy', 'reboot', 'power')),
        user        TEXT NOT NULL,
        env         TEXT,
        start       REAL NOT NULL,
        duration    REAL,
        success     INTEGER NOT NULL,
        error       TEXT,
        record      TEXT NOT NULL,          -- the final record as received, JSON
        UNIQUE (deployment, node)
    );
    CREATE INDEX runs_by_node ON runs (node, start);
    CREATE INDEX runs_by_start ON runs (start);
    CREATE TABLE run_steps (
        run         INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        seq         INTEGER NOT NULL,
        step        TEXT NOT NULL,
        variant     TEXT,
        status      TEXT NOT NULL,
        time        REAL,
        retries     INTEGER,
        timeout     REAL,
        error       TEXT,
        PRIMARY KEY (run, seq)
    );
    CREATE INDEX run_steps_by_step ON run_steps (step, retries);
    CREATE TABLE node_states (
        node        TEXT PRIMARY KEY,
        state       TEXT NOT NULL,
        deployment  TEXT,
        user        TEXT,
        env         TEXT,
        since       REAL NOT NULL,
        holder_pid  INTEGER,                -- the live run holding the node, if any
        holder_host TEXT,
        holder_start TEXT                   -- boot id + process start time: survives pid reuse
    );
    """,
    """
    CREATE TABLE rights (                   -- who may deploy what (ka-rights)
        user        TEXT NOT NULL,
        node        TEXT NOT NULL,
        part        TEXT NOT NULL,          -- a partition number, or '*': any
        granted     REAL NOT NULL,
        PRIMARY KEY (user, node, part)
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class Database:
    """One connection; thread-safe (calls are serialized by a lock)."""

    def __init__(self, path, timeout=BUSY_TIMEOUT):
        self.path = Path(path)
        self._lock = threading.RLock()
        self.conn = _connect(self.path, timeout)
        try:
            self._migrate()
        except BaseException:
            self.conn.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        with self._lock:
            self.conn.close()

    @contextlib.contextmanager
    def transaction(self):
        """``with db.transaction() as conn:`` one atomic write (all of it or nothing)."""
        with self._lock, self._errors():
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def query(self, sql, params=()):
        """All rows of a read-only query, as ``sqlite3.Row`` objects."""
        with self._lock, self._errors():
            return self.conn.execute(sql, params).fetchall()

    @contextlib.contextmanager
    def _errors(self):
        try:
            yield
        except sqlite3.Error as exc:
            raise _database_error(self.path, exc) from None

    def _migrate(self):
        version = self.query("PRAGMA user_version")[0][0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise DatabaseError(f"{self.path}: schema version {version} is newer than this "
                                f"kabin knows ({SCHEMA_VERSION}): upgrade kabin")
        with self.transaction() as conn:
            # read again under the write lock: another process may have migrated meanwhile
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for number in range(version, SCHEMA_VERSION):
                log.info("%s: migrating the schema to version %d", self.path, number + 1)
                for statement in _statements(MIGRATIONS[number]):
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _statements(script):
    """Split a migration script into statements (executescript would commit on its own)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending.strip()
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete SQL statement in a migration: {pending.strip()[:60]}")


def _connect(path, timeout):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatabaseError(f"cannot create the database directory {path.parent}: "
                            f"{exc.strerror}") from None
    try:
        conn = sqlite3.connect(path, timeout=timeout, isolation_level=None,
                               check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys = ON")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        conn.execute("PRAGMA synchronous = NORMAL")  # durable enough in WAL, much faster
    except sqlite3.Error as exc:
        raise _database_error(path, exc) from None
    if mode != "wal":
        log.warning("%s: journal mode is %s, not WAL (file system without shared memory?)",
                    path, mode)
    return conn


def _database_error(path, exc):
    text = str(exc)
    if "readonly" in text or "unable to open" in text:
        return DatabaseError(f"{path}: {text}: uid {os.getuid()} needs write access to the "
                             "database file and its directory")
    if "locked" in text or "busy" in text:
        return DatabaseError(f"{path}: {text}: another process held it for too long")
    return DatabaseError(f"{path}: {text}")


def open_database(config):
    """The database of a loaded configuration (``config.server.database``)."""
    return Database(config.server.database)
