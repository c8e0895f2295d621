"""The record stream rules (protocol v1)."""

import io
import json

import pytest

from kabin import records
from kabin.errors import InputError, UsageError


def lines(*items):
    return [i if isinstance(i, str) else json.dumps(i) for i in items]


def test_comments_blank_lines_and_node_sets():
    got = list(records.read_records(lines("# a comment", "", "   ", "node-[1-3]", "other")))
    assert [r["node"] for r in got] == ["node-1", "node-2", "node-3", "other"]
    assert all(r["status"] == "ok" for r in got)


def test_json_record_keeps_unknown_fields_and_defaults_status():
    rec = {"node": "n1", "custom": {"deep": [1, 2]}, "history": [{"step": "pxe", "status": "ok"}]}
    [got] = records.read_records(lines(rec))
    assert got["custom"] == {"deep": [1, 2]}
    assert got["status"] == "ok"
    out = records.ok(got, "reboot", 1.23456, level="soft")
    assert out["custom"] == {"deep": [1, 2]} and out["level"] == "soft"
    assert out["history"] == [{"step": "pxe", "status": "ok"},
                              {"step": "reboot", "status": "ok", "time": 1.235}]
    assert got["history"] == [{"step": "pxe", "status": "ok"}], "input record left untouched"


def test_ko_result_carries_error_and_ok_clears_it():
    bad = records.ko(records.new("n1"), "reboot", "Unreachable after the reboot", 3)
    assert bad["status"] == "ko" and bad["error"] == "Unreachable after the reboot"
    assert bad["history"][-1]["error"] == "Unreachable after the reboot"
    good = records.ok(bad, "retry")
    assert "error" not in good and good["status"] == "ok"
    with pytest.raises(ValueError):
        records.result(records.new("n1"), "x", "ko")


@pytest.mark.parametrize("line, message", [
    ('{"node": "n1", ', "malformed JSON record"),
    ('{"nodes": "n1"}', "needs a string field 'node'"),
    ('{"node": "n1", "status": "maybe"}', "must be \"ok\" or \"ko\""),
    ('{"node": "n1", "status": "ko"}', "needs a field 'error'"),
    ('{"node": "n;rm -rf /"}', "invalid node name"),
    ('[1, 2]', "neither a node set"),
    ('node-[1-', "invalid node set"),
    ('{"node": "n1", "history": 3}', "'history' must be a list"),
])
def test_malformed_line_is_a_clear_error_with_line_number(line, message):
    with pytest.raises(InputError) as info:
        list(records.read_records(["n0", "# ok", line], "nodes.txt"))
    assert str(info.value).startswith("nodes.txt:3: ")
    assert message in str(info.value)


def test_reading_is_lazy():
    def source():
        yield "n1"
        yield "n2"
        raise AssertionError("read too far")

    stream = records.read_records(source())
    assert next(stream)["node"] == "n1"
    assert next(stream)["node"] == "n2"


def test_duplicates_are_dropped(caplog):
    got = list(records.read_records(["n[1-2]", '{"node": "n1", "x": 1}']))
    assert [r["node"] for r in got] == ["n1", "n2"]
    assert "given twice" in caplog.text


def test_input_sources_in_order(tmp_path):
    f = tmp_path / "nodes"
    f.write_text("b[1-2]\n")
    got = records.input_records(["a1"], [str(f), "-"], stdin=io.StringIO("c1\n"))
    assert [r["node"] for r in got] == ["a1", "b1", "b2", "c1"]


def test_no_input_on_a_terminal_is_a_usage_error():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    with pytest.raises(UsageError, match="no nodes given"):
        list(records.input_records(stdin=Tty()))


def test_missing_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="cannot read"):
        list(records.input_records(files=[str(tmp_path / "nope")]))


def test_writer_json_lines_flushed_and_node_lists(tmp_path):
    out = io.StringIO()
    writer = records.RecordWriter(out, "json", tmp_path / "ok", tmp_path / "ko")
    writer.write(records.new("n1"))
    assert out.getvalue().count("\n") == 1, "written at once"
    writer.write(records.ko(records.new("n2"), "x", "boom"))
    writer.close()
    assert [json.loads(line)["node"] for line in out.getvalue().splitlines()] == ["n1", "n2"]
    assert (tmp_path / "ok").read_text() == "n1\n"
    assert (tmp_path / "ko").read_text() == "n2\n"
    assert not writer.all_ok


def test_writer_table():
    out = io.StringIO()
    writer = records.RecordWriter(out, "table", columns=("level",))
    writer.write(records.ok(records.new("n1"), "reboot", 2.5, level="soft"))
    writer.write(records.ko(records.new("n2"), "reboot", "Unreachable after the reboot"))
    assert out.getvalue() == "", "a table is printed at the end"
    writer.close()
    text = out.getvalue()
    assert text.splitlines()[0].split() == ["node", "status", "step", "time", "error", "level"]
    assert "Unreachable after the reboot" in text and "soft" in text


def test_pass_ko_yields_ko_at_once_and_returns_the_ok_ones():
    ko = records.ko(records.new("n2"), "x", "dead")

    def step(items):
        batch = yield from records.pass_ko(items)
        yield ("batch", [r["node"] for r in batch])

    assert list(step([records.new("n1"), ko, records.new("n3")])) == [ko, ("batch", ["n1", "n3"])]


def test_csv_rows_come_per_record_with_the_command_columns():
    import csv
    import io

    out = io.StringIO()
    writer = records.RecordWriter(out, "csv", columns=("rc", "stdout"))
    writer.write(records.ok(records.new("n-1"), "exec", 0.5, rc=0, stdout="a, \"b\"\n"))
    assert out.getvalue().startswith("node,status,step,time,error,rc,stdout\n")
    writer.write(records.ko(records.new("n-2"), "exec", "down", 1.0))
    writer.close()
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [(r["node"], r["status"], r["error"], r["stdout"]) for r in rows] == \
        [("n-1", "ok", "", "a, \"b\"\n"), ("n-2", "ko", "down", "")]
    assert not writer.all_ok
