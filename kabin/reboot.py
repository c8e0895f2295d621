"""Reboot and power the nodes: escalation levels, reboot windows, boot checks.

A node's levels come from its cluster's remote operations (``reboot``,
``power_on``, ``power_off``; per-node overrides first), each of type ``ssh``
(a command run on the node), ``ipmi`` (through kabin.power) or ``command`` (a
template run here, through kabin.power). ``--level soft,hard,very_hard`` names
the levels tried, in order; a node moves to the next one when the command
fails OR when the node does not go down and come back in time, all within one
deadline per node. The record's ``level`` says which level worked; ``attempts``
lists why the others did not.

Seeing a node go down: before a level acts, a TCP connection is opened to the
node's SSH port and held (with TCP keepalives): its end (FIN, reset, or
keepalives unanswered) is the event that the node went down, whatever the
level's type. A level that acts on a node that keeps that connection did
nothing (a BMC that lies about a cycle, a reboot command that hung): the node
goes to the next level. When the port was closed before the level, its opening
afterwards is the change we wait for.

Seeing a node come back (``wait``): after the cluster's
``sleep_time_before_ping``, probes (a TCP connect with a 1 s timeout, at most
the check window's size at once) every second until the node shows the wanted
state: ``deploy`` (port 22 and the marker port open), ``system`` (22 open, the
marker closed), ``any`` (22 open), or ``none`` (no wait: the command's success
is enough).

Reboot windows: at most ``reboot_window.size`` level commands at once, groups
spaced by ``sleep_time`` (kabin.parallel.Window). Timeouts: a node has the
cluster's ``timeouts.reboot`` (``timeouts.kexec`` after a kexec, evaluated for
n = the nodes read so far) to go down and come back after each level's command;
the per-node deadline (default: the sum of the levels' budgets) starts at the
node's first command, so waiting for the first window does not count.
"""

import dataclasses
import logging
import math
import select
import shlex
import socket
import threading
import time
from dataclasses import dataclass

from . import power as power_mod
from . import records
from .config import RemoteOp, eval_timeout
from .errors import KabinError, UsageError
from .parallel import Deadline, Executor, Window
from .ssh import STOP_CHECK, ConnectionLost, SshError, SshPool, set_keepalive

log = logging.getLogger(__name__)
progress = logging.getLogger("kabin.progress")

STEP = "reboot"
POWER_STEP = "power"
WAIT_MODES = ("deploy", "system", "any", "none")
WAIT_WHAT = {"deploy": "deployment environment", "system": "deployed system", "any": "SSH"}
OPERATIONS = ("reboot", "power_on", "power_off")
PROBE_TIMEOUT = 1.0            # one probe: a TCP connect bounded by this
PROBE_INTERVAL = 1.0           # between two probes of the same node
COMMAND_TIMEOUT = 30.0         # an SSH or template command of a level
IN_FLIGHT = 1024               # nodes handled at once: they mostly wait (windows bound the work)
KEEPALIVE = (1, 1, 3)          # idle, interval, count: a silent node is seen gone in ~4 s
UNREACHABLE = "Unreachable after the reboot"


# ---------------------------------------------------------------- pure logic

def parse_levels(text):
    """``"soft,hard"`` -> ``("soft", "hard")``; each name once."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise UsageError("--level: give at least one level name (e.g. soft,hard,very_hard)")
    if len(set(names)) != len(names):
        raise UsageError(f"--level {text!r}: a level is named twice")
    return names


def plan(config, node, operation, names=None, kexec=None):
    """The levels tried for ``node``, in order: kexec first when asked, then ``names``.

    ``names`` None means every configured level of the operation. Raises
    UsageError when no level applies.
    """
    configured = config.remoteops(node, operation)
    if names is None:
        levels = list(configured) if kexec is None else []
    else:
        by_name = {op.name: op for op in configured}
        levels = [by_name[n] for n in names if n in by_name]
        if not levels and kexec is None:
            known = ", ".join(by_name) or "none"
            raise UsageError(f"no level {'/'.join(names)} for {operation} on {node} "
                             f"(configured: {known})")
    if kexec is not None:
        levels.insert(0, kexec.level())
    if not levels:
        raise UsageError(f"no {operation} level configured for {node}")
    return tuple(levels)


def window_schedule(count, size, sleep_time):
    """Start offsets of the reboot window groups for ``count`` nodes (the fastest schedule)."""
    return [group * sleep_time for group in range(math.ceil(count / size))]


def schedule_lower_bound(count, size, sleep_time):
    """The least time before the last group of ``count`` nodes may start."""
    return (math.ceil(count / size) - 1) * sleep_time if count else 0.0


@dataclass(frozen=True)
class Kexec:
    """Reboot by kexec from the running Linux: files are paths on the node."""

    kernel: str
    initrd: str | None = None
    append: str | None = None

    def command(self):
        words = ["kexec", "-l", self.kernel]
        if self.initrd:
            words.append(f"--initrd={self.initrd}")
        if self.append is not None:
            words.append(f"--append={self.append}")
        return " ".join(shlex.quote(w) for w in words) + " && kexec -e"

    def level(self):
        return RemoteOp(name="kexec", type="ssh", cmd=self.command())


def level_budget(op, boot_timeout, sleep_before_ping, command_timeout):
    """The time one level may take: its command, its own wait, going down and coming back."""
    return command_timeout + op.wait + sleep_before_ping + boot_timeout


# ---------------------------------------------------------------- going down, coming back

class Sentinel:
    """A TCP connection held to a node's SSH port across a level: its end means the node is down."""

    def __init__(self, address, port):
        self.address, self.port = address, port
        self.sock = self._connect()

    def _connect(self):
        try:
            sock = socket.create_connection((self.address, self.port), PROBE_TIMEOUT)
        except OSError:
            return None  # the port is closed: its opening will be the sign
        set_keepalive(sock, *KEEPALIVE)
        sock.setblocking(False)
        return sock

    @property
    def held(self):
        return self.sock is not None

    def wait_down(self, deadline, stop):
        """True once the node is gone; False at the deadline (the node stayed up)."""
        while not stop.is_set() and self.sock is not None:
            remaining = deadline.remaining()
            if remaining <= 0:
                return False
            readable, _, _ = select.select([self.sock], [], [], min(remaining, STOP_CHECK))
            ended = self._ended() if readable else None
            if ended == "lost":
                self.close()
                return True
            if ended == "closed":
                self.sock.close()
                # sshd also drops idle unauthenticated clients (LoginGraceTime): a node
                # that went down has no listener, one that still listens did not go
                if not port_open(self.address, self.port):
                    self.sock = None
                    return True
                self.sock = self._connect()
        return self.sock is None

    def _ended(self):
        """None (still open), 'closed' (EOF: sshd closed it, or died) or 'lost' (reset or
        keepalives unanswered: the kernel that held it is gone, e.g. after a kexec or a
        power cycle, even if the new one already listens)."""
        try:
            return None if self.sock.recv(4096) else "closed"   # the banner, then EOF
        except BlockingIOError:
            return None
        except OSError:
            return "lost"

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def port_open(address, port, timeout=PROBE_TIMEOUT):
    """One probe: does a TCP connect succeed within ``timeout``?"""
    try:
        with socket.create_connection((address, port), timeout):
            return True
    except OSError:
        return False


def booted(address, ssh_port, marker_port, mode):
    """Does the node at ``address`` run what ``mode`` asks for (one round of probes)?"""
    if not port_open(address, ssh_port):
        return False
    if mode == "any":
        return True
    return port_open(address, marker_port) == (mode == "deploy")


class BootCheck:
    """Probes nodes until they booted the wanted system; at most ``size`` probes at once."""

    def __init__(self, config, mode, stop):
        if mode not in WAIT_MODES:
            raise UsageError(f"--wait must be one of {', '.join(WAIT_MODES)}")
        self.config, self.mode, self.stop = config, mode, stop
        self._slots = threading.BoundedSemaphore(config.server.check_window.size)

    def wait(self, node, deadline):
        """True once ``node`` shows the wanted state, False at the deadline."""
        cfg = self.config.node(node)
        marker = self.config.server.deploy_marker_port
        while not self.stop.is_set():
            if not self._slots.acquire(timeout=deadline.remaining()):
                return False
            try:
                if booted(cfg.address, cfg.ssh_port, marker, self.mode):
                    return True
            finally:
                self._slots.release()
            if deadline.expired or self.stop.wait(min(PROBE_INTERVAL, deadline.remaining())):
                return False
        return False


# ---------------------------------------------------------------- the levels of one node

class LevelFailed(KabinError):
    """One level did not work on a node; the message says why."""


class _OutOfTime(LevelFailed):
    """The node's deadline passed before the level could act."""


@dataclass
class Options:
    """How ``Rebooter`` works; a field left None takes its value from the configuration.

    ``operation``: reboot, power_on, power_off or power_status. ``to_argv()`` is
    the equivalent ka-reboot command line.
    """

    operation: str = "reboot"
    levels: tuple | None = None          # level names (None: all configured)
    wait: str = "any"
    kexec: Kexec | None = None
    boot_timeout: float | None = None     # per level (default: the cluster's timeouts)
    deadline: float | None = None         # per node (default: the sum of its levels' budgets)
    command_timeout: float = COMMAND_TIMEOUT
    running: str = "system"               # what the nodes run: the SSH levels' known hosts
    fanout: int | None = None             # nodes in flight (default: IN_FLIGHT)
    step: str | None = None               # the records' step (default: reboot or power)

    @property
    def step_name(self):
        return self.step or self.default_step

    @property
    def default_step(self):
        return STEP if self.operation == "reboot" else POWER_STEP

    def to_argv(self):
        """The ka-reboot command line doing the same."""
        if self.operation == "reboot":
            argv = ["ka-reboot"]
        else:
            argv = ["ka-reboot", "power", self.operation.split("_", 1)[1]]
        if self.step and self.step != self.default_step:
            argv.append(f"--step={self.step}")
        if self.levels:
            argv.append(f"--level={','.join(self.levels)}")
        if self.kexec:
            argv.append(f"--kexec={self.kexec.kernel}")
            argv += [f"--initrd={self.kexec.initrd}"] if self.kexec.initrd else []
            argv += [f"--append={self.kexec.append}"] if self.kexec.append is not None else []
        if self.operation in ("reboot", "power_on"):
            argv.append(f"--wait={self.wait}")
        for flag, value in (("--timeout", self.boot_timeout), ("--deadline", self.deadline)):
            if value is not None:
                argv.append(f"{flag}={value:g}")
        if self.command_timeout != COMMAND_TIMEOUT:
            argv.append(f"--command-timeout={self.command_timeout:g}")
        if self.running != ("deploy" if self.kexec else "system"):
            argv.append(f"--running={self.running}")
        if self.fanout:
            argv.append(f"--fanout={self.fanout}")
        return argv


class Rebooter:
    """Runs an operation (reboot, power_on, power_off) on a stream of records."""

    def __init__(self, config, options=None, stop=None):
        self.config, self.options = config, options or Options()
        if self.options.operation not in OPERATIONS:
            raise UsageError(f"unknown operation {self.options.operation!r}")
        self.executor = Executor(self.options.fanout or IN_FLIGHT, stop)
        self.stop = self.executor.stop
        window = config.server.reboot_window
        self.window = Window(window.size, window.sleep_time, self.stop)
        self.check = BootCheck(config, self.options.wait, self.stop)
        self.pool = SshPool(config, self.options.running, self.stop)
        self.power = power_mod.Power(config, command_timeout=self.options.command_timeout,
                                     stop=self.stop)
        self.step = self.options.step_name
        self._lock = threading.Lock()
        self._seen = 0

    def run(self, items):
        """Yield each node's record as soon as its fate is known (KO records pass at once)."""
        try:
            yield from self.executor.map_records(self._count(items), self.node, self.step)
        finally:
            self.pool.close()
            self.power.close()

    def _count(self, items):
        for record in items:
            if records.is_ok(record):
                with self._lock:
                    self._seen += 1
            yield record

    def _boot_timeout(self, node, op):
        if self.options.boot_timeout:
            return self.options.boot_timeout
        timeouts = self.config.cluster_of(node).timeouts
        expression = timeouts["kexec"] if op.name == "kexec" else timeouts["reboot"]
        with self._lock:
            return eval_timeout(expression, max(self._seen, 1))

    def _sleep_before_ping(self, node):
        return self.config.cluster_of(node).boot.sleep_time_before_ping

    def _deadline(self, node, levels):
        if self.options.deadline:
            return self.options.deadline
        pause = self._sleep_before_ping(node)
        return sum(level_budget(op, self._boot_timeout(node, op), pause,
                                self.options.command_timeout) for op in levels)

    def node(self, record):
        """Try the node's levels in order; its OK record names the level that worked."""
        node, start = record["node"], time.monotonic()
        levels = plan(self.config, node, self.options.operation, self.options.levels,
                      self.options.kexec)
        deadline, attempts = _NodeDeadline(self._deadline(node, levels)), []
        for op in levels:
            if deadline.started and deadline.expired:
                break
            try:
                self._level(node, op, deadline)
            except _OutOfTime:
                break
            except LevelFailed as exc:
                attempts.append({"level": op.name, "error": str(exc)})
                log.info("%s: level %s failed: %s", node, op.name, exc)
                self.pool.forget(node)
                continue
            progress.info("%s: %s done (level %s)", node, self.options.operation, op.name)
            extra = {"attempts": attempts} if attempts else {}
            return records.ok(record, self.step, time.monotonic() - start, level=op.name, **extra)
        return records.ko(record, self.step, self._reason(attempts, levels, deadline),
                          time.monotonic() - start, attempts=attempts)

    def _reason(self, attempts, levels, deadline):
        """Kadeploy's words: "Unreachable after the reboot", "Timeout in the reboot step"."""
        tried = ", ".join(a["level"] for a in attempts) or "none"
        if len(attempts) < len(levels) or deadline.expired:
            return (f"Timeout in the {self.options.operation} step after "
                    f"{deadline.seconds:.0f} s (levels tried: {tried})")
        last = attempts[-1]
        if last["error"].startswith(UNREACHABLE):
            return f"{UNREACHABLE} (levels tried: {tried})"
        return f"{last['level']}: {last['error']}"

    def _level(self, node, op, deadline):
        """One level: act (in a window), then see the node go down and come back.

        ``deadline`` starts running at the node's first command. Raises LevelFailed.
        """
        cfg = self.config.node(node)
        sentinel = None
        try:
            with self.window:
                deadline.start()
                if deadline.expired:
                    raise _OutOfTime()
                if self._watches_going_down():
                    sentinel = Sentinel(cfg.address, cfg.ssh_port)
                self._act(node, op, deadline)
            self._settle(node, op, sentinel, deadline)
        finally:
            if sentinel is not None:
                sentinel.close()

    def _watches_going_down(self):
        operation = self.options.operation
        return operation == "power_off" or (operation == "reboot" and self.options.wait != "none")

    def _act(self, node, op, deadline):
        if self.stop.is_set():
            raise LevelFailed("interrupted")
        if op.type == "ssh":
            return self._ssh_command(node, op.cmd, deadline)
        action = power_mod.level_action(self.options.operation, op)
        if action == "status":
            raise LevelFailed(f"this level reads the power: it cannot {self.options.operation}")
        try:
            self.power.act(node, action, op, _bounded(deadline, self.options.command_timeout))
        except KabinError as exc:
            raise LevelFailed(str(exc)) from None

    def _ssh_command(self, node, command, deadline):
        """Run the level's command on the node: a dropped connection or a hang are fine."""
        timeout = min(self.options.command_timeout, deadline.remaining())
        if timeout <= 0:
            raise _OutOfTime()
        try:
            result = self.pool.run(node, command, timeout)
        except ConnectionLost:
            return   # the node went down under the command: what we asked for
        except SshError as exc:
            raise LevelFailed(str(exc)) from None
        if result.rc not in (0, None):   # None: still running as the node goes down
            raise LevelFailed(f"{command.split()[0]}: {result.error()}")

    def _settle(self, node, op, sentinel, deadline):
        """After the command: the node must go down (if we saw it up), then come back."""
        boot = Deadline(min(self._boot_timeout(node, op), deadline.remaining()))
        if sentinel is not None and sentinel.held and not sentinel.wait_down(boot, self.stop):
            raise LevelFailed(f"the node did not go down within {boot.seconds:.0f} s")
        if self.options.operation == "power_off" or self.options.wait == "none":
            return
        if self.stop.wait(min(self._sleep_before_ping(node), boot.remaining())):
            raise LevelFailed("interrupted")
        if not self.check.wait(node, boot):
            raise LevelFailed(f"{UNREACHABLE} ({WAIT_WHAT[self.options.wait]} not up within "
                              f"{boot.seconds:.0f} s)")


class _NodeDeadline(Deadline):
    """A node's deadline, which starts running at its first command (not in the window queue)."""

    def __init__(self, seconds):
        super().__init__(seconds)
        self.started = False

    def start(self):
        if not self.started:
            self.end, self.started = time.monotonic() + self.seconds, True


def _bounded(deadline, seconds):
    """A deadline that ends at ``seconds`` from now or at ``deadline``, whichever comes first."""
    return Deadline(min(seconds, deadline.remaining()))


# ---------------------------------------------------------------- entry points

def run(config, items, options=None, stop=None):
    """Do ``options.operation`` on the OK records' nodes; yield records in completion order."""
    options = options or Options()
    if options.operation == "power_status":
        return _power_status(config, items, options, stop)
    return Rebooter(config, options, stop).run(items)


def power_options(action, options=None):
    """``options`` for ``power on|off|status`` (on/off wait for nothing unless told)."""
    if action not in ("on", "off", "status"):
        raise UsageError(f"unknown power action {action!r}: use on, off or status")
    return dataclasses.replace(options or Options(wait="none"), operation=f"power_{action}")


def _power_status(config, items, options, stop):
    """Read each node's power state: field ``power`` = on | off.

    Each node has ``options.deadline`` (default: ``command_timeout``) for it,
    BMC retries included.
    """
    executor = Executor(options.fanout or config.server.fanout, stop)
    pw = power_mod.Power(config, command_timeout=options.command_timeout, stop=executor.stop)
    step = options.step_name

    def work(record):
        deadline = Deadline(options.deadline or options.command_timeout)
        result = pw.result(record["node"], "status", "power_status", deadline)
        return result.record(record, step)
    try:
        yield from executor.map_records(items, work, step)
    finally:
        pw.close()
