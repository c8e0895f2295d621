"""The README's examples run as written."""

import itertools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def test_first_lines_are_the_two_commands():
    first = blocks("sh")[0].strip().splitlines()
    assert len(first) == 2
    assert "kadeploy" in first[0] and "ka-testbed up" in first[0]
    assert "pytest" in first[1]
    assert ".ci/setup" in first[1]
    assert "./.ci/setup && python3 -m pytest" in (Path(__file__).resolve().parents[1]
                                                 / ".ci" / "run").read_text()


@pytest.mark.testbed
def test_python_example_runs(testbed):
    [code] = blocks("python")
    done = subprocess.run([sys.executable, "-c", code], env=testbed.env, text=True,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert sorted(line.split()[0] for line in lines) == ["node-1", "node-2"]
    assert all(line.split()[1] == "ok" and "load average" in line for line in lines)


def test_pipeline_example_options_exist():
    """Each command of the pipeline example accepts the options it is given there."""
    [pipeline] = [b for b in blocks("sh") if "ka-pxe set deploy" in b]
    for stage in pipeline.replace("\\\n", " ").split(" | "):
        prog, *args = shlex.split(stage)
        args = args[:args.index("--")] if "--" in args else args  # the rest is the command
        sub = list(itertools.takewhile(lambda a: not a.startswith("-"), args))
        helptext = subprocess.run([prog, *sub, "--help"], text=True, capture_output=True,
                                  check=True).stdout
        for option in (a for a in args if a.startswith("-")):
            assert re.search(rf"(^|[ ,]){re.escape(option)}\b", helptext, re.M), \
                f"{prog} {' '.join(sub)}: {option} is not in its --help"


def test_real_servers_commands_exist():
    """The commands of 'Deploying real servers' accept the options they are given."""
    [block] = [b for b in blocks("sh") if "ka-deployenv build" in b]
    for line in block.strip().splitlines():
        prog, *args = shlex.split(line.split("#", 1)[0])
        sub = list(itertools.takewhile(lambda a: not a.startswith("-"), args))[:1]
        helptext = subprocess.run([prog, *sub, "--help"], text=True, capture_output=True,
                                  check=True).stdout
        for option in (a for a in args if a.startswith("-")):
            assert re.search(rf"(^|[ ,]){re.escape(option)}\b", helptext, re.M), \
                f"{prog} {' '.join(sub)}: {option} is not in its --help"
