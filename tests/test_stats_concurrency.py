"""Several processes writing the same database at once lose nothing."""

import contextlib
import json
import os
import subprocess
import sys


from kabin import config, db, stats

RECORDERS, RECORDS = 6, 300
BATCHERS, BATCHES = 4, 60

BATCHER = """
import sys
from kabin import db, stats
worker = sys.argv[2]
with db.Database(sys.argv[1]) as database:
    for batch in range(int(sys.argv[3])):
        stats.store(database, [{"node": f"n-{worker}-{batch}-{i}", "status": "ok"}
                               for i in range(5)], {"deployment": f"B-{worker}-{batch}"})
"""

HOLDER = """
import sys
from kabin import db, stats
with db.Database(sys.argv[1]) as database:
    refused = stats.hold_nodes(database, [f"node-{i}" for i in range(1, 21)], "deploy",
                               sys.argv[2], "user-" + sys.argv[2])
    print(len(refused), flush=True)
    sys.stdin.read()  # stay alive (holding) until the test says so
"""


def _spawn(args, stdout=subprocess.PIPE, **kw):
    return subprocess.Popen([sys.executable, "-c", *args], stdin=subprocess.PIPE,
                            stdout=stdout, stderr=subprocess.PIPE, text=True, **kw)


def test_concurrent_recorders_lose_nothing(config_dir):
    """ka-stats record x6 and library writers x4 at once, on a database none has created yet."""
    database_path = config.load(config_dir).server.database
    env = {**os.environ, "KABIN_CONFIG": str(config_dir)}
    inputs = ["".join(json.dumps({"node": f"node-{k}-{i}", "status": "ok",
                                  "history": [{"step": "s", "status": "ok", "time": 1.0}]})
                      + "\n" for i in range(RECORDS)) for k in range(RECORDERS)]
    with contextlib.ExitStack() as stack:
        recorders = [stack.enter_context(_spawn(["from kabin.cli.stats import main; main()",
                                                 "record", "--deployment", f"D-{k}"],
                                                subprocess.DEVNULL, env=env))
                     for k in range(RECORDERS)]
        batchers = [stack.enter_context(_spawn([BATCHER, str(database_path), str(k),
                                                str(BATCHES)])) for k in range(BATCHERS)]
        for proc, text in zip(recorders, inputs):
            proc.stdin.write(text)
            proc.stdin.flush()
        for proc in recorders:  # they all store at the end: now, at about the same time
            proc.stdin.close()
        for proc in recorders + batchers:
            assert proc.wait(timeout=300) == 0, proc.stderr.read()
    with db.Database(database_path) as database:
        counts = dict(database.query("SELECT deployment, COUNT(*) FROM runs GROUP BY deployment "
                                     "HAVING deployment LIKE 'D-%'"))
        assert counts == {f"D-{k}": RECORDS for k in range(RECORDERS)}
        total = database.query("SELECT COUNT(*) FROM runs")[0][0]
        assert total == RECORDERS * RECORDS + BATCHERS * BATCHES * 5
        assert database.query("SELECT COUNT(*) FROM run_steps")[0][0] == RECORDERS * RECORDS
        assert len(stats.node_states(database)) == total


def test_concurrent_holds_give_each_node_to_one_run(tmp_path):
    path = tmp_path / "kabin.db"
    with contextlib.ExitStack() as stack:
        holders = [stack.enter_context(_spawn([HOLDER, str(path), f"D-{k}"])) for k in range(5)]
        refused = sorted(int(proc.stdout.readline()) for proc in holders)
        assert refused == [0, 20, 20, 20, 20]
        with db.Database(path) as database:
            states = stats.node_states(database)
        assert len({s["deployment"] for s in states}) == 1 and not any(s["stale"] for s in states)
        for proc in holders:
            proc.stdin.close()
            assert proc.wait(timeout=60) == 0
    with db.Database(path) as database:  # every holder has exited: their holds are stale
        assert stats.hold_nodes(database, ["node-1"], "deploy", "D-late", "late") == {}
