"""Pure logic of ka-chaincast: ordering, layouts, method choice, repairs, stall culprits."""

import itertools

from kabin.chaincast import order
from kabin.chaincast.topology import SOURCE, Topology, stalled_nodes


def test_natural_name_order():
    assert order.order_nodes(["n-10", "n-2", "n-1"], "name") == ["n-1", "n-2", "n-10"]


def test_topology_groups_nodes_by_uplink_then_switch():
    switch = {"a-1": "sw2", "a-2": "sw1", "a-3": "sw2", "a-4": "sw1", "a-5": None, "a-6": "sw3"}
    uplink = {"sw1": "core", "sw2": "edge", "sw3": "core"}
    ordered = order.order_nodes(switch, "topology", switch.get, uplink.get)
    assert ordered == ["a-2", "a-4", "a-6", "a-1", "a-3", "a-5"]


def test_each_switch_is_entered_once_in_topology_order():
    switch = {f"n-{i}": f"sw{i % 3}" for i in range(1, 31)}
    ordered = order.order_nodes(reversed(list(switch)), "topology", switch.get)
    changes = sum(switch[a] != switch[b] for a, b in itertools.pairwise(ordered))
    assert changes == 2


def test_input_order_is_kept():
    assert order.order_nodes(["b", "a", "c"], "input", lambda n: "sw") == ["b", "a", "c"]


def test_chain_layout():
    assert order.layout(["a", "b", "c"]) == {SOURCE: ["a"], "a": ["b"], "b": ["c"], "c": []}


def test_tree_layout_reaches_every_node_once():
    names = [f"n-{i}" for i in range(1, 22)]
    children = order.layout(names, 4)
    assert children[SOURCE] == names[:4]
    assert all(len(kids) <= 4 for kids in children.values())
    reached = [kid for kids in children.values() for kid in kids]
    assert sorted(reached) == sorted(names)


def test_pick_method_chain_for_images_tree_for_small_files():
    assert order.pick_method(2 << 30, 100) == "chain"
    assert order.pick_method(64 << 10, 100) == "tree"
    assert order.pick_method(64 << 10, 2) == "chain"
    assert order.pick_method(128 << 20, 1000) == "chain"


def test_remove_lets_the_parent_adopt_the_children_in_place():
    topo = Topology(order.layout(["a", "b", "c", "d"]))
    assert topo.remove("b") == "a"
    assert topo.children["a"] == ["c"] and topo.parent["c"] == "a"
    assert topo.remove("a") is SOURCE
    assert topo.children[SOURCE] == ["c"]
    assert "a" not in topo and "c" in topo


def test_remove_in_a_tree_keeps_siblings_order():
    topo = Topology({SOURCE: ["a"], "a": ["b", "c", "d"], "c": ["e", "f"]})
    topo.remove("c")
    assert topo.children["a"] == ["b", "e", "f", "d"]


def test_feed_from_source():
    topo = Topology(order.layout(["a", "b", "c"]))
    assert topo.feed_from_source("c") == "b"
    assert topo.children[SOURCE] == ["a", "c"] and topo.children["b"] == []


def _state(sink_idle=0.0, **fwd):
    return {"sink_idle": sink_idle, "fwd": {k: [0, v] for k, v in fwd.items()}}


def test_stalled_node_is_the_one_that_blocks_without_being_blocked():
    topo = Topology(order.layout(["a", "b", "c", "d"]))
    states = {SOURCE: {"fwd": {"a": [0, 40]}}, "a": _state(b=40), "b": _state(c=39),
              "c": _state(d=0), "d": _state()}
    assert stalled_nodes(topo, states, 30) == [("c", "stalled: took no data for 30 s")]


def test_stalled_writes_are_named():
    topo = Topology(order.layout(["a", "b"]))
    states = {SOURCE: {"fwd": {"a": [0, 35]}}, "a": _state(sink_idle=35, b=0), "b": _state()}
    [(node, reason)] = stalled_nodes(topo, states, 30)
    assert node == "a" and "writes made no progress" in reason


def test_slow_but_moving_chain_is_not_stalled():
    topo = Topology(order.layout(["a", "b"]))
    states = {SOURCE: {"fwd": {"a": [0, 2]}}, "a": _state(b=1), "b": _state(sink_idle=1)}
    assert stalled_nodes(topo, states, 30) == []


def test_silent_child_is_not_responding():
    topo = Topology(order.layout(["a", "b"]))
    states = {SOURCE: {"fwd": {"a": [0, 0]}}, "a": _state(b=31), "b": None}
    assert stalled_nodes(topo, states, 30) == [("b", "not responding for 30 s")]


def test_writes_stuck_while_the_parent_has_sent_everything():
    """Kernel buffers took the rest of the stream: only the node's own report shows the stall."""
    topo = Topology(order.layout(["a", "b", "c"]))
    states = {SOURCE: {"fwd": {"a": [100, 0]}}, "a": _state(b=0),
              "b": {"recv": 10, "recv_idle": 0, "sink_idle": 31, "fwd": {"c": [10, 0]}},
              "c": {"recv": 10, "recv_idle": 61, "sink_idle": 0, "fwd": {}}}
    assert stalled_nodes(topo, states, 30) == [("b", "stalled: its writes made no progress for 31 s")]


def _in_flight(sent, received):
    return {SOURCE: {"fwd": {"a": [sent, 0]}}, "a": {"recv": sent, "fwd": {"b": [sent, 0]}},
            "b": {"recv": received, "recv_idle": 61, "sink_idle": 0, "fwd": {}}}


def test_data_in_flight_that_never_arrives():
    topo = Topology(order.layout(["a", "b"]))
    assert stalled_nodes(topo, _in_flight(10 << 20, 6 << 20), 30) == [
        ("b", "stalled: data sent to it did not arrive for 60 s")]


def test_less_than_a_batch_in_flight_is_not_a_stall():
    """A receiver reads by batches: a small remainder waits for more data, legitimately."""
    topo = Topology(order.layout(["a", "b"]))
    assert stalled_nodes(topo, _in_flight(10 << 20, (10 << 20) - 1000), 30) == []
