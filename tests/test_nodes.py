"""Node sets: expansion, folding, validation."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kabin import nodes
from kabin.errors import UsageError


def test_expand_ranges():
    assert nodes.expand("node-[1-3,7]") == ["node-1", "node-2", "node-3", "node-7"]
    assert nodes.expand("a1,b[2-3]") == ["a1", "b2", "b3"]


@pytest.mark.parametrize("bad", ["node-[1-", "node-[3-1]", "a b", "a;b", "$(reboot)", ""])
def test_invalid_syntax_names_the_input(bad):
    with pytest.raises(UsageError) as info:
        nodes.expand(bad)
    assert repr(bad.strip()) in str(info.value)


def test_groups_are_off_unless_asked():
    with pytest.raises(UsageError, match="group resolution is off"):
        nodes.expand("@compute")


def test_check_name():
    assert nodes.check_name("node-1.site") == "node-1.site"
    for bad in ["-x", "a/b", "a b", "", "n`id`", 3]:
        with pytest.raises(UsageError):
            nodes.check_name(bad)


def test_expand_values_positional():
    assert nodes.expand_values("127.0.1.[1-3]", 3, "address") == ["127.0.1.1", "127.0.1.2",
                                                                  "127.0.1.3"]
    assert nodes.expand_values(623, 2, "port") == [623, 623]
    assert nodes.expand_values(None, 2, "mac") == [None, None]
    with pytest.raises(UsageError, match="2 values for 3 nodes"):
        nodes.expand_values(["a", "b"], 3, "mac")


names = st.lists(
    st.tuples(st.sampled_from(["node-", "gpu", "n", "c1-r"]), st.integers(0, 2000)),
    min_size=1, max_size=60, unique=True,
).map(lambda items: [f"{p}{i}" for p, i in items])


@settings(max_examples=200, deadline=None)
@given(names)
def test_fold_expand_round_trip(node_names):
    folded = nodes.fold(node_names)
    assert sorted(nodes.expand(folded)) == sorted(node_names)
    assert nodes.fold(nodes.expand(folded)) == folded
