"""Every command has a man page, and its options are those of the command's --help."""

import re
import subprocess

import pytest

from kabin.cli import manpages


@pytest.mark.parametrize("prog", sorted(manpages.PROGRAMS))
def test_page_has_every_section(prog):
    text = manpages.page_path(prog).read_text()
    headings = re.findall(r"^\.SH (.+)$", text, re.M)
    for section in manpages.SECTIONS + ("OPTIONS",):
        assert section in headings, f"{prog}.1 lacks {section}"


@pytest.mark.parametrize("prog", sorted(manpages.PROGRAMS))
def test_generated_options_are_up_to_date(prog):
    text = manpages.page_path(prog).read_text()
    assert manpages.updated(text, prog) == text, \
        f"{prog}.1 is out of date: run python3 -m kabin.cli.manpages --write"


def _help_options(argv):
    out = subprocess.run(argv + ["--help"], capture_output=True, text=True, check=True).stdout
    options = out.split("Options:", 1)[-1].split("Commands:", 1)[0]
    found = set()
    for names in re.findall(r"^ {1,4}(-[^ ,]+(?:, -[^ ,]+)*)", options, re.M):
        found.update(n.split("/")[0] for n in names.split(", "))
    return found


def _subcommands(argv):
    """The argv of every subcommand, nested ones (ka-pxe set local) included."""
    out = subprocess.run(argv + ["--help"], capture_output=True, text=True, check=True).stdout
    if "Commands:" not in out:
        return []
    found = []
    for name in re.findall(r"^  (\S+)", out.split("Commands:", 1)[1], re.M):
        found += [argv + [name]] + _subcommands(argv + [name])
    return found


@pytest.mark.parametrize("prog", sorted(manpages.PROGRAMS))
def test_page_options_match_the_installed_help(prog):
    page = manpages.page_path(prog).read_text().replace("\\-", "-")
    in_page = set(re.findall(r"\\fB(--?[A-Za-z][\w-]*)\\fR", page))
    in_help = _help_options([prog])
    for sub in _subcommands([prog]):
        in_help |= _help_options(sub)
    assert in_help <= in_page, f"options missing from {prog}.1: {sorted(in_help - in_page)}"
