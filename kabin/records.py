"""The record stream, protocol v1 (see design.md).

Input lines are comments, node sets or JSON records; output is one JSON object
per node per line, flushed as soon as that node's result is known. A record that
arrives KO is passed through unchanged; unknown fields are kept; every step
appends to ``history``.
"""

import json
import logging
import os
import sys
import tempfile

from . import nodes
from .errors import InputError, UsageError

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
OK, KO = "ok", "ko"
BASE_COLUMNS = ("node", "status", "step", "time", "error")


def new(node):
    """A fresh OK record for ``node``."""
    return {"node": nodes.check_name(node), "status": OK}


def is_ok(record):
    return record.get("status", OK) == OK


def pass_ko(items):
    """Yield the KO records of ``items`` at once and return the OK ones, for steps that
    need all their nodes together: ``batch = yield from records.pass_ko(items)``."""
    batch = []
    for record in items:
        if is_ok(record):
            batch.append(record)
        else:
            yield record
    return batch


def result(record, step, status, time=None, error=None, **fields):
    """A copy of ``record`` carrying the outcome of ``step``, with history appended."""
    if status not in (OK, KO):
        raise ValueError(f"status must be ok or ko, not {status!r}")
    if status == KO and not error:
        raise ValueError("a KO result needs an error")
    out = dict(record)
    out.update(fields)
    out["status"], out["step"] = status, step
    entry = {"step": step, "status": status}
    if time is not None:
        out["time"] = entry["time"] = round(time, 3)
    if error:
        out["error"] = entry["error"] = error
    else:
        out.pop("error", None)
    out["history"] = list(record.get("history", [])) + [entry]
    return out


def ok(record, step, time=None, **fields):
    return result(record, step, OK, time, **fields)


def ko(record, step, error, time=None, **fields):
    return result(record, step, KO, time, error, **fields)


def _validate(obj, source, lineno):
    if not isinstance(obj, dict):
        raise InputError("a JSON record must be an object", source, lineno)
    node = obj.get("node")
    if not isinstance(node, str):
        raise InputError("a JSON record needs a string field 'node'", source, lineno)
    try:
        nodes.check_name(node)
    except UsageError as exc:
        raise InputError(str(exc), source, lineno) from None
    status = obj.setdefault("status", OK)
    if status not in (OK, KO):
        raise InputError(f"field 'status' must be \"ok\" or \"ko\", not {status!r}", source, lineno)
    if status == KO and not obj.get("error"):
        raise InputError("a KO record needs a field 'error'", source, lineno)
    if not isinstance(obj.get("history", []), list):
        raise InputError("field 'history' must be a list", source, lineno)
    return obj


def parse_line(line, source="<stdin>", lineno=None, resolve_groups=False):
    """Return the records one input line stands for (none, one, or a node set's)."""
    text = line.strip()
    if not text or text.startswith("#"):
        return []
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"malformed JSON record: {exc.msg} (column {exc.colno})",
                             source, lineno) from None
        return [_validate(obj, source, lineno)]
    try:
        return [new(n) for n in nodes.expand(text, resolve_groups)]
    except UsageError as exc:
        raise InputError(f"{exc} (neither a node set nor a JSON record)", source, lineno) from None


def read_records(lines, source="<stdin>", resolve_groups=False, seen=None):
    """Lazily turn input lines into records; a node seen twice is dropped with a warning."""
    seen = set() if seen is None else seen
    for lineno, line in enumerate(lines, 1):
        for record in parse_line(line, source, lineno, resolve_groups):
            if record["node"] in seen:
                log.warning("%s:%d: node %s given twice, keeping the first", source, lineno,
                            record["node"])
                continue
            seen.add(record["node"])
            yield record


def _open_lines(path, stdin):
    if path == "-":
        yield from _text_lines(stdin, "<stdin>")
        return
    try:
        with open(path, encoding="utf-8") as handle:
            yield from _text_lines(handle, path)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


def _text_lines(handle, source):
    """The lines of ``handle``; bytes that are not UTF-8 are a usage error, not a crash."""
    lineno, binary = 0, "not UTF-8 text (node names or JSON records expected)"
    try:
        for lineno, line in enumerate(handle, 1):
            line.encode("utf-8")  # a stdin decoded with surrogateescape kept the bad bytes
            yield line
    except UnicodeDecodeError:
        raise InputError(binary, source, lineno + 1) from None
    except UnicodeEncodeError:
        raise InputError(binary, source, lineno) from None


def input_records(nodesets=(), files=(), stdin=None, resolve_groups=False, required=True):
    """Records from ``-m`` node sets, then ``-f`` files, else stdin when it is not a terminal."""
    stdin = sys.stdin if stdin is None else stdin
    seen = set()
    for index, pattern in enumerate(nodesets, 1):
        yield from read_records([pattern], f"-m #{index}", resolve_groups, seen)
    for path in files:
        name = "<stdin>" if path == "-" else path
        yield from read_records(_open_lines(path, stdin), name, resolve_groups, seen)
    if nodesets or files:
        return
    if stdin.isatty():
        if required:
            raise UsageError("no nodes given: use -m NODESET, -f FILE or pipe records on stdin")
        return
    yield from read_records(_text_lines(stdin, "<stdin>"), "<stdin>", resolve_groups, seen)


def dumps(record):
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False)


def write_node_list(path, names):
    """Write a plain node list atomically (temporary file + rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".kabin-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.writelines(f"{n}\n" for n in names)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class RecordWriter:
    """Writes records as JSON lines or CSV rows (flushed per record) or, at the end, as a
    table."""

    def __init__(self, stream=None, fmt="json", ok_file=None, ko_file=None, columns=()):
        self.stream = sys.stdout if stream is None else stream
        self.fmt = fmt
        self.ok_file, self.ko_file = ok_file, ko_file
        self.columns = BASE_COLUMNS + tuple(c for c in columns if c not in BASE_COLUMNS)
        self.ok_nodes, self.ko_nodes, self._rows, self._csv = [], [], [], None

    def write(self, record):
        (self.ok_nodes if is_ok(record) else self.ko_nodes).append(record["node"])
        if self.fmt == "json":
            self.stream.write(dumps(record) + "\n")
            self.stream.flush()
        elif self.fmt == "csv":
            self._write_csv(record)
        else:
            self._rows.append(record)

    def _write_csv(self, record):
        """One row per record as it comes, the command's columns (a header first)."""
        import csv

        if self._csv is None:
            self._csv = csv.writer(self.stream, lineterminator="\n")
            self._csv.writerow(self.columns)
        self._csv.writerow([_csv_cell(record.get(c)) for c in self.columns])
        self.stream.flush()

    def write_all(self, records):
        for record in records:
            self.write(record)
        return self

    def close(self):
        """Print the table (table format) and the --ok/--ko node lists."""
        if self.fmt == "table" and self._rows:
            self.stream.write(format_table(self._rows, self.columns) + "\n")
            self.stream.flush()
        if self.ok_file:
            write_node_list(self.ok_file, self.ok_nodes)
        if self.ko_file:
            write_node_list(self.ko_file, self.ko_nodes)

    @property
    def all_ok(self):
        return not self.ko_nodes


def _cell(value):
    if isinstance(value, str):
        value = value.strip()
        return value if len(value) <= 60 else value[:57] + "..."
    if value is None:
        return ""
    return value if isinstance(value, (int, float)) else json.dumps(value)


def _csv_cell(value):
    if value is None:
        return ""
    return value if isinstance(value, (str, int, float)) else json.dumps(value)


def format_table(rows, columns=BASE_COLUMNS):
    """A plain-text table of the given columns (those present in at least one row)."""
    from tabulate import tabulate  # imported late: tabulate costs 60 ms at start-up

    present = [c for c in columns if any(c in r for r in rows)]
    body = [[_cell(r.get(c)) for c in present] for r in rows]
    return tabulate(body, headers=present, tablefmt="simple")
