"""Who may act on which nodes (Kadeploy's karights): rights stored in the database.

A right is (user, node, part): ``part`` is a partition number the user may
deploy to, or ``*`` for any. The administrator (root, not through sudo) needs
none and alone grants and revokes them. A user runs kabin through sudo (see
the README): the requesting user is ``SUDO_USER`` (``envs.current_user``).
The commands that change nodes check every node of their input before any
work (``check``): one node without a right refuses the whole run.
"""

import time

from . import envs, nodes
from .errors import RightsError, UsageError

ANY = "*"


def _part(part):
    if part is None or part == ANY:
        return ANY
    if not str(part).isdigit() or int(part) < 1:
        raise UsageError(f"--part: a partition number or '*', not {part!r}")
    return str(int(part))


def _admin_only(requester, what):
    if not envs.is_admin(requester):
        raise RightsError(f"only the administrator ({envs.ADMIN}) may {what} rights "
                          f"(you are {requester})")


def add(db, requester, user, names, part=None):
    """Grant ``user`` the nodes ``names`` (on partition ``part``, or any); how many were new."""
    _admin_only(requester, "grant")
    nodes.check_name(user)
    part, now = _part(part), time.time()
    with db.transaction() as conn:
        before = conn.total_changes
        conn.executemany("INSERT OR IGNORE INTO rights (user, node, part, granted) "
                         "VALUES (?, ?, ?, ?)", [(user, n, part, now) for n in names])
        return conn.total_changes - before


def delete(db, requester, user, names=None, part=None):
    """Revoke ``user``'s rights on ``names`` (all nodes if None; one part or all)."""
    _admin_only(requester, "revoke")
    where, params = "user = ?", [user]
    if names is not None:
        where += " AND node IN (SELECT value FROM json_each(?))"
        params.append(_json(names))
    if part is not None:
        where, params = where + " AND part = ?", params + [_part(part)]
    with db.transaction() as conn:
        return conn.execute(f"DELETE FROM rights WHERE {where}", params).rowcount


def listing(db, user=None, names=None):
    """The rights, as rows {user, node, part, granted}, by user then node."""
    where, params = "1", []
    if user:
        where, params = where + " AND user = ?", params + [user]
    if names is not None:
        where += " AND node IN (SELECT value FROM json_each(?))"
        params.append(_json(names))
    return [dict(row) for row in db.query(
        f"SELECT user, node, part, granted FROM rights WHERE {where} ORDER BY user, node, part",
        params)]


def check(db, user, names, part=None):
    """Raise RightsError naming the nodes ``user`` may not act on; the administrator may
    act on every node. ``part``: the partition acted on (None: any right will do), or a
    function of the node giving it."""
    if envs.is_admin(user) or not names:
        return
    granted = {}
    for row in listing(db, user, names):
        granted.setdefault(row["node"], set()).add(row["part"])
    part_of = part if callable(part) else (lambda node: part)
    refused = [n for n in names if not _allowed(granted.get(n, set()), _part(part_of(n)))]
    if refused:
        on = "" if part is None else " on the partition deployed to"
        raise RightsError(f"{user} has no right{on} on {nodes.fold(refused)} "
                          f"({len(refused)} of {len(names)} nodes): nothing was done "
                          "(ka-rights list; the administrator grants them)")


def _allowed(parts, wanted):
    return bool(parts) and (wanted == ANY or bool({wanted, ANY} & parts))


def _json(names):
    import json
    return json.dumps(list(names))
