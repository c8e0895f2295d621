"""What every command shares: option decorators, the record loop, the error handler.

An option is spelled the same in every command because it is declared once, here.
"""

import functools
import logging
import os
import signal
import sys

import click

from .. import config as config_mod
from .. import records
from ..errors import (EXIT_BROKEN_PIPE, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_KO, EXIT_OK,
                      EXIT_USAGE, Interrupted, KabinError)

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
_state = {"debug": False}


# ---------------------------------------------------------------- option decorators

def _compose(*decorators):
    def apply(fn):
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn
    return apply


def _set_logging(ctx, param, value):
    if param.name == "debug":
        _state["debug"] = value
    return value


verbosity_options = _compose(
    click.option("-v", "--verbose", count=True, help="More messages on stderr (-vv: debug)."),
    click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr, no progress."),
    click.option("--debug", is_flag=True, is_eager=True, callback=_set_logging,
                 help="Show the traceback of an unexpected error."),
)

config_option = click.option(
    "--config", "config_dir", metavar="DIR", envvar="KABIN_CONFIG", show_envvar=True,
    help="Configuration directory (default: $KABIN_CONFIG, /etc/kadeploy, the packaged sample).")

input_options = _compose(
    click.option("-m", "--machine", "nodesets", multiple=True, metavar="NODESET",
                 help="Target nodes, e.g. node-[1-4,7] (repeatable)."),
    click.option("-f", "--file", "node_files", multiple=True, metavar="FILE",
                 help="Read nodes or records from FILE ('-' = stdin; repeatable)."),
    click.option("--groups", "resolve_groups", is_flag=True,
                 help="Resolve @group names through ClusterShell's groups."),
)

FORMATS = ("json", "table", "csv")

format_option = click.option(
    "--format", "fmt", type=click.Choice(FORMATS), default=None,
    help="Output format (default: table on a terminal, else JSON lines; csv: the table's "
         "columns, a header then a row per record or entry).")


def ok_ko_options(ok_flags=("--ok",), ko_flags=("--ko",)):
    """``--ok FILE`` / ``--ko FILE`` (kadeploy also takes Kadeploy3's -o / -n)."""
    return _compose(
        click.option(*ok_flags, "ok_file", metavar="FILE", help="Also write the OK nodes to FILE."),
        click.option(*ko_flags, "ko_file", metavar="FILE", help="Also write the KO nodes to FILE."))


output_options = _compose(format_option, ok_ko_options())

def fanout_option(help_text="Nodes handled at once (default: the config's fanout)."):
    return click.option("--fanout", type=click.IntRange(1), default=None, help=help_text)


def timeout_option(help_text="Per-node timeout.", dest="timeout"):
    return click.option("-t", "--timeout", dest, type=click.FloatRange(0, min_open=True),
                        default=None, metavar="SECONDS", help=help_text)


owner_option = click.option("-u", "--owner", metavar="USER", help="The environment's owner.")

running_option = click.option(
    "--running", type=click.Choice(["deploy", "system"]), default=None,
    help="What the nodes run now: the known-hosts file SSH checks their keys against (the "
         "deployment environment and deployed systems have different host keys).")

step_option = click.option(
    "--step", metavar="NAME", help="The step's name in the records (default: the command's; "
                                   "kadeploy --print-pipeline names its micro-steps).")


def instance_option(help_text):
    """``--instance NAME``: a testbed instance ($KABIN_TESTBED_INSTANCE)."""
    return click.option("--instance", default="default", show_default=True, metavar="NAME",
                        envvar="KABIN_TESTBED_INSTANCE", show_envvar=True, help=help_text)


def env_option(help_text):
    """``-e/--env NAME[@VERSION]``: an environment of the library, in every command."""
    return click.option("-e", "--env", "env_spec", metavar="NAME[@VERSION]", help=help_text)


def stream_options(fn):
    """The options of a command that reads records and writes records."""
    return _compose(input_options, output_options, config_option, verbosity_options)(fn)


# ---------------------------------------------------------------- the record loop

def load_config(opts):
    return config_mod.load(opts.get("config_dir"))


force_option = click.option(
    "--force", is_flag=True,
    help="Act on nodes another live run (a kadeploy) holds; without it they end KO.")


def read_permitted(config, opts, part=None):
    """The input records, once the requesting user's rights cover every OK node (else a
    RightsError before any work). The administrator's stream is not read ahead."""
    from .. import db, envs, rights

    items = read_input(opts)
    user = envs.current_user()
    if envs.is_admin(user):
        return items
    items = list(items)
    with db.open_database(config) as database:
        rights.check(database, user, [r["node"] for r in items if records.is_ok(r)], part)
    return iter(items)


def read_unheld(config, opts, step, items=None):
    """The input records (``items``, else read now); those of nodes another live run holds
    come out KO unless --force."""
    items = read_permitted(config, opts) if items is None else items
    if opts.get("force"):
        return items
    from .. import stats   # the deployment log: only the commands that change nodes read it
    return stats.refuse_held(config, items, step)


def read_input(opts, required=True):
    """The input records, lazily, from -m / -f / stdin."""
    return records.input_records(opts.get("nodesets", ()), opts.get("node_files", ()),
                                 resolve_groups=opts.get("resolve_groups", False),
                                 required=required)


def writer_for(opts, columns=()):
    fmt = opts.get("fmt") or ("table" if sys.stdout.isatty() else "json")
    return records.RecordWriter(sys.stdout, fmt, opts.get("ok_file"), opts.get("ko_file"),
                                columns)


def emit(opts, output, columns=()):
    """Write the records of ``output``; the exit code says whether all were OK."""
    writer = writer_for(opts, columns)
    try:
        writer.write_all(output)
    finally:
        if hasattr(output, "close"):   # a job stopped early (closed pipe) cleans up now
            output.close()
        writer.close()
    return EXIT_OK if writer.all_ok else EXIT_KO


# ---------------------------------------------------------------- logging and errors

class _Formatter(logging.Formatter):
    def __init__(self, prog):
        super().__init__()
        self.prog = prog

    def format(self, record):
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        text = f"{self.prog}: {level}{record.getMessage()}"
        if record.exc_info and _state["debug"]:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(prog, verbose=0, quiet=False):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(prog))
    root = logging.getLogger("kabin")
    root.handlers[:] = [handler]
    if quiet:
        root.setLevel(logging.ERROR)
    else:
        root.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    # progress of long work is shown unless -q
    logging.getLogger("kabin.progress").setLevel(logging.ERROR if quiet else logging.INFO)


def command(fn):
    """Set up logging from -v/-q and run the command body; its return value is the exit code."""
    @functools.wraps(fn)
    def wrapper(**opts):
        prog = click.get_current_context().find_root().info_name
        setup_logging(prog, opts.get("verbose", 0), opts.get("quiet", False))
        try:
            return fn(**opts)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: one line, exit 130
            raise Interrupted("interrupted") from None
        except BrokenPipeError:  # the reader went away: not an error worth a word
            raise _StdoutClosed() from None
    return wrapper


class _StdoutClosed(Exception):
    """Raised instead of BrokenPipeError, which click would turn into exit 1."""


def _error(prog, message, code):
    sys.stderr.write(f"{prog}: error: {message}\n")
    return code


def _silence_stdout():
    # stdout is gone: point it at /dev/null so Python's final flush does not complain
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def run(cli, prog, argv=None):
    """Run a click command and turn every outcome into an exit code."""
    try:
        code = cli.main(args=argv, prog_name=prog, standalone_mode=False)
        sys.stdout.flush()
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        code = _error(prog, exc.format_message() + hint, EXIT_USAGE)
    except click.ClickException as exc:
        code = _error(prog, exc.format_message(), exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        code = _error(prog, "interrupted", EXIT_INTERRUPTED)
    except (BrokenPipeError, _StdoutClosed):
        _silence_stdout()
        code = EXIT_BROKEN_PIPE
    except KabinError as exc:
        if _state["debug"]:
            logging.getLogger("kabin").exception("traceback")
        code = _error(prog, str(exc), exc.exit_code)
    except Exception as exc:  # a bug: say so in one line unless --debug
        if _state["debug"]:
            raise
        code = _error(prog, f"internal error: {type(exc).__name__}: {exc} (rerun with --debug)", EXIT_INTERNAL)
    return code if isinstance(code, int) else EXIT_OK


def entry_point(cli, prog):
    """A console-script ``main`` for ``cli``."""
    def main(argv=None):
        signal.signal(signal.SIGTERM, _raise_interrupt)
        sys.exit(run(cli, prog, argv))
    return main


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
