"""Rows that are not node records (environments, log entries, states) on stdout.

Three formats: a table (default on a terminal), JSON lines (default in a pipe),
CSV (header line, RFC 4180 quoting: ``csv.DictReader`` reads it back).
"""

import csv
import json
import sys

import click

from .. import records
from . import common

FORMATS = common.FORMATS
format_option = common.format_option


def fields_option(available, default):
    return click.option(
        "--fields", "fields", metavar="F1,F2", default=",".join(default), show_default=True,
        callback=lambda ctx, param, value: _check_fields(value, available),
        help=f"Fields to print, among: {', '.join(available)}.")


def _check_fields(value, available):
    fields = [f.strip() for f in value.split(",") if f.strip()]
    unknown = [f for f in fields if f not in available]
    if unknown or not fields:
        raise click.BadParameter(f"unknown field(s) {', '.join(unknown) or '(none)'}; "
                                 f"choose among {', '.join(available)}")
    return fields


def _text(value):
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def write_rows(rows, columns, fmt=None, flatten=None, stream=None):
    """Print ``rows`` (dicts), keeping ``columns``; ``flatten`` maps a column to a text
    function for the table and CSV formats (JSON keeps the structure)."""
    stream = stream or sys.stdout
    fmt = fmt or ("table" if stream.isatty() else "json")
    flatten = flatten or {}
    if fmt == "json":
        for row in rows:
            stream.write(records.dumps({c: row.get(c) for c in columns}) + "\n")
            stream.flush()
        return
    flat = [{c: flatten[c](row.get(c)) if c in flatten else row.get(c) for c in columns}
            for row in rows]
    if fmt == "csv":
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([_text(row[c]) for c in columns] for row in flat)
    elif flat:
        stream.write(records.format_table(flat, columns) + "\n")
    stream.flush()


def subcommand(group, *decorators, rows=True, name=None):
    """A subcommand of ``group`` with ``decorators``, the config and verbosity options, and
    --format when it prints rows (ka-env, ka-rights)."""
    def apply(fn):
        fn = common.command(fn)
        extra = (format_option,) if rows else ()
        for decorator in reversed((*decorators, *extra, common.config_option,
                                   common.verbosity_options)):
            fn = decorator(fn)
        return group.command(name, context_settings=common.CONTEXT)(fn)
    return apply
