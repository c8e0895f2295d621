"""Which node sends to which: topology order, chain and tree layouts, method choice.

A chain crosses each inter-switch link once per direction when the nodes of a
switch are consecutive: the order groups nodes by uplink, then by switch, then
by name (natural order: node-2 before node-10). Nodes on no known switch come
last, by name.
"""

import re

ORDERS = ("topology", "name", "input")
METHODS = ("chain", "tree", "multicast", "bittorrent")
TREE_FANOUT = 4

# What one relay hop costs the chain in bytes of transfer time: the data a relay
# holds before forwarding (one recv, up to 256 KB) plus a latency of ~1 ms at
# 1 Gbit/s (125 KB). A chain pays it once per node, a tree once per level.
HOP_COST = 384 * 1024

_DIGITS = re.compile(r"(\d+)")


def natural_key(name):
    """Sort key putting node-2 before node-10."""
    return [int(part) if part.isdigit() else part for part in _DIGITS.split(name)]


def order_nodes(names, how="topology", switch_of=None, uplink_of=None):
    """The nodes in broadcast order.

    ``switch_of(name)`` gives a node's switch (or None); ``uplink_of(switch)``
    the switch's uplink (or None). ``input`` keeps the given order.
    """
    if how not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}")
    names = list(names)
    if how == "input":
        return names
    if how == "name" or switch_of is None:
        return sorted(names, key=natural_key)
    uplink_of = uplink_of or (lambda switch: None)

    def key(name):
        switch = switch_of(name)
        if switch is None:
            return (1, [], [], natural_key(name))
        return (0, natural_key(uplink_of(switch) or ""), natural_key(switch), natural_key(name))

    return sorted(names, key=key)


def layout(ordered, fanout=1):
    """Children of each sender in a ``fanout``-ary tree over ``ordered`` (1 = a chain).

    The source is ``None``. Position 0 is the source, position p has the
    children p*fanout+1 .. p*fanout+fanout: with fanout 1 each node sends to
    the next one.
    """
    if fanout < 1:
        raise ValueError("fanout must be at least 1")
    slots = [None] + list(ordered)
    children = {name: [] for name in slots}
    for position in range(1, len(slots)):
        children[slots[(position - 1) // fanout]].append(slots[position])
    return children


def pick_method(size, count, fanout=TREE_FANOUT):
    """``chain`` for images, ``tree`` for small files, from the costs of both.

    Multicast and bittorrent are never picked: in ``bench/chaincast.py`` (netns,
    128 MB tar.zst) the chain was ahead of both at every N: T / floor 1.02, 1.05, 1.07
    at 2, 8, 16 nodes (100 Mbit/s) against 1.27, 1.27, 1.49 (multicast) and 1.24,
    1.52, 2.04 (bittorrent); at 32 nodes (40 Mbit/s, 2 CPUs running them all) 34.7 s
    against 36.0 s and a failed run. They are there for networks and churn the chain
    does not suit.

    A pipelined chain takes about (S + (N-1) h) / B, a pipelined tree about
    (f S + d h) / B, with h = HOP_COST and d = log_f(N) levels. The chain wins
    as soon as S > (N-1-d) h / (f-1): for 100 nodes, about 12 MB.
    """
    if count <= 2 or fanout < 2:
        return "chain"
    depth, reach = 0, 1
    while reach < count:
        depth, reach = depth + 1, reach * fanout
    return "chain" if size * (fanout - 1) >= (count - 1 - depth) * HOP_COST else "tree"
