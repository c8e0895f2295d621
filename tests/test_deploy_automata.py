"""The deployment automaton: variants, retries, fallback, timeouts, breakpoints (pure logic)."""

import threading

from kabin import records
from kabin.deploy.automata import Engine, MicroStep, Variant


def step(name, fail=lambda node, ctx: None, wait=None):
    """A micro-step failing the nodes for which ``fail`` returns a reason."""
    def run(stream, ctx):
        for record in stream:
            if not records.is_ok(record):
                yield record
                continue
            if wait and wait(record["node"], ctx):
                ctx.stop.wait(ctx.deadline.remaining() + 1)
                continue
            reason = fail(record["node"], ctx)
            yield records.ko(record, name, reason) if reason else records.ok(record, name)
    return MicroStep(name, run)


def macros(*stages):
    return [list(stage) for stage in stages]


def micro(record):
    return [h for h in record["history"] if "variant" not in h]


def macro(record):
    return [(h["step"], h["variant"], h["status"], h["retries"]) for h in record["history"]
            if "variant" in h]


def deploy(engine, nodes):
    return {r["node"]: r for r in engine.run(map(records.new, nodes))}


def test_all_ok_go_through_every_macro_step():
    engine = Engine(macros([Variant("Set", "A", 5, 0, [step("pxe"), step("reboot")])],
                           [Variant("Boot", "B", 5, 0, [step("boot")])]))
    out = deploy(engine, ["n1", "n2", "n3"])
    assert all(r["status"] == "ok" for r in out.values())
    assert [h["step"] for h in micro(out["n1"])] == ["pxe", "reboot", "boot"]
    assert macro(out["n1"]) == [("Set", "A", "ok", 0), ("Boot", "B", "ok", 0)]
    assert out["n1"]["variant"] == {"Set": "A", "Boot": "B"}


def test_failed_nodes_are_replayed_then_fall_to_the_next_variant():
    attempts = {}

    def flaky(node, ctx):
        attempts[node, ctx.variant.type] = attempts.get((node, ctx.variant.type), 0) + 1
        if node == "n2" and ctx.attempt == 0:
            return "lost its first reboot"
        if node == "n3" and ctx.variant.type == "A":
            return "never works with A"
        return None

    engine = Engine(macros([Variant("Set", "A", 5, 1, [step("reboot", flaky)]),
                            Variant("Set", "B", 5, 0, [step("reboot", flaky)])]))
    out = deploy(engine, ["n1", "n2", "n3"])
    assert {n: r["status"] for n, r in out.items()} == {"n1": "ok", "n2": "ok", "n3": "ok"}
    assert attempts[("n2", "A")] == 2 and ("n2", "B") not in attempts
    assert attempts[("n3", "A")] == 2 and attempts[("n3", "B")] == 1
    assert out["n3"]["variant"] == {"Set": "B"}
    assert out["n3"]["retries"] == 2
    assert [h["status"] for h in micro(out["n3"])] == ["ko", "ko", "ok"]
    assert macro(out["n3"]) == [("Set", "A", "ko", 0), ("Set", "A", "ko", 1), ("Set", "B", "ok", 0)]


def test_no_variant_left_ends_ko_with_the_last_reason():
    engine = Engine(macros([Variant("Set", "A", 5, 1, [step("reboot", lambda n, c: "dead")])]))
    out = deploy(engine, ["n1"])
    assert out["n1"]["status"] == "ko" and out["n1"]["error"] == "dead"


def test_timeout_makes_the_nodes_inside_ko_and_falls_back():
    def stuck(node, ctx):
        return node == "n2" and ctx.variant.type == "Slow"

    engine = Engine(macros([Variant("Boot", "Slow", 0.3, 0, [step("wait", wait=stuck)]),
                            Variant("Boot", "Hard", 5, 0, [step("wait")])]))
    out = deploy(engine, ["n1", "n2"])
    assert out["n2"]["status"] == "ok" and out["n2"]["variant"] == {"Boot": "Hard"}
    timeout = [h for h in micro(out["n2"]) if h["status"] == "ko"]
    assert timeout[0]["error"] == "Timeout in the Boot-Slow step"


def test_ko_input_passes_through_untouched():
    engine = Engine(macros([Variant("Set", "A", 5, 0, [step("x")])]))
    ko = records.ko(records.new("n9"), "earlier", "was dead")
    out = list(engine.run([ko, records.new("n1")]))
    assert out[0] is ko


def test_breakpoint_stops_after_the_named_micro_step():
    engine = Engine(macros([Variant("Set", "A", 5, 0, [step("pxe"), step("reboot")])],
                           [Variant("Boot", "B", 5, 0, [step("boot")])]),
                    breakpoint=("Set", "pxe"))
    out = deploy(engine, ["n1"])
    assert out["n1"]["status"] == "ok" and out["n1"]["breakpoint"] == "Set:pxe"
    assert [h["step"] for h in micro(out["n1"])] == ["pxe"]


def test_abort_ends_every_node_inside():
    started = threading.Event()

    def block(node, ctx):
        started.set()
        return True

    engine = Engine(macros([Variant("Set", "A", 60, 3, [step("reboot", wait=block)])]))
    threading.Timer(0.2, lambda: started.wait(5) and engine.abort()).start()
    out = deploy(engine, ["n1", "n2"])
    assert {r["error"] for r in out.values()} == {"Aborted"}
