"""The supervisor of a testbed instance: power, boots, BMCs and faults, in one process.

``ka-testbed up`` starts it as ``python -m kabin.testbed.supervisor INSTANCE_DIR
READY_FD`` (in the frontend's network namespace for the netns tier), and it runs
until ``ka-testbed down``. One thread runs the event loop (epoll: nodes ending,
node consoles, timers); the BMC thread (bmc.py) and the control
socket's threads (control.py) call in under one lock. Only the loop thread starts
node processes, because their parent-death signal is tied to that thread.

A node's life: power on -> ``booting`` for the boot delay -> its firmware reads
the PXE profile (boot.py) -> ``deploy`` or ``system`` once its sshd listens, or
``hung`` (with the reason) -> reboot, power off, crash...
"""

import heapq
import itertools
import json
import logging
import os
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .. import config as config_mod
from ..errors import KabinError, UsageError
from . import boot, bmc, control, disks, effects, faults, firmware
from . import layout as layout_mod
from . import node as node_mod
from .faultwork import FaultWork

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 10.0
FILES_PER_NODE = 5     # its console log, its init's output pipe and pidfd, its BMC's socket
UP = ("deploy", "system")


class Node:
    """The state of one node (changed only under the supervisor's lock)."""

    def __init__(self, lay, index, loop):
        self.index, self.name, self.loop = index, lay.node_name(index), loop
        self.address, self.mac = lay.node_address(index), lay.mac(index)
        self.bmc = f"{lay.bmc_address(index)}:{layout_mod.BMC_PORT}"
        self.dir = lay.node_dir(index)
        self.power, self.booted, self.partition, self.detail = False, "off", None, ""
        self.proc = self.pidfd = self.plan = self.init = None
        self.listening = 0
        self.epoch = self.boots = self.boots_since_fault = 0
        self.bootdev = self.kexec = None
        self.faults, self.fault_names = {}, frozenset()
        self.received = {}
        self.console = open(self.dir / "console.log", "ab", buffering=0)

    @property
    def running(self):
        return self.proc is not None and self.booted in UP

    def record(self):
        rec = {"node": self.name, "status": "ok", "address": self.address, "bmc": self.bmc,
               "power": "on" if self.power else "off", "booted": self.booted}
        if self.booted == "system":
            rec["partition"] = self.partition
        if self.detail:
            rec["detail"] = self.detail
        if self.faults:
            rec["faults"] = sorted(self.fault_names)
        rec["boots"] = self.boots
        return rec


class NodeController:
    """What a node's BMC acts on (the interface bmc.py expects); calls return at once."""

    def __init__(self, supervisor, node):
        self._supervisor, self._node = supervisor, node

    @property
    def faults(self):
        return self._node.fault_names

    def power_on(self):
        self._supervisor.power(self._node, "on")

    def power_off(self):
        self._supervisor.power(self._node, "off")

    def reset(self):
        self._supervisor.power(self._node, "reset")

    def cycle(self):
        self._supervisor.power(self._node, "cycle")

    def is_on(self):
        return self._node.power

    def set_bootdev(self, dev):
        self._supervisor.set_bootdev(self._node, dev)


class Supervisor(FaultWork):
    def __init__(self, lay, state):
        self.lay, self.state = lay, state
        self.delay = float(state["boot_delay"])
        self.link_rate = state.get("link_rate")
        self._pxe, self._pxe_stamp = None, None
        self.nodes = [Node(lay, i, state["loops"][lay.node_name(i)]) for i in range(lay.size)]
        self.by_name = {n.name: n for n in self.nodes}
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self._stop = threading.Event()
        self._timers, self._sequence = [], itertools.count()
        self._handlers, self._procs = {}, {}
        self.epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._watch(self._wake_r, lambda mask: self._drain_wake())
        FaultWork.__init__(self)

    # ------------------------------------------------ the event loop

    def _watch(self, fd, handler, mask=select.EPOLLIN):
        self._handlers[fd] = handler
        self.epoll.register(fd, mask)

    def _unwatch(self, fd):
        if self._handlers.pop(fd, None) is not None:
            self.epoll.unregister(fd)

    def _schedule(self, delay, fn, *args):
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._sequence), fn, args))
        self._wake()

    def _wake(self):
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:      # the pipe is full of wake-ups already
            pass

    def _drain_wake(self):
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _next_timeout(self):
        with self.lock:
            if not self._timers:
                return -1
            return max(0.0, self._timers[0][0] - time.monotonic())

    def _loop(self):
        while not self._stop.is_set():
            events = self.epoll.poll(self._next_timeout())
            with self.lock:
                for fd, mask in events:
                    handler = self._handlers.get(fd)
                    if handler is not None:
                        _guarded(handler, mask)
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    _, _, fn, args = heapq.heappop(self._timers)
                    _guarded(fn, *args)

    def stop(self):
        self._stop.set()
        self._wake()

    # ------------------------------------------------ power (any thread)

    def power(self, node, action):
        with self.lock:
            log.info("%s: power %s", node.name, action)
            if action == "on":
                if not node.power:
                    node.power = True
                    self._start_boot(node, self.delay)
            elif action == "off":
                self._kill(node)
                node.power, node.kexec = False, None
                node.epoch += 1
                self._set(node, "off")
            elif action in ("reset", "cycle"):
                if node.power or action == "cycle":
                    self._kill(node)
                    node.power, node.kexec = True, None
                    self._start_boot(node, self.delay)
            else:
                raise UsageError(f"unknown power action {action!r}: on, off, reset or cycle")

    def set_bootdev(self, node, device):
        with self.lock:
            node.bootdev = None if device == "default" else device

    def _kill(self, node):
        """Power the node's hardware down at once: its whole pid namespace goes."""
        if node.proc is not None:
            try:
                signal.pidfd_send_signal(node.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            node.proc = node.init = None
            self.node_stopped(node)

    def _set(self, node, booted, detail="", partition=None):
        node.booted, node.detail, node.partition = booted, detail, partition
        if booted != "booting":
            log.info("%s: %s%s", node.name, booted, f" ({detail})" if detail else "")
        self.changed.notify_all()

    # ------------------------------------------------ boots (loop thread)

    def _start_boot(self, node, delay):
        node.epoch += 1
        self._set(node, "booting")
        self._schedule(delay, self._boot, node, node.epoch)

    def _boot(self, node, epoch):
        if epoch != node.epoch or not node.power:
            return
        node.boots += 1
        hang = self.fault_hang(node)
        kexec, node.kexec = node.kexec, None
        bootdev, node.bootdev = node.bootdev, None
        if hang:
            self._set(node, "hung", hang)
            return
        try:
            pxe_root, http_root, method, naming = self._pxe_settings()
        except KabinError as exc:      # what a DHCP server with a broken configuration does
            self._set(node, "hung", f"no network boot: {exc}")
            return
        name = firmware.profile_name(naming, node.name, node.address, node.mac)
        plan = boot.plan(node.loop, pxe_root, http_root, method, name, kexec, bootdev)
        node.console.write(f"--- boot {node.boots}: {plan.detail}\n".encode())
        if plan.mode is None:
            self._set(node, "hung", plan.detail)
            return
        try:
            self._launch(node, plan)
        except (OSError, subprocess.SubprocessError) as exc:
            log.exception("%s: cannot start the node", node.name)
            self._set(node, "hung", f"the testbed could not start it: {exc}")

    def _pxe_settings(self):
        """(pxe_root, http_root, method, naming) from the instance's configuration, read
        again when it changes: what a DHCP server would tell the nodes' firmware."""
        files = sorted(self.lay.config_dir.glob("*.yml"))
        stamp = [(f.name, f.stat().st_mtime_ns) for f in files]
        if stamp != self._pxe_stamp:
            cfg = config_mod.Config(self.lay.config_dir)
            pxe = next(iter(cfg.clusters.values())).pxe
            self._pxe = (cfg.server.pxe_root, cfg.server.http_root, pxe.method, pxe.naming)
            self._pxe_stamp = stamp
        return self._pxe

    def _launch(self, node, plan):
        node_mod.reset_run(node.dir, "disk-full" in node.faults)
        node_mod.sync_disk_nodes(node.dir / "dev", node.loop, disks.device_number(node.loop),
                                 disks.partitions(node.loop))
        argv = node_mod.launch_argv(self.lay, node.index, plan.mode, plan.partition)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, close_fds=True)
        pidfd = os.pidfd_open(proc.pid)
        node.proc, node.pidfd, node.plan, node.listening = proc, pidfd, plan, 0
        self._procs[pidfd] = proc
        self._watch(pidfd, lambda mask: self._ended(node, proc, pidfd))
        out = proc.stdout.fileno()
        os.set_blocking(out, False)
        partial = [b""]
        self._watch(out, lambda mask: self._console(node, proc, partial))

    def _console(self, node, proc, partial):
        """The node's console (its init's and sshd's output): logged, and scanned for
        sshd's 'Server listening' lines: once all are there, the node is up."""
        out = proc.stdout.fileno()
        try:
            data = os.read(out, 65536)
        except BlockingIOError:
            return
        if not data:
            self._unwatch(out)
            proc.stdout.close()
            return
        node.console.write(data)
        lines = (partial[0] + data).split(b"\n")
        partial[0] = lines.pop()
        if node.proc is proc and node.booted == "booting":
            node.listening += sum(line.startswith(b"Server listening on ") for line in lines)
            if node.listening >= (2 if node.plan.mode == "deploy" else 1):
                node.init = effects.init_pid(proc.pid)
                self._set(node, node.plan.mode, node.plan.detail, node.plan.partition)
                self.node_started(node)

    def _ended(self, node, proc, pidfd):
        proc.wait()
        self._unwatch(pidfd)
        os.close(pidfd)
        del self._procs[pidfd]
        if node.proc is not proc:      # killed on purpose: already dealt with
            return
        node.proc = node.init = None
        self.node_stopped(node)
        what, detail = node_mod.ending(proc.returncode)
        if what == "reboot":
            node.kexec = _take_kexec(node.dir)
            self._start_boot(node, self.delay)
        elif what == "off":
            node.power = False
            node.epoch += 1
            self._set(node, "off", detail)
        else:
            self._set(node, "hung", detail)

    def crash(self, node, detail):
        """The node dies where it stands: powered on, nothing runs (a fault's doing)."""
        self._kill(node)
        node.epoch += 1
        self._set(node, "hung", detail)

    # ------------------------------------------------ control requests (any thread)

    def dispatch(self, request):
        op = request.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        if op == "status":
            with self.lock:
                return {"ok": True, "nodes": [n.record() for n in self.nodes]}
        if op == "wait":
            return self._wait(request["nodes"], request["booted"], float(request["timeout"]))
        if op == "shutdown":
            self.stop()
            return {"ok": True}
        node = self._node(request.get("node"))
        if op == "fault":
            self.set_fault(node, faults.parse(request["fault"]))
        elif op == "clear":
            self.clear_faults(node)
        elif op == "power":
            self.power(node, request["action"])
        else:
            raise UsageError(f"unknown request {op!r}")
        with self.lock:
            return {"ok": True, "nodes": [node.record()]}

    def _node(self, name):
        try:
            return self.by_name[name]
        except KeyError:
            raise UsageError(f"unknown node {name!r} in testbed instance {self.lay.name}") from None

    def _wait(self, names, want, timeout):
        """Wait until every node of ``names`` has booted ``want`` (deploy, system,
        system:P, hung, off; up = deploy or system; settled = not booting); the
        ones still not there."""
        targets = [self._node(n) for n in names]
        with self.changed:
            done = self.changed.wait_for(lambda: all(_matches(n, want) for n in targets), timeout)
            pending = [n.record() for n in targets if not _matches(n, want)]
        return {"ok": True, "done": done, "pending": pending}

    # ------------------------------------------------ start and end

    def bmc_entries(self):
        password = layout_mod.SHARED_SECRET.read_bytes().strip()
        user = layout_mod.BMC_USER.encode()
        for node in self.nodes:
            address, _, port = node.bmc.rpartition(":")
            yield address, int(port), user, password, NodeController(self, node), node.name

    def run(self, ready):
        """Serve until stopped; ``ready`` (a pipe) gets "ok" or the reason it failed."""
        try:
            farm = bmc.BmcFarm(self.bmc_entries(), self.lay.dir / "bmc.log").start()
            server = control.Server(self.lay.control_socket, self.dispatch).start()
        except (KabinError, OSError) as exc:
            ready.write(f"{exc}\n")
            ready.close()
            raise
        with self.lock:
            for name, texts in self.state.get("faults", {}).items():
                for text in texts:
                    self.set_fault(self._node(name), faults.parse(text))
            for node in self.nodes:
                node.power = True
                self._start_boot(node, 0)
        ready.write("ok\n")
        ready.close()
        try:
            self._loop()
        finally:
            self._shutdown(farm, server)

    def _shutdown(self, farm, server):
        with self.lock:
            for node in self.nodes:
                self._kill(node)
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT
        while self._procs and time.monotonic() < deadline:
            ready, _, _ = select.select(list(self._procs), [], [], deadline - time.monotonic())
            for pidfd in ready:
                self._procs.pop(pidfd).wait()
                os.close(pidfd)
        farm.stop()
        server.stop()
        self.lay.control_socket.unlink(missing_ok=True)


def _guarded(fn, *args):
    """Run one event's work; a bug there is logged, the other nodes go on."""
    try:
        fn(*args)
    except Exception:
        log.exception("supervisor: %s failed", getattr(fn, "__name__", fn))


def _matches(node, want):
    if want == "up":
        return node.booted in UP
    if want == "settled":
        return node.booted != "booting"
    kind, _, partition = want.partition(":")
    if node.booted != kind:
        return False
    return not partition or node.partition == int(partition)


def _take_kexec(node_dir):
    """The kernel a ``kexec -l`` left in the node's /run/kabin, kept past the reboot."""
    loaded = node_dir / "run" / "kabin" / "kexec"
    if not (loaded / "kernel").is_file():
        return None
    kernel = node_dir / "kexec-kernel"
    os.replace(loaded / "kernel", kernel)
    cmdline, source = ((loaded / name).read_text(encoding="utf-8").strip()
                       if (loaded / name).is_file() else "" for name in ("cmdline", "source"))
    return boot.Loaded(kernel, cmdline, source)


def _raise_open_files(needed):
    """Each node holds a few descriptors open here: 1024, a common soft limit, is few."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        if wanted < needed:
            log.warning("only %d open files allowed, %d nodes need about %d", wanted,
                        (needed - 64) // FILES_PER_NODE, needed)


def main(argv=None, factory=None):
    """``INSTANCE_DIR READY_FD``: run the instance's supervisor (``factory``: its class)."""
    argv = sys.argv[1:] if argv is None else argv
    directory, ready_fd = Path(argv[0]), int(argv[1])
    logging.basicConfig(filename=directory / "supervisor.log", level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    state = json.loads((directory / layout_mod.STATE_FILE).read_text(encoding="utf-8"))
    lay = layout_mod.Layout(state["name"], state["slot"], state["size"], state["netns"])
    _raise_open_files(FILES_PER_NODE * lay.size + 64)
    supervisor = (factory or Supervisor)(lay, state)
    signal.signal(signal.SIGTERM, lambda signum, frame: supervisor.stop())
    with os.fdopen(ready_fd, "w") as ready:
        supervisor.run(ready)


if __name__ == "__main__":
    main()
