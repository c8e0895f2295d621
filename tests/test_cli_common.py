"""The one CLI handler: messages, exit codes, logging, shared options."""

import json
import logging

import click
import pytest

from kabin import records
from kabin.cli import common
from kabin.errors import ConfigError, KabinError


@click.command(context_settings=common.CONTEXT)
@click.option("--fail", type=click.Choice(["config", "usage", "bug", "interrupt", "ko"]))
@common.stream_options
@common.command
def sample(fail, **opts):
    """A command built like every kabin command."""
    if fail == "config":
        raise ConfigError("expected an integer, got 'x'", "server.yml", "ssh.port")
    if fail == "bug":
        raise ZeroDivisionError("division by zero")
    if fail == "interrupt":
        raise KeyboardInterrupt
    logging.getLogger("kabin.sample").info("working on it")
    logging.getLogger("kabin.progress").info("3/3 nodes")

    def work(record):
        if fail == "ko" and record["node"] == "n2":
            return records.ko(record, "sample", "it broke")
        return records.ok(record, "sample", 0.5)
    return common.emit(opts, map(work, common.read_input(opts)))


def run(capsys, *argv):
    code = common.run(sample, "ka-sample", list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_ok_records_and_exit_0(capsys):
    code, out, err = run(capsys, "-m", "n[1-3]", "--format", "json")
    assert code == 0
    assert [json.loads(line)["node"] for line in out.splitlines()] == ["n1", "n2", "n3"]
    assert err == "ka-sample: 3/3 nodes\n", "progress shown, info hidden without -v"


def test_one_ko_gives_exit_1(capsys):
    code, out, _ = run(capsys, "-m", "n[1-3]", "--fail", "ko", "--format", "json")
    assert code == 1
    assert json.loads(out.splitlines()[1])["error"] == "it broke"


def test_verbose_and_quiet(capsys):
    _, _, err = run(capsys, "-m", "n1", "-v", "--format", "json")
    assert "ka-sample: working on it" in err
    _, _, err = run(capsys, "-m", "n1", "-q", "--format", "json")
    assert err == ""


def test_config_error_exit_3_one_line(capsys):
    code, out, err = run(capsys, "-m", "n1", "--fail", "config")
    assert code == 3 and out == ""
    assert err == "ka-sample: error: server.yml: key 'ssh.port': expected an integer, got 'x'\n"


def test_usage_error_exit_2(capsys):
    code, _, err = run(capsys, "--bogus")
    assert code == 2
    assert err.startswith("ka-sample: error: No such option '--bogus'")
    assert "--help" in err


def test_bad_input_line_exit_2(capsys, tmp_path):
    nodes = tmp_path / "nodes"
    nodes.write_text("n1\n{oops\n")
    code, out, err = run(capsys, "-f", str(nodes), "--format", "json")
    assert code == 2
    assert err.splitlines()[-1].startswith(f"ka-sample: error: {nodes}:2: malformed JSON record")
    assert all(json.loads(line) for line in out.splitlines()), "only whole lines on stdout"


def test_bug_is_one_line_unless_debug(capsys):
    code, _, err = run(capsys, "-m", "n1", "--fail", "bug")
    assert code == 70
    assert err == ("ka-sample: error: internal error: ZeroDivisionError: division by zero "
                   "(rerun with --debug)\n")
    with pytest.raises(ZeroDivisionError):
        common.run(sample, "ka-sample", ["-m", "n1", "--fail", "bug", "--debug"])
    common._state["debug"] = False


def test_interrupt_exit_130(capsys):
    code, _, err = run(capsys, "-m", "n1", "--fail", "interrupt")
    assert code == 130 and err == "ka-sample: error: interrupted\n"


def test_kabin_error_base_code():
    assert KabinError("x").exit_code == 2
    assert ConfigError("x").exit_code == 3


def test_ok_ko_files(capsys, tmp_path):
    code, _, _ = run(capsys, "-m", "n[1-3]", "--fail", "ko", "--ok", str(tmp_path / "ok"),
                     "--ko", str(tmp_path / "ko"), "--format", "table")
    assert code == 1
    assert (tmp_path / "ok").read_text() == "n1\nn3\n"
    assert (tmp_path / "ko").read_text() == "n2\n"
