"""The deployment log (Kadeploy3's kastat3) and the node states (kanodes3).

The log keeps one run per node per deployment (or reboot, or power operation),
read from the final records of a pipeline. Fields read from a record:

=============  =============================================================
``node``       the node (required)
``status``     ``ok`` or ``ko``: the run's success
``error``      why it is KO
``history``    the steps: ``{step, status, time, error?}``, plus for kadeploy's
               macro-steps ``variant`` (e.g. Untrusted), ``retries`` (retries
               done) and ``timeout`` (seconds allowed); all stored per step
``deployment`` the deployment id (else ``--deployment``, else one generated
               per ``ka-stats record`` run)
``operation``  ``deploy``, ``reboot`` or ``power`` (else ``--operation``)
``env``        the environment, ``NAME@VERSION`` (else ``--env``)
``user``       who ran it (else the calling user)
``start``      Unix time the run started (else now - duration)
``duration``   seconds (else the sum of the history's times, else ``time``)
=============  =============================================================

Node states (for kadeploy, which refuses nodes another live run holds):
``hold_nodes`` marks nodes deploying / rebooting / powering atomically and
returns those it refused; ``mark_final`` sets deployed / deploy_failed (...);
``mark_aborted``. A hold remembers its process (pid, host, boot id and process
start time), so the hold of a run that died is stale and never blocks. A hold
taken on another host cannot be checked from here: it counts as live (--force).
``store`` (what ``ka-stats record`` calls) also sets the final states.
"""

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime

from .errors import UsageError
from .records import is_ok

OPERATIONS = ("deploy", "reboot", "power")
# operation -> (in progress, succeeded, failed)
STATES = {"deploy": ("deploying", "deployed", "deploy_failed"),
          "reboot": ("rebooting", "rebooted", "reboot_failed"),
          "power": ("powering", "powered", "power_failed")}
ABORTED = "aborted"
IN_PROGRESS = {states[0]: op for op, states in STATES.items()}
RUN_FIELDS = ("deployment", "node", "operation", "user", "env", "start", "duration", "success",
              "error", "retries", "steps")
DEFAULT_RUN_FIELDS = RUN_FIELDS[:9]
SORTABLE = RUN_FIELDS[:9]
_STEP_FIELDS = ("step", "variant", "status", "time", "retries", "timeout", "error")


def new_deployment_id():
    return "D-" + uuid.uuid4().hex[:12]


# ---------------------------------------------------------------- records -> runs

def _number(record, key):
    value = record.get(key)
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    raise UsageError(f"record of {record['node']}: field '{key}' must be a number, not {value!r}")


def _text(record, key, default=None):
    value = record.get(key, default)
    if value is None or isinstance(value, str):
        return value
    raise UsageError(f"record of {record['node']}: field '{key}' must be a string, not {value!r}")


def _step(entry, node, seq):
    if not isinstance(entry, dict):
        raise UsageError(f"record of {node}: history entry {seq} is not an object")
    step = {key: entry.get(key) for key in _STEP_FIELDS}
    step["step"] = str(step["step"] or "?")
    step["status"] = str(step["status"] or "ok")
    for key in ("time", "timeout", "retries"):
        value = step[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UsageError(f"record of {node}: history entry {seq}: '{key}' must be a number")
    return step


def run_of(record, defaults=None, now=None):
    """The log entry of one final record (see the module docstring for the fields)."""
    defaults = defaults or {}
    node = record["node"]
    operation = _text(record, "operation") or defaults.get("operation") or "deploy"
    if operation not in OPERATIONS:
        raise UsageError(f"record of {node}: operation must be one of {', '.join(OPERATIONS)}, "
                         f"not {operation!r}")
    steps = [_step(e, node, i) for i, e in enumerate(record.get("history") or [])]
    duration = _number(record, "duration")
    if duration is None and any(s["time"] is not None for s in steps):
        duration = round(sum(s["time"] or 0 for s in steps), 3)
    if duration is None:
        duration = _number(record, "time")
    start = _number(record, "start")
    if start is None:
        start = (now or time.time()) - (duration or 0)
    success = is_ok(record)
    return {"deployment": _text(record, "deployment") or defaults.get("deployment"),
            "node": node, "operation": operation,
            "user": _text(record, "user") or defaults.get("user"),
            "env": _text(record, "env") or defaults.get("env"),
            "start": start, "duration": duration, "success": success,
            "error": None if success else str(record.get("error") or "failed"),
            "record": record, "steps": steps}


@dataclass(frozen=True)
class Options:
    """``ka-stats record``: what records that lack them get (``to_argv()`` renders it)."""

    deployment: str | None = None
    operation: str = "deploy"
    env: str | None = None

    def to_argv(self):
        argv = ["ka-stats", "record"]
        argv += [f"--deployment={self.deployment}"] if self.deployment else []
        argv += [f"--operation={self.operation}"] if self.operation != "deploy" else []
        return argv + ([f"--env={self.env}"] if self.env else [])


def run(config, items, options=Options(), stop=None):
    """Pass ``items`` on unchanged, then store them in the log (``store``); a consumer
    that stops early (a closed pipe) still gets every record logged."""
    received = []
    try:
        for item in items:
            received.append(item)
            yield item
    except GeneratorExit:
        received.extend(items)
        _store(config, received, options)
        raise
    _store(config, received, options)


def _store(config, received, options):
    from . import db as db_mod

    defaults = {"deployment": options.deployment, "operation": options.operation,
                "env": options.env}
    with db_mod.open_database(config) as database:
        store(database, received, defaults)


def store(db, records, defaults=None, now=None):
    """Log the final records in one transaction and set the nodes' final states.

    ``defaults`` gives ``deployment``, ``operation``, ``user`` and ``env`` for
    records that lack them (default: a new deployment id, the calling user).
    """
    defaults = dict(defaults or {})
    defaults["deployment"] = defaults.get("deployment") or new_deployment_id()
    if not defaults.get("user"):
        from .envs import current_user  # the environment library is not needed otherwise

        defaults["user"] = current_user()
    runs = [run_of(r, defaults, now) for r in records]
    with db.transaction() as conn:
        for run in runs:
            _insert_run(conn, run)
        for (deployment, operation), group in _by_deployment(runs).items():
            _set_final(conn, group, operation, deployment)
    return len(runs)


def _insert_run(conn, run):
    conn.execute("DELETE FROM runs WHERE deployment = ? AND node = ?",
                 (run["deployment"], run["node"]))
    run_id = conn.execute(
        "INSERT INTO runs (deployment, node, operation, user, env, start, duration, success, "
        "error, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (run["deployment"], run["node"], run["operation"], run["user"], run["env"], run["start"],
         run["duration"], int(run["success"]), run["error"],
         json.dumps(run["record"], separators=(",", ":")))).lastrowid
    conn.executemany(
        "INSERT INTO run_steps (run, seq, step, variant, status, time, retries, timeout, error) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(run_id, seq) + tuple(s[k] for k in _STEP_FIELDS) for seq, s in enumerate(run["steps"])])


def _by_deployment(runs):
    groups = {}
    for run in runs:
        groups.setdefault((run["deployment"], run["operation"]), []).append(run)
    return groups


# ---------------------------------------------------------------- queries

class Filters:
    """What ``list`` and ``failure-rate`` select."""

    def __init__(self, nodes=None, since=None, until=None, operations=(), deployment=None,
                 min_retries=None):
        self.nodes, self.since, self.until = nodes, since, until
        self.operations, self.deployment = tuple(operations), deployment
        self.min_retries = dict(min_retries or {})

    def sql(self):
        clauses, params = [], []
        if self.nodes is not None:
            clauses.append("node IN (SELECT value FROM json_each(?))")
            params.append(json.dumps(list(self.nodes)))
        for column, op, value in (("start", ">=", self.since), ("start", "<", self.until),
                                  ("deployment", "=", self.deployment)):
            if value is not None:
                clauses.append(f"{column} {op} ?")
                params.append(value)
        if self.operations:
            clauses.append(f"operation IN ({','.join('?' * len(self.operations))})")
            params.extend(self.operations)
        for step, minimum in self.min_retries.items():
            clauses.append("EXISTS (SELECT 1 FROM run_steps s WHERE s.run = runs.id "
                           "AND s.step = ? AND s.retries >= ?)")
            params.extend((step, minimum))
        return " AND ".join(clauses) or "1", params


def parse_time(text):
    """A date for --from/--to: ISO 8601 (local time unless an offset is given) or Unix time."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise UsageError(f"invalid date {text!r}: expected e.g. 2024-05-01, "
                         "2024-05-01T14:30, or Unix seconds") from None


def parse_min_retries(items):
    """``["BroadcastEnv=1", ...]`` -> ``{"BroadcastEnv": 1}``."""
    result = {}
    for item in items:
        step, _, number = item.partition("=")
        if not step or not number.isdigit():
            raise UsageError(f"invalid --min-retries {item!r}: expected STEP=N, "
                             "e.g. BroadcastEnv=1")
        result[step] = int(number)
    return result


def iso(timestamp):
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def list_runs(db, filters=None, sort=("start",), reverse=False, limit=None):
    """The log entries selected by ``filters``, as dicts with the fields of RUN_FIELDS."""
    where, params = (filters or Filters()).sql()
    for field in sort:
        if field not in SORTABLE:
            raise UsageError(f"cannot sort by {field!r}: use one of {', '.join(SORTABLE)}")
    direction = " DESC" if reverse else ""
    order = ", ".join(f"{f}{direction}" for f in (*sort, "id"))
    sql = f"SELECT * FROM runs WHERE {where} ORDER BY {order}"
    if limit is not None:
        sql, params = sql + " LIMIT ?", params + [limit]
    rows = db.query(sql, params)
    steps = _steps_of(db, [r["id"] for r in rows])
    return [_run_row(r, steps.get(r["id"], [])) for r in rows]


def _steps_of(db, run_ids):
    steps = {}
    if not run_ids:
        return steps
    for row in db.query("SELECT * FROM run_steps WHERE run IN (SELECT value FROM json_each(?)) "
                        "ORDER BY run, seq", [json.dumps(run_ids)]):
        step = {k: row[k] for k in _STEP_FIELDS if row[k] is not None}
        steps.setdefault(row["run"], []).append(step)
    return steps


def _run_row(row, steps):
    out = {key: row[key] for key in DEFAULT_RUN_FIELDS}
    out["start"] = iso(row["start"])
    out["success"] = bool(row["success"])
    out["retries"] = sum(s.get("retries", 0) for s in steps)
    out["steps"] = steps
    return out


def show(db, deployment):
    """Every node of one deployment."""
    runs = list_runs(db, Filters(deployment=deployment), sort=("node",))
    if not runs:
        raise UsageError(f"no deployment {deployment!r} in the log")
    return runs


def failure_rates(db, filters=None, min_rate=None):
    """Per node: runs, successes, failures and rate = 1 - successes / total, worst first."""
    where, params = (filters or Filters()).sql()
    rows = db.query(f"SELECT node, COUNT(*) AS total, SUM(success) AS successes FROM runs "
                    f"WHERE {where} GROUP BY node", params)
    rates = []
    for row in rows:
        rate = round(1 - row["successes"] / row["total"], 4)
        if min_rate is None or rate >= min_rate:
            rates.append({"node": row["node"], "total": row["total"],
                          "successes": row["successes"],
                          "failures": row["total"] - row["successes"], "rate": rate})
    return sorted(rates, key=lambda r: (-r["rate"], r["node"]))


def steps_text(steps):
    """A one-line summary of a run's steps, for tables and CSV."""
    parts = []
    for s in steps:
        name = f"{s['step']}:{s['variant']}" if s.get("variant") else s["step"]
        extra = [s.get("status", "")]
        if s.get("time") is not None:
            extra.append(f"{s['time']:g}s")
        if s.get("retries"):
            extra.append(f"retries={s['retries']}")
        parts.append(f"{name}({','.join(extra)})")
    return " ".join(parts)


# ---------------------------------------------------------------- node states

def _boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return "?"


def process_identity(pid):
    """``boot id:start time`` of a running process, None if it is gone (survives pid reuse)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            stat = handle.read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return f"{_boot_id()}:{fields[19]}"  # field 22 of proc(5): start time after boot


def _alive(row):
    """Is the run holding this node still there? (On another host: assume it is.)"""
    if row["state"] not in IN_PROGRESS or row["holder_pid"] is None:
        return False
    if row["holder_host"] != socket.gethostname():
        return True
    return process_identity(row["holder_pid"]) == row["holder_start"]


def _states(conn, nodes):
    rows = conn.execute("SELECT * FROM node_states WHERE node IN "
                        "(SELECT value FROM json_each(?))", (json.dumps(list(nodes)),))
    return {row["node"]: row for row in rows}


def _refusal(row):
    verb = {"deploy": "deployed", "reboot": "rebooted",
            "power": "powered"}[IN_PROGRESS[row["state"]]]
    return (f"being {verb} by {row['user']} (deployment {row['deployment']}, pid "
            f"{row['holder_pid']} on {row['holder_host']}, since {iso(row['since'])}); "
            "use --force to take it over")


def _upsert(conn, node, state, deployment, user, env, holder=(None, None, None)):
    conn.execute(
        "INSERT INTO node_states (node, state, deployment, user, env, since, holder_pid, "
        "holder_host, holder_start) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (node) DO "
        "UPDATE SET state = excluded.state, deployment = excluded.deployment, user = "
        "excluded.user, env = excluded.env, since = excluded.since, holder_pid = "
        "excluded.holder_pid, holder_host = excluded.holder_host, holder_start = "
        "excluded.holder_start", (node, state, deployment, user, env, time.time(), *holder))


def refuse_held(config, items, step):
    """Pass ``items`` on; an OK record whose node another live run holds (kadeploy) comes
    out KO with the reason instead (what ka-reboot, ka-pxe set and ka-exec do without
    --force). The state is read for each record as it comes: the stream keeps flowing."""
    from . import db as db_mod
    from . import records

    with db_mod.open_database(config) as database:
        for record in items:
            if records.is_ok(record):
                rows = database.query("SELECT * FROM node_states WHERE node = ?",
                                      (record["node"],))
                if rows and _alive(rows[0]):
                    record = records.ko(record, step, f"{record['node']} is {_refusal(rows[0])}")
            yield record


def refuse_destructive(config, items, step):
    """Pass ``items`` on; an OK record whose node runs an environment marked destructive
    (per the node states: the last one deployed there) comes out KO (kareboot3 -c)."""
    from . import db as db_mod
    from . import records

    with db_mod.open_database(config) as database:
        for record in items:
            env = _deployed_env(database, record["node"]) if records.is_ok(record) else None
            if env and _is_destructive(database, env):
                record = records.ko(record, step, f"{record['node']} runs {env}, an environment "
                                                  "marked destructive (--check-destructive)")
            yield record


def _deployed_env(database, node):
    rows = database.query("SELECT env FROM node_states WHERE node = ? AND state = 'deployed'",
                          (node,))
    return rows[0]["env"] if rows else None


def _is_destructive(database, spec):
    name, _, version = spec.partition("@")
    rows = database.query("SELECT 1 FROM environments WHERE name = ? AND destructive = 1"
                          + (" AND version = ?" if version.isdigit() else ""),
                          (name, int(version)) if version.isdigit() else (name,))
    return bool(rows)


def hold_nodes(db, nodes, operation, deployment, user, env=None, force=False):
    """Mark ``nodes`` deploying/rebooting/powering for this process, atomically.

    Nodes another live run holds are left alone unless ``force``; returns them
    as ``{node: reason}``. The same ``deployment`` may hold its nodes again.
    """
    if operation not in OPERATIONS:
        raise ValueError(f"unknown operation {operation!r}")
    pid = os.getpid()
    holder = (pid, socket.gethostname(), process_identity(pid))
    refused = {}
    with db.transaction() as conn:
        current = _states(conn, nodes)
        for node in nodes:
            row = current.get(node)
            mine = row is not None and row["deployment"] == deployment
            if row is not None and not mine and not force and _alive(row):
                refused[node] = _refusal(row)
                continue
            node_env = env if env is not None or not mine else row["env"]
            _upsert(conn, node, STATES[operation][0], deployment, user, node_env, holder)
    return refused


def _set_final(conn, runs, operation, deployment):
    """Final states for ``runs``, except on nodes another live run holds meanwhile."""
    current = _states(conn, [r["node"] for r in runs])
    _, succeeded, failed = STATES[operation]
    for run in runs:
        row = current.get(run["node"])
        if row is not None and row["deployment"] != deployment and _alive(row):
            continue
        user = run["user"] or (row["user"] if row is not None else None)
        env = run["env"] or (row["env"] if row is not None else None)
        _upsert(conn, run["node"], succeeded if run["success"] else failed, deployment, user, env)


def mark_final(db, records, operation, deployment, user=None, env=None):
    """Set deployed / deploy_failed (rebooted / ..., powered / ...) from final records."""
    runs = [{"node": r["node"], "success": is_ok(r), "user": user,
             "env": env} for r in records]
    with db.transaction() as conn:
        _set_final(conn, runs, operation, deployment)


def mark_aborted(db, nodes, deployment):
    """The run was cancelled (Ctrl-C): its nodes become ``aborted``."""
    with db.transaction() as conn:
        current = _states(conn, nodes)
        for node in nodes:
            row = current.get(node)
            if row is None or row["deployment"] == deployment:
                _upsert(conn, node, ABORTED, deployment, row["user"] if row else None,
                        row["env"] if row else None)


def node_states(db, nodes=None):
    """The current state of each node (all known nodes, or ``nodes``)."""
    if nodes is None:
        rows = db.query("SELECT * FROM node_states ORDER BY node")
    else:
        rows = db.query("SELECT * FROM node_states WHERE node IN (SELECT value FROM json_each(?))"
                        " ORDER BY node", [json.dumps(list(nodes))])
    out = []
    for row in rows:
        held = row["state"] in IN_PROGRESS
        out.append({"node": row["node"], "state": row["state"], "user": row["user"],
                    "env": row["env"], "deployment": row["deployment"],
                    "since": iso(row["since"]),
                    "holder": f"{row['holder_pid']}@{row['holder_host']}" if held else None,
                    "stale": (not _alive(row)) if held else None})
    return out
