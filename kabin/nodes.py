"""Node sets: ClusterShell's NodeSet behind one small interface.

Group resolution (``@group``) is off unless the caller asks for it, so a node
list never depends on the groups configured on the machine that reads it.
"""

import os
import re

from ClusterShell.NodeSet import RESOLVER_NOGROUP, NodeSet, NodeSetException

from .errors import UsageError

# Names must be safe to appear anywhere (file names, shell templates, logs).
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_NODESET_CHARS = re.compile(r"^[A-Za-z0-9._\-\[\],@:&^!]+$")
DEFAULT_MAX_NODES = 100_000   # a node set naming more is refused before it is expanded


def shown(text, limit=60):
    """``text`` quoted for an error message, cut to ``limit`` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} chars)"


def check_name(name):
    """Return ``name`` when it is a valid node name, else raise UsageError."""
    if not isinstance(name, str) or not _NODE_NAME.match(name) or len(name) > 253:
        raise UsageError(f"invalid node name {shown(str(name))}: use letters, digits, '.', '_' "
                         "and '-' (at most 253)")
    return name


def looks_like_nodeset(text):
    """True when ``text`` is written with node set characters only."""
    return bool(_NODESET_CHARS.match(text))


def max_nodes():
    """The most nodes one node set may name: $KABIN_MAX_NODES, default DEFAULT_MAX_NODES."""
    text = os.environ.get("KABIN_MAX_NODES", "")
    try:
        return int(text) if text else DEFAULT_MAX_NODES
    except ValueError:
        raise UsageError(f"KABIN_MAX_NODES={text!r}: expected a number of nodes") from None


def size_bound(pattern):
    """An upper bound of the names ``pattern`` expands to, read from its text alone (no
    expansion): the sum over its operands of the product of their ranges' sizes."""
    total = 0
    for operand in re.split(r"[,&^!](?![^\[]*\])", pattern):
        count = 1
        for ranges in re.findall(r"\[([^\]]*)\]", operand):
            count *= sum(_range_size(item) for item in ranges.split(","))
        total += count
    return total


def _range_size(item):
    bounds, _, step = item.partition("/")
    first, _, last = bounds.partition("-")
    try:
        low, high = int(first), int(last or first)
        return max(0, (high - low) // max(1, int(step or 1)) + 1)
    except ValueError:
        return 1        # not a range: ClusterShell says what is wrong with it


def _nodeset(pattern, resolve_groups):
    limit = max_nodes()
    if size_bound(pattern) > limit:
        raise UsageError(f"node set {shown(pattern)} names {size_bound(pattern)} nodes, more than "
                         f"the limit of {limit} (KABIN_MAX_NODES)")
    if not resolve_groups and "@" in pattern:
        raise UsageError(f"invalid node set {shown(pattern)}: group resolution is off "
                         "(use --groups)")
    try:
        if resolve_groups:
            return NodeSet(pattern)
        return NodeSet(pattern, resolver=RESOLVER_NOGROUP)
    except NodeSetException as exc:
        raise UsageError(f"invalid node set {shown(pattern)}: {exc}") from None


def expand(pattern, resolve_groups=False):
    """Expand a node set such as ``node-[1-4,7]`` into a list of node names."""
    pattern = pattern.strip()
    if not pattern or not looks_like_nodeset(pattern):
        raise UsageError(f"invalid node set {shown(pattern)}")
    names = list(_nodeset(pattern, resolve_groups))
    for name in names:
        check_name(name)
    return names


def expand_values(value, count, what):
    """Expand a per-node value written once for ``count`` nodes.

    A string is a node-set-like pattern (``127.0.1.[1-8]``) expanded in order;
    a scalar is repeated; a list is taken as is. The length must match.
    """
    if value is None:
        return [None] * count
    if isinstance(value, str):
        values = list(_nodeset(value, False)) if "[" in value else [value]
    elif isinstance(value, list):
        values = value
    else:
        values = [value]
    if len(values) == 1 and count > 1 and not isinstance(value, list):
        values = values * count
    if len(values) != count:
        raise UsageError(f"{what}: {len(values)} values for {count} nodes")
    return values


def fold(names):
    """Fold node names into the shortest node set string (``n[1-3]``)."""
    names = list(names)
    if not names:
        return ""
    return str(NodeSet.fromlist(names, resolver=RESOLVER_NOGROUP))
