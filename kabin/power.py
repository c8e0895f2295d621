"""Power backends for ka-reboot: one interface, several backends (as pyghmi, fence agents).

A backend acts on one node's power (``act(node, action, deadline)``, action one of
on/off/cycle/reset) and may read it (``status(node, deadline) -> "on"|"off"``):

- ``IpmiBackend``: pyghmi's IPMI 2.0 client on the node's BMC (``NodeConfig.bmc``).
  One session per BMC, opened on first use and reused by every call of the
  backend (a second pyghmi session to the same BMC can hang); user and password
  are passed as bytes. Each BMC request has its own deadline (pyghmi's client can
  hang: it runs in a thread we stop waiting for) and is retried with backoff
  when the BMC does not answer. A BMC refusing the credentials is not retried.
- ``CommandBackend``: a shell command template (a PDU, a fence agent, ipmitool):
  ``HOSTNAME_FQDN``, ``HOSTNAME_SHORT``, ``{node}``, ``{address}``, ``{bmc}`` and
  ``{action}`` are replaced by ``shlex.quote``-d values, so a node name can never
  inject a command. Its ``status`` reads the last word of the output (on/off).

``Power`` ties them to a Config. Every action but ``status`` reads the power back
through the backend (IPMI only; a command template cannot be asked): a BMC that
answers "done" but leaves the power unchanged raises ``PowerNotApplied``. Note
that after a cycle or a reset the expected state is "on", which is also the state
before: a BMC lying about a cycle is only caught by the boot check that follows
(kabin.reboot), while off / on / off_on catch it here.

Interface for kabin.reboot (which runs the SSH levels itself)::

    with power.Power(config, stop=stop_event) as pw:
        # one node, one level of config.remoteops(node, "reboot") (type ipmi or command):
        state = pw.act("node-3", power.level_action("reboot", op), op=op, deadline=deadline)
        # -> "on"/"off"/None (command levels), or raises PowerError (a KabinError) saying why
        result = pw.result("node-3", "status", "power_status", deadline)  # never raises
        record = result.record(record)                     # PowerResult -> record (field power)
        for result in pw.run(names, "status"):          # many nodes: bounded fanout, deadline
            ...

    power.power_status(config, names) / power.run_power(config, names, action) -> [PowerResult]

Actions: on, off, cycle, reset, off_on (off, read back, wait ``op.wait``, on), status.
A cycle or reset of a node that is off (a BMC answers "not in present state")
powers it on. pyghmi is imported on first use: ``--help`` stays fast.

Known limit (pyghmi's): a process has one session per BMC, which pyghmi hands to
every new client of that BMC. A BMC that restarts while we hold a session forgets
it; pyghmi logs in again only after ~20 s, and until then requests to that BMC
fail as BmcUnreachable (bounded by our deadlines).
"""

import logging
import os
import queue
import re
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

from . import parallel, records
from .errors import Interrupted, KabinError, UsageError
from .parallel import Deadline

log = logging.getLogger(__name__)

ACTIONS = ("on", "off", "cycle", "reset", "off_on", "status")
RUN_TIMEOUT = 60.0          # default deadline of a whole run
_CHASSIS_CONTROL = {"off": 0, "on": 1, "cycle": 2, "reset": 3}
_EXPECTED_STATE = {"off": "off", "on": "on", "cycle": "on", "reset": "on"}
_LEVEL_ACTION = {"reboot": "cycle", "power_on": "on", "power_off": "off", "power_status": "status"}
_NOT_IN_PRESENT_STATE = 0xD5
_NO_ANSWER = 0xFFFF         # pyghmi's code for a request that timed out
# pyghmi's words for refused credentials ("privelege" is its spelling): no retry
_REFUSED_WORDS = ("password", "unauthorized", "privelege", "role")


class PowerError(KabinError):
    """A power action failed on a node; the message says why."""


class BmcUnreachable(PowerError):
    """The BMC did not answer in time, even after retries."""


class BmcRefused(PowerError):
    """The BMC answered with an error (credentials, completion code)."""


class PowerNotApplied(PowerError):
    """The BMC said "done" but the power state did not change."""


class PowerCommandFailed(PowerError):
    """A command template failed, timed out or printed no power state."""


def level_action(operation, op):
    """The action a remote-operation level performs: its own, or its operation's."""
    return (op.action if op is not None else None) or _LEVEL_ACTION[operation]


# ---------------------------------------------------------------- IPMI

def _bounded(fn, timeout):
    """``fn()`` in a thread, waited for at most ``timeout`` s (pyghmi can hang).

    On timeout the thread is left to finish on its own (pyghmi's own retries end
    it) and its result is discarded. Returns ``(True, value)``, or ``(False, None)``
    on timeout; an exception of ``fn`` is raised here.
    """
    box = queue.SimpleQueue()

    def run():
        try:
            box.put((fn(), None))
        except Exception as exc:  # handed over to the caller's thread, raised there
            box.put((None, exc))

    threading.Thread(target=run, daemon=True, name="kabin-ipmi-call").start()
    try:
        value, error = box.get(timeout=timeout)
    except queue.Empty:
        return False, None
    if error is not None:
        raise error
    return True, value


class _Transient(Exception):
    """A BMC request that may work if tried again (no answer, session lost)."""


class IpmiBackend:
    """Chassis power through each node's BMC, one pyghmi session per BMC."""

    reads_state = True

    def __init__(self, timeout=5.0, retries=2, backoff=0.5, stop=None):
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.stop = stop or threading.Event()
        self._lock = threading.Lock()
        self._sessions = {}     # BMC key -> pyghmi Command, logged in
        self._bmc_locks = {}    # BMC key -> lock: one request at a time per session
        self._passwords = {}    # Secret -> bytes

    def act(self, node, action, deadline):
        control = _CHASSIS_CONTROL[action]
        code = self._request(node, f"power {action}", 2, [control], deadline)["code"]
        if code == _NOT_IN_PRESENT_STATE and action in ("cycle", "reset"):
            code = self._request(node, "power on", 2, [_CHASSIS_CONTROL["on"]], deadline)["code"]
        if code:
            raise BmcRefused(f"BMC {_where(node.bmc)} refused power {action} "
                             f"(completion code {code:#04x})")

    def status(self, node, deadline):
        response = self._request(node, "power status", 1, [], deadline)
        if response["code"] or not response["data"]:
            raise BmcRefused(f"BMC {_where(node.bmc)} refused power status "
                             f"(completion code {response['code']:#04x})")
        return "on" if response["data"][0] & 1 else "off"

    def _request(self, node, what, command, data, deadline):
        """One chassis request (netfn 0), retried with backoff while the BMC is silent."""
        bmc = node.bmc
        if bmc is None:
            raise PowerError("no BMC in the configuration for this node")
        key = (bmc.address, bmc.port, bmc.user)
        lock = self._bmc_lock(key)
        if not lock.acquire(timeout=deadline.remaining()):
            raise BmcUnreachable(f"BMC {_where(bmc)}: busy until the deadline ({what})")
        try:
            attempts = 0
            while attempts <= self.retries:
                if attempts:
                    self._pause(self.backoff * 2 ** (attempts - 1), deadline)
                timeout = min(self.timeout, deadline.remaining())
                if timeout <= 0:
                    break
                attempts += 1
                try:
                    return self._call(key, bmc, command, data, timeout)
                except _Transient as exc:
                    log.debug("BMC %s: %s: %s (attempt %d)", _where(bmc), what, exc, attempts)
            raise BmcUnreachable(f"BMC {_where(bmc)}: no answer to {what} "
                                 f"({attempts} attempt{'s' if attempts != 1 else ''}, "
                                 f"{self.timeout:g} s each)")
        finally:
            lock.release()

    def _call(self, key, bmc, command, data, timeout):
        """Log in if needed, send one request; a session that failed is forgotten."""
        with self._lock:
            session = self._sessions.get(key)
        password = self._password(bmc)
        try:
            done, result = _bounded(lambda: _raw(session, bmc, password, command, data), timeout)
        except _Transient:
            self._forget(key)
            raise
        if not done:
            self._forget(key)
            raise _Transient(f"no answer within {timeout:g} s")
        session, response = result
        if response.get("code") == _NO_ANSWER or "error" in response and "code" not in response:
            self._forget(key)
            raise _Transient(response.get("error", "no answer"))
        with self._lock:
            self._sessions[key] = session
        return response

    def _password(self, bmc):
        with self._lock:
            if bmc.password not in self._passwords:
                self._passwords[bmc.password] = bmc.password.read().encode()
            return self._passwords[bmc.password]

    def _bmc_lock(self, key):
        with self._lock:
            return self._bmc_locks.setdefault(key, threading.Lock())

    def _forget(self, key):
        with self._lock:
            self._sessions.pop(key, None)

    def _pause(self, seconds, deadline):
        if self.stop.wait(min(seconds, deadline.remaining())):
            raise Interrupted("interrupted")

    def close(self, timeout=2.0):
        """Log out of every BMC (Close Session is not waited for by pyghmi)."""
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}

        def logout_all():
            for session in sessions:
                session.ipmi_session.logout()
        if sessions and not _bounded(logout_all, timeout)[0]:
            log.debug("logging out of %d BMCs took more than %g s", len(sessions), timeout)


def _raw(session, bmc, password, command, data):
    """In the bounded thread: (session, response); IPMI errors become exceptions."""
    from pyghmi import exceptions
    ipmi_command = _ipmi_client()
    try:
        if session is None:
            session = ipmi_command.Command(bmc=bmc.address, userid=bmc.user.encode(),
                                           password=password, port=bmc.port)
        return session, session.raw_command(netfn=0, command=command, data=data)
    except exceptions.IpmiException as exc:
        message = str(exc)
        if any(word in message.lower() for word in _REFUSED_WORDS):
            raise BmcRefused(f"BMC {_where(bmc)} refused the credentials: {message}") from None
        raise _Transient(message) from None
    except (OSError, KeyError, AttributeError, TypeError, ValueError) as exc:
        # pyghmi's session code fails this way when a BMC restarts or answers oddly:
        # a failed request like any other, tried again, not a bug of ours
        log.debug("BMC %s: pyghmi failed", _where(bmc), exc_info=exc)
        raise _Transient(f"{type(exc).__name__}: {exc}") from None


def _ipmi_client():
    """pyghmi's command module, with its two session-table locks made one.

    pyghmi takes KEEPALIVE_SESSIONS then WAITING_SESSIONS when it sends, and the
    reverse when a request times out: two threads doing both at once deadlock
    every BMC call of the process for good. One reentrant lock cannot be taken in
    two orders.
    """
    from pyghmi.ipmi import command
    from pyghmi.ipmi.private import session

    session.KEEPALIVE_SESSIONS = session.WAITING_SESSIONS
    return command


def _where(bmc):
    return bmc.address if bmc.port == 623 else f"{bmc.address}:{bmc.port}"


# ---------------------------------------------------------------- command templates

_PLACEHOLDER = re.compile(r"\{(?:node|address|bmc|action)\}|HOSTNAME_FQDN|HOSTNAME_SHORT")


def fill_template(template, node, action=None):
    """``template`` with the node's values, each shell-quoted (no injection possible)."""
    values = {
        "{node}": node.name, "HOSTNAME_FQDN": node.name, "HOSTNAME_SHORT": node.name.split(".")[0],
        "{address}": node.address, "{bmc}": node.bmc.address if node.bmc else None,
        "{action}": action,
    }

    def quoted(match):
        value = values[match.group(0)]
        if value is None:
            raise PowerError(f"the command template uses {match.group(0)}, "
                             "which this node does not have")
        return shlex.quote(value)
    return _PLACEHOLDER.sub(quoted, template)


class CommandBackend:
    """A shell command template run on the frontend (a PDU, a fence agent...)."""

    reads_state = False  # the one template does the level's job; it cannot be asked the state

    def __init__(self, template, timeout=30.0):
        self.template, self.timeout = template, timeout

    def act(self, node, action, deadline):
        self._run(node, action, deadline)

    def status(self, node, deadline):
        output = self._run(node, "status", deadline).split()
        state = output[-1].lower() if output else ""
        if state not in ("on", "off"):
            raise PowerCommandFailed("the status command printed no power state "
                                     f"(expected a last word on or off, got {state!r})")
        return state

    def _run(self, node, action, deadline):
        command = fill_template(self.template, node, action)
        timeout = min(self.timeout, deadline.remaining())
        log.debug("%s: running %s", node.name, command)
        proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the whole pipeline goes
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
            raise PowerCommandFailed(f"the {action} command timed out after {timeout:g} s") \
                from None
        if proc.returncode != 0:
            lines = err.strip().splitlines()
            detail = f": {lines[-1][:200]}" if lines else ""
            raise PowerCommandFailed(f"the {action} command exited with status "
                                     f"{proc.returncode}{detail}")
        return out


# ---------------------------------------------------------------- actions on a config's nodes

@dataclass
class PowerResult:
    node: str
    ok: bool
    state: str | None       # "on" / "off" as read back; None when not read
    error: str | None
    time: float
    level: str | None = None

    def record(self, record, step="power"):
        """``record`` with this result appended (fields ``power`` and ``level``)."""
        fields = {k: v for k, v in (("power", self.state), ("level", self.level)) if v is not None}
        if self.ok:
            return records.ok(record, step, self.time, **fields)
        return records.ko(record, step, self.error, self.time, **fields)


class Power:
    """Power actions on the nodes of one Config; use it as a context manager.

    ``settle``: how long a changed power state may take to show after the BMC
    said "done"; ``bmc_timeout``, ``retries``, ``backoff``: per BMC request;
    ``command_timeout``: per command template run.
    """

    def __init__(self, config, *, bmc_timeout=5.0, retries=2, backoff=0.5, settle=5.0,
                 command_timeout=30.0, stop=None):
        self.config, self.settle, self.command_timeout = config, settle, command_timeout
        self.stop = stop or threading.Event()
        self.ipmi = IpmiBackend(bmc_timeout, retries, backoff, self.stop)

    def backend(self, op=None):
        """The backend of a remote-operation level (IPMI when ``op`` is None)."""
        if op is None or op.type == "ipmi":
            return self.ipmi
        if op.type == "command":
            return CommandBackend(op.cmd, self.command_timeout)
        raise UsageError(f"level {op.name!r} is of type {op.type}: "
                         "SSH levels are run by kabin.reboot")

    def act(self, node, action, op=None, deadline=None):
        """Do ``action`` on ``node``; the power state read back ("on"/"off"/None)."""
        if action not in ACTIONS:
            raise UsageError(f"unknown power action {action!r}: use {', '.join(ACTIONS)}")
        node = self.config.node(node)
        deadline = deadline or Deadline(RUN_TIMEOUT)
        backend = self.backend(op)
        if action == "status":
            return backend.status(node, deadline)
        if action == "off_on":
            self._switch(backend, node, "off", deadline)
            if self.stop.wait(min(op.wait if op else 0.0, deadline.remaining())):
                raise Interrupted("interrupted")
            action = "on"
        return self._switch(backend, node, action, deadline)

    def _switch(self, backend, node, action, deadline):
        backend.act(node, action, deadline)
        if not backend.reads_state:
            return None
        return self._read_back(backend, node, action, deadline)

    def _read_back(self, backend, node, action, deadline):
        """Wait (bounded by ``settle``) for the state the action should give.

        There is no event to wait for on a remote power state: ask again after
        growing pauses (0.1 s, 0.2 s, ... at most 1 s).
        """
        expected, settled = _EXPECTED_STATE[action], Deadline(self.settle)
        start, pause = time.monotonic(), 0.1
        while True:
            state = backend.status(node, deadline)
            if state == expected or settled.expired or deadline.expired:
                break
            if self.stop.wait(min(pause, settled.remaining(), deadline.remaining())):
                raise Interrupted("interrupted")
            pause = min(pause * 2, 1.0)
        if state != expected:
            raise PowerNotApplied(f"BMC {_where(node.bmc)} answered 'done' to power {action} "
                                  f"but the power is still {state} after "
                                  f"{time.monotonic() - start:.1f} s")
        return state

    def level(self, name, operation):
        """The first level of ``operation`` for ``name`` that is not SSH (None: plain IPMI)."""
        return next((op for op in self.config.remoteops(name, operation) if op.type != "ssh"), None)

    def result(self, name, action=None, operation=None, deadline=None):
        """``act`` as a PowerResult (never raises for a node's failure).

        With ``operation`` (e.g. "power_status"), the node's first non-SSH level of
        it is used, and its action unless ``action`` is given.
        """
        start, op = time.monotonic(), None
        try:
            if self.stop.is_set():
                raise Interrupted("interrupted")
            if deadline is not None and deadline.expired:
                raise PowerError("the deadline passed before this node's turn")
            if operation:
                op = self.level(name, operation)
                action = action or level_action(operation, op)
            state = self.act(name, action, op, deadline)
            return PowerResult(name, True, state, None, time.monotonic() - start, _name(op))
        except KabinError as exc:
            return PowerResult(name, False, None, str(exc), time.monotonic() - start, _name(op))

    def run(self, names, action=None, operation=None, timeout=RUN_TIMEOUT, fanout=None):
        """``result`` for many nodes at once, yielded as they complete, within ``timeout``."""
        names = list(dict.fromkeys(names))
        deadline = Deadline(timeout)
        executor = parallel.Executor(fanout or self.config.server.fanout)
        pending = set(names)
        try:
            for name, result, exc in executor.imap(
                    lambda n: self.result(n, action, operation, deadline), names,
                    timeout + self.ipmi.timeout + 1.0):
                pending.discard(name)
                yield result if exc is None else _internal_error(name, exc)
        except GeneratorExit:  # the consumer gave up: start no more actions
            self.stop.set()
            executor.stop.set()
            raise
        for name in sorted(pending):  # only if a backend overran its own bounds
            yield PowerResult(name, False, None, "no result before the deadline", timeout)

    def close(self):
        self.ipmi.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _name(op):
    return op.name if op is not None else None


def _internal_error(name, exc):
    log.error("%s: unexpected error in a power action", name, exc_info=exc)
    return PowerResult(name, False, None, f"internal error: {type(exc).__name__}: {exc}", 0.0)


def run_power(config, names, action=None, operation=None, timeout=RUN_TIMEOUT, fanout=None,
              stop=None, **options):
    """Do ``action`` on ``names`` (see ``Power.run``); the list of PowerResult."""
    with Power(config, stop=stop, **options) as power:
        return list(power.run(names, action, operation, timeout, fanout))


def power_status(config, names, timeout=RUN_TIMEOUT, fanout=None, stop=None, **options):
    """The power state of ``names`` through their ``power_status`` level (IPMI by default)."""
    return run_power(config, names, "status", "power_status", timeout, fanout, stop, **options)


# ---------------------------------------------------------------- as a job

def run(config, items, options, stop=None):
    """``ka-reboot power on|off|status`` as a library call: ``options`` is a ``power.Options``
    (``reboot.Options`` whose operation is power_on, power_off or power_status: see
    ``reboot.power_options``)."""
    from . import reboot
    return reboot.run(config, items, options, stop)


def __getattr__(name):
    if name == "Options":  # reboot imports this module: its Options is found when asked for
        from .reboot import Options
        return Options
    raise AttributeError(name)
