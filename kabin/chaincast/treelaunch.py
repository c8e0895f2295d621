"""Tree launch: the frontend starts a few agents, agents start the others.

Starting every agent from the frontend costs it one SSH handshake per node, which
paramiko does under one GIL: with thousands of nodes, the frontend is the
bottleneck of the start. Here (as TakTuk does for Kadeploy) the nodes are laid
out in a ``fanout``-ary tree in broadcast order; the frontend starts the roots
over SSH, lending them its key through agent forwarding (``sshagent``), and each
agent starts its launch children with OpenSSH's client (``spawn``). Every agent
connects back to the frontend (``CONTROL_MAGIC token name``, on a port of the
chaincast range): its commands and events go over that connection, so the
broadcast handles it as any other, and it lives on when its launcher dies.

A node that cannot be started by its launcher (its ssh ended before the node
connected back) is started by the frontend, with its launch subtree; a node the
frontend cannot start gets a ``started`` error and its launch children are
started by the frontend. So a dead node costs its subtree one connect timeout.
"""

import logging
import socket
import threading

from ..errors import KabinError
from . import order
from .launch import AgentHandle, bootstrap_template, started
from .links import CONTROL_MAGIC, HANDSHAKE_TIMEOUT, read_line, shutdown
from .multicast import route_towards

log = logging.getLogger(__name__)


class TreeStart:
    """One tree launch through ``launcher`` (an ``SshLauncher``); closed when the broadcast ends."""

    def __init__(self, launcher, events, timeout, executor, fanout):
        self.launcher, self.pool = launcher, launcher.pool
        self.events, self.timeout, self.executor, self.fanout = events, timeout, executor, fanout
        self.entries, self.connected, self.direct = {}, set(), set()
        self.sessions = []              # the SSH channels of the agents started from here
        self.lock = threading.Lock()
        self.listener, self.closed = None, False

    def run(self, nodes, job_of):
        """Start the agents of ``nodes`` (name -> address, in broadcast order)."""
        jobs = {name: job_of(name, address) for name, address in nodes.items()}
        self.token = next(iter(jobs.values()))["token"]
        self.listener = self._listen(nodes, jobs)
        control = list(self.listener.getsockname()[:2])
        tree = order.layout(list(nodes), self.fanout)
        for name in reversed(list(nodes)):     # children first: a job holds its children's
            self.entries[name] = self._entry(name, jobs[name], control, tree[name])
        threading.Thread(target=self._accept, daemon=True, name="kabin-chaincast-control").start()
        log.info("tree launch: %d agent(s) started from here, fanout %d", len(tree[None]),
                 self.fanout)
        for name in tree[None]:
            self.executor.submit(self._start_here, name, on_done=lambda value, exc: None)
        return self

    def _entry(self, name, job, control, children):
        """What a launcher needs to start ``name``: its SSH address and its job."""
        cfg = self.pool.config.node(name)
        kids = [self.entries[kid] for kid in children]
        options, known = self.pool.client_options([(k["address"], k["port"]) for k in kids])
        ssh = {"options": options, "known_hosts": known, "python": self.launcher.python,
               "bootstrap": bootstrap_template()}
        job = dict(job, control=control, launch=kids, ssh=ssh)
        return {"name": name, "address": cfg.address, "port": cfg.ssh_port, "job": job}

    def _listen(self, nodes, jobs):
        """The control listener, on this host's address towards the nodes, in the port range."""
        first, last = next(iter(jobs.values()))["ports"]
        host = route_towards(socket.gethostbyname(next(iter(nodes.values()))))[1]
        for port in range(last, first - 1, -1):    # from the top: the engines use the bottom
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind((host, port))
            except OSError:
                sock.close()
                continue
            sock.listen(128)
            return sock
        raise KabinError(f"no free port in {first}-{last} on {host} for the agents to report to")

    # ------------------------------------------------------------ starts

    def _start_here(self, name):
        """Start ``name`` (and its launch subtree) over the frontend's own SSH."""
        with self.lock:
            if self.closed or name in self.connected or name in self.direct:
                return
            self.direct.add(name)
        entry = self.entries[name]
        try:
            channel = self.launcher.session(name, entry["job"], self.timeout, forward_agent=True)
        except Exception as exc:  # noqa: BLE001 (any failure is this node's: reported, and
            # its launch children started from here)
            self.events.put((name, started(None, exc)))
            for kid in entry["job"]["launch"]:
                self._start_here(kid["name"])
            return
        with self.lock:
            self.sessions.append(channel)
        threading.Thread(target=self._watch, args=(name, channel), daemon=True).start()

    def _watch(self, name, channel):
        """An agent started from here that ends before it reports: its start failed."""
        channel.status_event.wait()       # the command ended, or the channel closed
        with self.lock:
            failed = not self.closed and name not in self.connected
        if failed:
            said = b""
            while channel.recv_stderr_ready():
                said += channel.recv_stderr(65536)
            last = said.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no message"]
            self.events.put((name, started(None, OSError(f"agent ended: {last[0][:200]}"))))
            for kid in self.entries[name]["job"]["launch"]:
                self._start_here(kid["name"])

    def _launch_ended(self, event):
        """A launcher's ssh to ``event['node']`` ended: start the node from here if it
        has not connected back."""
        if event.get("ev") != "launch-ended":
            return False
        name = event.get("node")
        with self.lock:
            waiting = name in self.entries and name not in self.connected
        if waiting:
            log.info("%s: not started by its launcher (%s); starting it from here", name,
                     event.get("reason"))
            threading.Thread(target=self._start_here, args=(name,), daemon=True).start()
        return True

    # ------------------------------------------------------------ agents reporting

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed: the broadcast is over
            threading.Thread(target=self._hello, args=(conn,), daemon=True).start()

    def _hello(self, conn):
        """Check an agent's greeting; the first agent of each node is its handle."""
        try:
            conn.settimeout(HANDSHAKE_TIMEOUT)
            magic, token, name = (read_line(conn, 400).decode().split(" ") + ["", ""])[:3]
        except (OSError, UnicodeDecodeError):
            conn.close()
            return
        with self.lock:
            fresh = magic == CONTROL_MAGIC.decode() and token == self.token \
                and name in self.entries and name not in self.connected
            if fresh:
                self.connected.add(name)
        if not fresh:  # a stranger, or a second agent of the node (both launchers tried)
            conn.close()
            return
        conn.settimeout(None)
        handle = _ControlHandle(name, self.events, conn, self.pool)
        handle.intercept = self._launch_ended
        self.events.put((name, started(handle, None)))
        handle.start_reader(conn.makefile("r", encoding="utf-8", errors="replace"))

    def close(self):
        if self.listener is not None:
            self.listener.close()
        with self.lock:
            self.closed = True
            sessions, self.sessions = self.sessions, []
        for channel in sessions:
            channel.close()


class _ControlHandle(AgentHandle):
    """An agent reporting over its control connection to the frontend."""

    def __init__(self, node, events, conn, pool):
        super().__init__(node, events, pool)
        self.conn = conn

    def _write(self, data):
        self.conn.sendall(data)

    def exit_reason(self):
        return "agent ended (its connection to the frontend closed)"

    def _close(self):
        shutdown(self.conn)
        self.conn.close()
