"""Keep the man pages true: their OPTIONS sections are generated from the commands.

    python3 -m kabin.cli.manpages --write   # regenerate man/*.1 OPTIONS sections
    python3 -m kabin.cli.manpages --check   # exit 1 when a page is out of date

Everything else in a page (DESCRIPTION, INPUT, OUTPUT, EXIT STATUS, EXAMPLES) is
written by hand between the generated parts.
"""

import importlib
import sys
from pathlib import Path

import click

PROGRAMS = {
    "ka-pxe": "pxe", "ka-reboot": "reboot", "ka-exec": "exec", "ka-chaincast": "chaincast",
    "ka-env": "env", "ka-stats": "stats", "kadeploy": "deploy", "ka-testbed": "testbed",
    "ka-deployenv": "deployenv", "ka-rights": "rights",
}
BEGIN = '.\\" BEGIN GENERATED OPTIONS\n'
END = '.\\" END GENERATED OPTIONS\n'
SECTIONS = ("NAME", "SYNOPSIS", "DESCRIPTION", "INPUT", "OUTPUT", "EXIT STATUS", "EXAMPLES")


def command_of(prog):
    return importlib.import_module(f"kabin.cli.{PROGRAMS[prog]}").cli


def _escape(text):
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def _option(param):
    # short options first, in a fixed order (click keeps the help option's names in a set)
    ordered = sorted(param.opts + param.secondary_opts, key=lambda n: (n.startswith("--"), n))
    names = ", ".join(f"\\fB{_escape(n)}\\fR" for n in ordered)
    metavar = "" if param.is_flag or param.count else f" \\fI{_escape(param.make_metavar(click.Context(click.Command('x'))))}\\fR"
    help_text = " ".join((param.help or "").split())
    return f".TP\n{names}{metavar}\n{_escape(help_text)}\n"


def _params(command):
    params = command.params + [command.get_help_option(click.Context(command, **command.context_settings))]
    return "".join(_option(p) for p in params if isinstance(p, click.Option) and not p.hidden)


def options_section(prog):
    """The roff text of the OPTIONS of ``prog`` (and of each of its subcommands)."""
    command = command_of(prog)
    return ".SH OPTIONS\n" + _params(command) + _subcommands(prog, command)


def _subcommands(path, group):
    """One .SS per subcommand, nested groups (``ka-pxe set local``) included."""
    text = ""
    for name, sub in sorted(getattr(group, "commands", {}).items()):
        summary = (sub.help or "").split("\n\n", 1)[0]
        text += f".SS {_escape(path)} {_escape(name)}\n{_escape(' '.join(summary.split()))}\n"
        text += _params(sub) + _subcommands(f"{path} {name}", sub)
    return text


def page_path(prog, directory=None):
    directory = Path(directory) if directory else Path(__file__).resolve().parents[2] / "man"
    return directory / f"{prog}.1"


def updated(text, prog):
    """``text`` with its generated block replaced by the current one."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"{prog}.1 lacks the generated-options markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + BEGIN + options_section(prog) + END + tail


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    stale = []
    for prog in PROGRAMS:
        path = page_path(prog)
        if not path.exists():
            print(f"missing: {path.name}", file=sys.stderr)
            stale.append(path.name)
            continue
        text = path.read_text()
        new = updated(text, prog)
        if new != text:
            stale.append(path.name)
            if "--write" in argv:
                path.write_text(new)
    if stale and "--write" not in argv:
        print("out of date: " + ", ".join(stale), file=sys.stderr)
    return 1 if stale and "--write" not in argv else 0


if __name__ == "__main__":
    sys.exit(main())
