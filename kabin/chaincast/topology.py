"""Who forwards to whom during a broadcast, and how it heals (Kascade's rules).

The source is ``SOURCE`` (None); every other sender is a node. When a node
dies or stalls, its parent adopts its children: each child then asks the
parent for the data from its own offset. When the parent no longer holds that
offset in its ring, the child is fed by the source directly.
"""

SOURCE = None
# Bytes in flight that a healthy receiver may leave unread: it reads by batches (agent.BATCH).
UNREAD_SLACK = 64 * 1024


class Topology:
    """The live tree of senders and receivers (a chain is a tree of fanout 1)."""

    def __init__(self, children):
        self.children = {sender: list(kids) for sender, kids in children.items()}
        self.children.setdefault(SOURCE, [])
        self.parent = {kid: sender for sender, kids in self.children.items() for kid in kids}

    def __contains__(self, node):
        return node in self.parent

    def remove(self, node):
        """Take ``node`` out; its parent adopts its children in its place. Returns the parent."""
        parent = self.parent.pop(node)
        kids = self.children.pop(node, [])
        siblings = self.children[parent]
        index = siblings.index(node)
        siblings[index:index + 1] = kids
        for kid in kids:
            self.parent[kid] = parent
        return parent

    def feed_from_source(self, node):
        """Put ``node`` under the source: its parent cannot serve its offset, or it had none
        (a multicast receiver to repair). Returns the old parent (SOURCE if none)."""
        old = self.parent.get(node, SOURCE)
        if node in self.parent:
            self.children[old].remove(node)
        self.children[SOURCE].append(node)
        self.parent[node] = SOURCE
        return old


def _forward_idle(state, child):
    entry = (state or {}).get("fwd", {}).get(child)
    return entry[1] if entry else 0.0


def stalled_nodes(topology, states, limit):
    """The nodes that hold the broadcast up, each with the reason: [(node, reason)].

    ``states`` maps each sender (SOURCE included) to its last report: ``recv``,
    ``recv_idle``, ``sink_idle`` and ``fwd`` {child: [offset, idle seconds]}.
    A node is stalled when its writes have made no progress for ``limit``
    seconds while data waited for them; or when its parent has had data for
    it that long without it taking any (we then follow blocked children down
    to the node that blocks without being blocked); or when bytes its parent
    sent have not arrived for twice that long (a dead link: reports are not
    taken at the same instant, so this rule waits until a silent parent has
    surely been found by its missing heartbeats).
    """
    found = {}
    for node in topology.parent:
        sink_idle = (states.get(node) or {}).get("sink_idle", 0.0)
        if sink_idle > limit:
            found[node] = _writes_stalled(sink_idle)
    for sender, kids in topology.children.items():
        if sender is not SOURCE and sender not in topology:
            continue
        for kid in kids:
            if _forward_idle(states.get(sender), kid) > limit:
                node, reason = _culprit(topology, states, kid, limit)
                found.setdefault(node, reason)
            elif _undelivered(states.get(sender), kid, states.get(kid), 2 * limit):
                found.setdefault(kid, f"stalled: data sent to it did not arrive for "
                                      f"{2 * limit:.0f} s")
    return list(found.items())


def _writes_stalled(seconds):
    return f"stalled: its writes made no progress for {seconds:.0f} s"


def _undelivered(sender_state, kid, kid_state, limit):
    entry = (sender_state or {}).get("fwd", {}).get(kid)
    if not entry or not kid_state or entry[0] is None:
        return False
    unread = entry[0] - kid_state.get("recv", 0)
    return unread > UNREAD_SLACK and kid_state.get("recv_idle", 0.0) > limit


def _culprit(topology, states, node, limit):
    while True:
        state = states.get(node)
        if state is None:
            return node, f"not responding for {limit:.0f} s"
        if state.get("sink_idle", 0.0) > limit / 2:
            return node, _writes_stalled(state["sink_idle"])
        blocked = [kid for kid in topology.children.get(node, [])
                   if _forward_idle(state, kid) > limit / 2]
        if not blocked:
            return node, f"stalled: took no data for {limit:.0f} s"
        node = blocked[0]
