"""The deployment log, failure rates and node states, on a real SQLite database."""

import csv
import io
import json
import os
import select
import subprocess
import sys

import pytest

from kabin import db, stats
from kabin.errors import UsageError

DAY = 86400.0
T0 = 1_700_000_000.0  # 2023-11-14


@pytest.fixture
def database(tmp_path):
    with db.Database(tmp_path / "kabin.db") as database:
        yield database


def ka_stats(config_dir, *args, stdin="", check=0):
    proc = subprocess.run([sys.executable, "-c", "from kabin.cli.stats import main; main()",
                           *args], input=stdin, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "KABIN_CONFIG": str(config_dir)})
    assert proc.returncode == check, proc.stderr
    return proc


def final(node, ok=True, start=T0, **fields):
    """A final record as kadeploy writes it (macro-steps with variant, retries, timeout)."""
    history = [
        {"step": "SetDeploymentEnv", "variant": "Untrusted", "status": "ok", "time": 60.0,
         "retries": fields.pop("retries", 0), "timeout": 200},
        {"step": "BroadcastEnv", "variant": "Chain", "status": "ok" if ok else "ko",
         "time": 30.0, "timeout": 300, **({} if ok else {"error": "Timeout"})},
    ]
    record = {"node": node, "status": "ok" if ok else "ko", "history": history, "start": start,
              "env": "debian12@1", "user": "alice", **fields}
    if not ok:
        record["error"] = "Timeout in the BroadcastEnv step"
    return record


# ---------------------------------------------------------------- records -> runs

def test_run_of_reads_the_documented_fields():
    run = stats.run_of(final("node-1", deployment="D-1", operation="deploy", retries=1))
    assert (run["deployment"], run["node"], run["operation"], run["user"], run["env"]) == \
        ("D-1", "node-1", "deploy", "alice", "debian12@1")
    assert (run["start"], run["duration"], run["success"], run["error"]) == (T0, 90.0, True, None)
    assert run["steps"][0] == {"step": "SetDeploymentEnv", "variant": "Untrusted",
                               "status": "ok", "time": 60.0, "retries": 1, "timeout": 200,
                               "error": None}


def test_run_of_fills_in_defaults():
    run = stats.run_of({"node": "n1", "status": "ko", "error": "down", "time": 5.0},
                       {"deployment": "D-9", "operation": "reboot", "user": "bob"}, now=1000.0)
    assert (run["deployment"], run["operation"], run["user"], run["duration"], run["start"],
            run["error"]) == ("D-9", "reboot", "bob", 5.0, 995.0, "down")


@pytest.mark.parametrize("record, message", [
    ({"node": "n1", "operation": "install"}, "operation must be one of deploy, reboot, power"),
    ({"node": "n1", "start": "yesterday"}, "field 'start' must be a number"),
    ({"node": "n1", "history": [{"step": "x", "retries": "two"}]}, "'retries' must be a number"),
    ({"node": "n1", "env": {"name": "x"}}, "field 'env' must be a string"),
])
def test_bad_fields_are_clear_errors(record, message):
    with pytest.raises(UsageError, match=message):
        stats.run_of(record, {"deployment": "D", "user": "u"})


# ---------------------------------------------------------------- the log

@pytest.fixture
def history(database):
    """A known history: node-1 fails 1 of 4, node-2 2 of 2, node-3 never; one reboot."""
    stats.store(database, [final("node-1", start=T0), final("node-2", False, start=T0),
                           final("node-3", start=T0)], {"deployment": "D-1"})
    stats.store(database, [final("node-1", False, start=T0 + DAY, retries=2),
                           final("node-2", False, start=T0 + DAY),
                           final("node-3", start=T0 + DAY)], {"deployment": "D-2"})
    stats.store(database, [final("node-1", start=T0 + 2 * DAY),
                           final("node-3", start=T0 + 2 * DAY)], {"deployment": "D-3"})
    stats.store(database, [{"node": "node-1", "status": "ok", "start": T0 + 3 * DAY}],
                {"deployment": "R-1", "operation": "reboot", "user": "bob"})
    return database


def test_failure_rates_on_a_known_history(history):
    rates = stats.failure_rates(history)
    assert [(r["node"], r["total"], r["successes"], r["rate"]) for r in rates] == [
        ("node-2", 2, 0, 1.0), ("node-1", 4, 3, 0.25), ("node-3", 3, 3, 0.0)]
    assert [r["node"] for r in stats.failure_rates(history, min_rate=0.25)] == ["node-2", "node-1"]
    deploys = stats.Filters(operations=["deploy"])
    assert {r["node"]: r["rate"] for r in stats.failure_rates(history, deploys)}["node-1"] \
        == pytest.approx(1 / 3, abs=1e-4)


def test_list_filters(history):
    def nodes_of(**kw):
        return [(r["deployment"], r["node"]) for r in stats.list_runs(history,
                                                                      stats.Filters(**kw))]
    assert len(nodes_of()) == 9
    assert nodes_of(nodes=["node-2"]) == [("D-1", "node-2"), ("D-2", "node-2")]
    assert nodes_of(since=T0 + DAY, until=T0 + 2 * DAY) == [
        ("D-2", "node-1"), ("D-2", "node-2"), ("D-2", "node-3")]
    assert nodes_of(operations=["reboot"]) == [("R-1", "node-1")]
    assert nodes_of(deployment="D-3") == [("D-3", "node-1"), ("D-3", "node-3")]
    assert nodes_of(min_retries={"SetDeploymentEnv": 2}) == [("D-2", "node-1")]
    assert nodes_of(min_retries={"SetDeploymentEnv": 3}) == []


def test_sort_and_limit(history):
    runs = stats.list_runs(history, sort=("node", "start"), reverse=True, limit=2)
    assert [(r["node"], r["deployment"]) for r in runs] == [("node-3", "D-3"), ("node-3", "D-2")]
    with pytest.raises(UsageError, match="cannot sort by 'steps'"):
        stats.list_runs(history, sort=("steps",))


def test_show_one_deployment(history):
    runs = stats.show(history, "D-2")
    assert [(r["node"], r["success"], r["retries"]) for r in runs] == [
        ("node-1", False, 2), ("node-2", False, 0), ("node-3", True, 0)]
    assert runs[0]["error"] == "Timeout in the BroadcastEnv step"
    assert stats.steps_text(runs[0]["steps"]) == (
        "SetDeploymentEnv:Untrusted(ok,60s,retries=2) BroadcastEnv:Chain(ko,30s)")
    with pytest.raises(UsageError, match="no deployment 'D-404'"):
        stats.show(history, "D-404")


def test_recording_again_replaces_a_node_of_the_same_deployment(database):
    stats.store(database, [final("node-1", False)], {"deployment": "D-1"})
    stats.store(database, [final("node-1", True)], {"deployment": "D-1"})
    [run] = stats.list_runs(database)
    assert run["success"] is True
    assert database.query("SELECT COUNT(*) FROM run_steps")[0][0] == 2


def test_dates():
    assert stats.parse_time("1700000000") == T0
    assert stats.parse_time("2023-11-14T22:13:20+00:00") == T0
    with pytest.raises(UsageError, match="invalid date 'last week'"):
        stats.parse_time("last week")
    assert stats.parse_min_retries(["BroadcastEnv=1"]) == {"BroadcastEnv": 1}
    with pytest.raises(UsageError, match="STEP=N"):
        stats.parse_min_retries(["BroadcastEnv"])


# ---------------------------------------------------------------- the command

def test_record_passes_records_on_unchanged_and_stores_them(config_dir):
    records = [final("node-1", deployment="D-7"), final("node-2", False, deployment="D-7"),
               {"node": "node-3", "status": "ok", "custom": {"kept": [1, 2]}}]
    text = "".join(json.dumps(r) + "\n" for r in records)
    proc = ka_stats(config_dir, "record", "--deployment", "D-8", stdin=text, check=1)
    assert [json.loads(line) for line in proc.stdout.splitlines()] == records
    shown = json.loads(ka_stats(config_dir, "show", "D-8", "--format", "json").stdout)
    assert (shown["node"], shown["user"]) == ("node-3", os.environ.get("USER", "root"))
    out = ka_stats(config_dir, "list", "--deployment", "D-7", "--format", "json").stdout
    assert [json.loads(line)["success"] for line in out.splitlines()] == [True, False]


def test_record_streams_each_record_at_once(config_dir):
    proc = subprocess.Popen([sys.executable, "-c", "from kabin.cli.stats import main; main()",
                             "record", "--deployment", "D-S"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "KABIN_CONFIG": str(config_dir)})
    try:
        proc.stdin.write(json.dumps(final("node-1")) + "\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "the first record did not come out while the input was still open"
        assert json.loads(proc.stdout.readline())["node"] == "node-1"
        proc.stdin.write(json.dumps(final("node-2")) + "\n")
        proc.stdin.close()
        assert json.loads(proc.stdout.readline())["node"] == "node-2"
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
    out = ka_stats(config_dir, "show", "D-S", "--format", "json").stdout
    assert len(out.splitlines()) == 2


def test_record_keeps_logging_when_the_reader_goes_away(config_dir):
    lines = "".join(json.dumps(final(f"node-{i}")) + "\n" for i in range(1, 2001))
    proc = subprocess.Popen([sys.executable, "-c", "from kabin.cli.stats import main; main()",
                             "record", "--deployment", "D-B"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "KABIN_CONFIG": str(config_dir)})
    proc.stdout.close()  # the next command of the pipe is gone
    _, err = proc.communicate(lines.encode(), timeout=60)
    assert proc.returncode != 0 and err == b""  # a broken pipe ends it quietly
    out = ka_stats(config_dir, "show", "D-B", "--fields", "node", "--format", "csv").stdout
    assert len(out.splitlines()) == 1 + 2000


def test_csv_output_parses_back(config_dir):
    records = [final("node-1", deployment="D-1", error_note='say "hi", ok'),
               final("node-2", False, deployment="D-1", retries=1)]
    records[1]["error"] = 'broken, "quoted"\nand multi-line'
    ka_stats(config_dir, "record", stdin="".join(json.dumps(r) + "\n" for r in records), check=1)
    fields = ",".join(stats.RUN_FIELDS)
    as_json = [json.loads(line) for line in ka_stats(
        config_dir, "list", "--fields", fields, "--format", "json").stdout.splitlines()]
    as_csv = list(csv.DictReader(io.StringIO(ka_stats(
        config_dir, "list", "--fields", fields, "--format", "csv").stdout)))
    assert len(as_csv) == len(as_json) == 2
    for row, obj in zip(as_csv, as_json):
        assert list(row) == list(stats.RUN_FIELDS)
        assert row["error"] == (obj["error"] or "")
        assert row["success"] == str(obj["success"]).lower()
        assert float(row["duration"]) == obj["duration"]
        assert int(row["retries"]) == obj["retries"]
        assert row["steps"] == stats.steps_text(obj["steps"])
    rates = list(csv.DictReader(io.StringIO(ka_stats(config_dir, "failure-rate", "--format",
                                                     "csv").stdout)))
    assert [(r["node"], float(r["rate"])) for r in rates] == [("node-2", 1.0), ("node-1", 0.0)]


def test_list_options_from_the_command_line(config_dir):
    stats_text = "".join(json.dumps(final(f"node-{i}", i % 2 == 0, start=T0 + i * DAY)) + "\n"
                         for i in range(1, 7))
    ka_stats(config_dir, "record", "--deployment", "D-1", stdin=stats_text, check=1)
    out = ka_stats(config_dir, "list", "-m", "node-[1-4]", "--from", str(T0 + 2 * DAY),
                   "--sort", "node", "--reverse", "--limit", "2", "--fields", "node,success",
                   "--format", "json").stdout
    assert [json.loads(line) for line in out.splitlines()] == [
        {"node": "node-4", "success": True}, {"node": "node-3", "success": False}]
    out = ka_stats(config_dir, "failure-rate", "--min", "0.5", "--format", "json").stdout
    assert sorted(json.loads(line)["node"] for line in out.splitlines()) == [
        "node-1", "node-3", "node-5"]
    proc = ka_stats(config_dir, "list", "--fields", "node,colour", check=2)
    assert "unknown field(s) colour" in proc.stderr


# ---------------------------------------------------------------- node states

HOLD = """
import sys
from kabin import db, stats
with db.Database(sys.argv[1]) as database:
    print(len(stats.hold_nodes(database, sys.argv[3].split(","), "deploy", sys.argv[2], "bob")))
"""


def test_node_states_hold_and_release(database):
    nodes = ["node-1", "node-2", "node-3"]
    assert stats.hold_nodes(database, nodes, "deploy", "D-1", "alice", "debian12@1") == {}
    refused = stats.hold_nodes(database, ["node-2", "node-4"], "reboot", "D-2", "bob")
    assert list(refused) == ["node-2"]
    assert "being deployed by alice (deployment D-1" in refused["node-2"]
    assert "use --force" in refused["node-2"]
    assert stats.hold_nodes(database, ["node-1"], "deploy", "D-1", "alice") == {}  # its own
    stats.mark_final(database, [{"node": "node-1", "status": "ok"},
                                {"node": "node-2", "status": "ko", "error": "x"}], "deploy", "D-1")
    stats.mark_aborted(database, ["node-3", "node-4"], "D-1")  # node-4 belongs to D-2
    states = {s["node"]: s for s in stats.node_states(database)}
    assert {n: s["state"] for n, s in states.items()} == {
        "node-1": "deployed", "node-2": "deploy_failed", "node-3": "aborted",
        "node-4": "rebooting"}
    assert (states["node-1"]["user"], states["node-1"]["env"]) == ("alice", "debian12@1")
    assert states["node-4"]["stale"] is False and states["node-4"]["holder"].startswith(
        f"{os.getpid()}@")
    assert stats.hold_nodes(database, ["node-4"], "deploy", "D-3", "carol", force=True) == {}
    assert stats.node_states(database, ["node-4"])[0]["user"] == "carol"


def test_a_dead_runs_hold_is_stale(database):
    held = subprocess.run([sys.executable, "-c", HOLD, str(database.path), "D-dead",
                           "node-1,node-2"], capture_output=True, text=True, timeout=60)
    assert held.stdout.strip() == "0", held.stderr  # it held both, then exited
    assert [s["stale"] for s in stats.node_states(database)] == [True, True]
    assert stats.hold_nodes(database, ["node-1", "node-2"], "deploy", "D-new", "alice") == {}


def test_recording_a_final_record_sets_the_final_state(database):
    stats.hold_nodes(database, ["node-1", "node-2"], "deploy", "D-1", "alice", "env@1")
    stats.store(database, [final("node-1", deployment="D-1"),
                           final("node-2", False, deployment="D-1")])
    assert [s["state"] for s in stats.node_states(database)] == ["deployed", "deploy_failed"]
    stats.hold_nodes(database, ["node-1"], "deploy", "D-2", "bob")
    stats.store(database, [final("node-1", deployment="D-old")])  # late record of another run
    assert stats.node_states(database, ["node-1"])[0]["state"] == "deploying"


def test_nodes_command(config_dir):
    ka_stats(config_dir, "record", "--operation", "power",
             stdin='{"node": "node-5", "status": "ok"}\n')
    out = ka_stats(config_dir, "nodes", "-m", "node-[1-5]", "--format", "json").stdout
    [state] = [json.loads(line) for line in out.splitlines()]
    assert (state["node"], state["state"], state["stale"]) == ("node-5", "powered", None)
