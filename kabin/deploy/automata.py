"""The automaton of a deployment: macro-steps, their variants, retries and timeouts.

A macro-step (SetDeploymentEnv, BroadcastEnv, BootNewEnv) has an ordered list of
variants ``{type, timeout, retries}``. A batch of nodes runs a variant *instance*:
its micro-steps in order, each a function from a stream of records to a stream of
records, so a fast node goes on to the next micro-step while the others still
work. When the instance ends, its OK nodes go on at once to the next macro-step
as a new batch; its KO nodes are replayed from the variant's first micro-step up
to ``retries`` times, then fall to the next variant, then end KO. Nodes still
inside an instance when its timeout expires are KO "Timeout in the X step".
"""

import logging
import queue
import threading
from dataclasses import dataclass, field

from .. import records
from ..errors import UsageError
from ..parallel import Deadline

log = logging.getLogger(__name__)
progress = logging.getLogger("kabin.progress")
ABORTED = "Aborted"


@dataclass
class MicroStep:
    """``run(stream, ctx)`` consumes OK records and yields records (OK or KO).

    ``options``: the job's options (``exec.Options``, ``reboot.Options``...) whose
    ``to_argv()`` is the equivalent ka-* command line (for ``--print-pipeline``);
    None when the step does nothing with these options.
    """

    name: str
    run: object
    options: object = None

    def argv(self):
        """The ka-* command line, or None (nothing to do, or work no command line says)."""
        if self.options is None:
            return None
        try:
            return self.options.to_argv()
        except UsageError:
            return None


@dataclass
class Variant:
    macro: str
    type: str
    timeout: float
    retries: int
    steps: list = field(default_factory=list)

    @property
    def label(self):
        return f"{self.macro}-{self.type}"


@dataclass
class InstanceContext:
    """What a micro-step may use: the instance's deadline and stop event."""

    deadline: Deadline
    stop: threading.Event
    variant: Variant
    attempt: int


class Engine:
    """Runs batches of records through the macro-steps; yields every final record once."""

    def __init__(self, macros, stop=None, breakpoint=None):
        self.macros = macros                      # list of lists of Variant
        self.stop = stop or threading.Event()
        self.breakpoint = breakpoint              # (macro name, micro name or None)
        self._out = queue.Queue()
        self._inside = {}                         # node -> label of the instance it is in
        self._running = set()                     # done events of the live instances
        self._lock = threading.Lock()

    def run(self, items):
        """Yield KO input at once, then each node's final record as soon as it is known."""
        batch = yield from records.pass_ko(items)
        if not batch:
            return
        self._start(0, 0, 0, batch)
        for _ in range(len(batch)):
            yield self._out.get()

    def abort(self):
        """Stop every instance now: the nodes inside end KO "Aborted"."""
        self.stop.set()
        with self._lock:
            running = list(self._running)
        for done in running:
            done.set()

    def inside(self):
        """Node -> the variant instance it is in now (for progress and abort)."""
        with self._lock:
            return dict(self._inside)

    # ------------------------------------------------------------ routing

    def _start(self, stage, index, attempt, batch):
        if stage == len(self.macros) or self.stop.is_set():
            for record in batch:
                self._finish(record if stage == len(self.macros)
                             else records.ko(record, "abort", ABORTED))
            return
        variant = self.macros[stage][index]
        with self._lock:
            self._inside.update((r["node"], variant.label) for r in batch)
        threading.Thread(target=self._instance, args=(stage, index, attempt, batch), daemon=True,
                         name=f"kabin-{variant.label}").start()

    def _finish(self, record):
        with self._lock:
            self._inside.pop(record["node"], None)
        self._out.put(record)

    def _route(self, stage, index, attempt, passed, failed):
        variant = self.macros[stage][index]
        if passed:
            self._start(stage + 1, 0, 0, passed)
        if not failed:
            return
        if self.stop.is_set():
            for record in failed:
                self._finish(record)
        elif attempt < variant.retries:
            log.info("%s: replaying %d node(s) (retry %d/%d)", variant.label, len(failed),
                     attempt + 1, variant.retries)
            self._start(stage, index, attempt + 1, [_retry(r) for r in failed])
        elif index + 1 < len(self.macros[stage]):
            log.info("%s: %d node(s) fall to %s", variant.label, len(failed),
                     self.macros[stage][index + 1].label)
            self._start(stage, index + 1, 0, [_retry(r) for r in failed])
        else:
            for record in failed:
                self._finish(record)

    # ------------------------------------------------------------ one variant instance

    def _instance(self, stage, index, attempt, batch):
        variant = self.macros[stage][index]
        ctx = InstanceContext(Deadline(variant.timeout), threading.Event(), variant, attempt)
        results, done = {}, threading.Event()
        with self._lock:
            self._running.add(done)
        progress.info("%s: %d node(s) in%s", variant.label, len(batch),
                      f" (retry {attempt})" if attempt else "")

        def run_steps():
            try:
                for record in self._stream(variant, batch, ctx):
                    results.setdefault(record["node"], record)
            except BaseException as exc:  # a bug in a micro-step: its nodes end KO, not the run
                log.error("%s: %s", variant.label, exc, exc_info=exc)
                for record in batch:
                    results.setdefault(record["node"], records.ko(
                        record, variant.label, f"internal error: {type(exc).__name__}: {exc}"))
            finally:
                done.set()

        threading.Thread(target=run_steps, daemon=True, name=f"kabin-{variant.label}-steps").start()
        if not self.stop.is_set():
            done.wait(variant.timeout)  # set by the steps' end or by abort()
        ctx.stop.set()  # late micro-steps stop early; their results are no longer read
        with self._lock:
            self._running.discard(done)
        passed, failed, stopped = self._settle(variant, attempt, batch, dict(results),
                                               start=ctx.deadline)
        progress.info("%s: %d ok, %d ko%s%s", variant.label, len(passed) + len(stopped),
                      len(failed), _what_next(variant, attempt, failed, self.macros[stage], index),
                      " (stopped at the breakpoint)" if stopped else "")
        for record in stopped:
            self._finish(record)
        self._route(stage, index, attempt, passed, failed)

    def _stream(self, variant, batch, ctx):
        stream = iter(batch)
        for step in variant.steps:
            stream = _until_stopped(step.run(stream, ctx), ctx)
            if self.breakpoint == (variant.macro, step.name):
                return _breakpoint(stream, f"{variant.macro}:{step.name}")
        if self.breakpoint == (variant.macro, None):
            stream = _breakpoint(stream, variant.macro)
        return stream

    def _settle(self, variant, attempt, batch, results, start):
        passed, failed, stopped = [], [], []
        elapsed = start.seconds - start.remaining()
        for record in batch:
            out = results.get(record["node"])
            if out is None:
                why = ABORTED if self.stop.is_set() else f"Timeout in the {variant.label} step"
                out = records.ko(record, variant.label, why, elapsed)
            out = _summarize(out, variant, attempt, elapsed)
            (failed if not records.is_ok(out) else stopped if out.get("breakpoint")
             else passed).append(out)
        return passed, failed, stopped


def _what_next(variant, attempt, failed, variants, index):
    """How the progress line tells what becomes of the KO nodes."""
    if not failed:
        return ""
    if attempt < variant.retries:
        return f" (replayed: retry {attempt + 1}/{variant.retries})"
    if index + 1 < len(variants):
        return f" (falling to {variants[index + 1].type})"
    return " (no variant left)"


def _until_stopped(stream, ctx):
    """Stop pulling records once the instance is over (timeout or abort)."""
    for record in stream:
        yield record
        if ctx.stop.is_set():
            return


def _summarize(record, variant, attempt, elapsed):
    """One history entry for the macro-step as a whole (what ka-stats keeps per step)."""
    entry = {"step": variant.macro, "variant": variant.type, "status": record["status"],
             "time": round(elapsed, 3), "retries": attempt, "timeout": variant.timeout}
    if record.get("error"):
        entry["error"] = record["error"]
    return dict(record, history=record.get("history", []) + [entry],
                variant={**record.get("variant", {}), variant.macro: variant.type})


def _breakpoint(stream, where):
    for record in stream:
        yield dict(record, breakpoint=where) if records.is_ok(record) else record


def _retry(record):
    """A KO record back to OK for a replay; its history keeps the failure."""
    out = dict(record, status=records.OK, retries=record.get("retries", 0) + 1)
    out.pop("error", None)
    return out
