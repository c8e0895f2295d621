"""Starting relay agents: over SSH on the nodes, or as local processes.

The agent (compiled, and as source) and its job travel on the agent's stdin
behind a tiny bootstrap, so nothing has to be installed on the node but
python3. After them, stdin carries the commands; stdout carries the agent's
events, which a reader thread puts on the broadcast's event queue as
``(node, event)``. When the agent's output ends, the reader puts an ``exit``
event with the reason.

``LocalLauncher`` runs the same agents as processes of this machine (one
address per node, e.g. 127.0.X.Y): the tests use it, and so can a single host
that fills several local disks.
"""

import functools
import json
import logging
import marshal
import shlex
import subprocess
import sys
import threading
import zlib
from pathlib import Path

from ..errors import KabinError
from ..ssh import close_quietly

log = logging.getLogger(__name__)

# The bootstrap reads, from stdin, the agent compiled by the sender's python (run when
# the node's python has the same bytecode: compiling costs a node more than starting
# python), the agent's source (for any other python), both zlib-compressed (a third of
# the bytes for the sender's SSH to encrypt), and the job. The agent gets the program
# as it came (KABIN_PROGRAM), to start others (spawn).
BOOTSTRAP = """import marshal,os,sys,zlib
def r(n):
 b=b""
 while len(b)<n:
  c=os.read(0,n-len(b))
  if not c:sys.exit("kabin chaincast agent: start truncated")
  b+=c
 return b
c,s,j=r(%d),r(%d),r(%d)
exec(marshal.loads(zlib.decompress(c)) if sys.implementation.cache_tag==%r else compile(zlib.decompress(s),"kabin-chaincast-agent","exec"),{"__name__":"__main__","KABIN_JOB":marshal.loads(j),"KABIN_PROGRAM":(c,s)})
"""
EXIT_WAIT = 5.0  # how long to wait for an exit status once the output has ended


def agent_source():
    """The agent as one script: ``sinks.py``, ``written.py``, ``links.py``,
    ``receivers.py``, ``spawn.py``, then ``agent.py`` (which imports them when packaged)."""
    here = Path(__file__).parent
    return b"\n".join((here / name).read_bytes()
                      for name in ("sinks.py", "written.py", "links.py", "receivers.py",
                                   "spawn.py", "agent.py"))


@functools.lru_cache(maxsize=1)
def _program():
    """(code, source) as the bootstrap reads them: compressed."""
    source = agent_source()
    code = marshal.dumps(compile(source, "kabin-chaincast-agent", "exec"))
    return zlib.compress(code), zlib.compress(source)


def bootstrap_template():
    """BOOTSTRAP for this python's bytecode; the lengths are left to fill (``% (c, s, j)``)."""
    return BOOTSTRAP.replace("%r", repr(sys.implementation.cache_tag))


def agent_start(python, job):
    """(argv, stdin) of an agent: its command line, and what to send it first."""
    code, source = _program()
    packed = marshal.dumps(job)
    bootstrap = bootstrap_template() % (len(code), len(source), len(packed))
    return [python, "-c", bootstrap, "kabin-chaincast-agent"], code + source + packed


class Launcher:
    """What every launcher does: start each node's agent, each start ending with a
    ``started`` event (the handle, or the error) on the broadcast's queue."""

    def launch(self, nodes, job_of, events, timeout, executor, tree=None):
        """Start the agents of ``nodes`` (name -> address), ``job_of(name, address)``
        their jobs; returns what to close when the broadcast ends (or None).
        ``tree``: the fanout of a tree launch (SSH only; None: the frontend starts all)."""
        for name, address in nodes.items():
            executor.submit(lambda name=name, address=address: self.start(
                name, job_of(name, address), events, timeout),
                on_done=lambda handle, exc, name=name: events.put((name, started(handle, exc))))


def started(handle, error):
    """The event a finished start puts on the queue."""
    return {"ev": "started", "handle": handle, "error": error}


class AgentHandle:
    """One running agent: commands in, events out on the shared queue."""

    def __init__(self, node, events, pool=None):
        self.node, self.events, self.pool = node, events, pool   # pool: kill() over SSH
        self.pid = None
        self.intercept = None           # intercept(event): True if it took the event
        self._lock = threading.Lock()
        self._closed = False

    def start_reader(self, lines):
        threading.Thread(target=self._read, args=(lines,), daemon=True,
                         name=f"kabin-chaincast-{self.node}").start()

    def _read(self, lines):
        try:
            for line in lines:
                try:
                    event = json.loads(line)
                except ValueError:
                    log.debug("%s: agent said %r", self.node, line)
                    continue
                if event.get("ev") == "ready":
                    self.pid = event.get("pid")
                if not (self.intercept and self.intercept(event)):
                    self.events.put((self.node, event))
        except (OSError, EOFError) as exc:
            log.debug("%s: agent output lost: %s", self.node, exc)
        self.events.put((self.node, {"ev": "exit", "reason": self.exit_reason()}))

    def send(self, obj):
        """Send one command; False when the agent is gone."""
        data = (json.dumps(obj) + "\n").encode()
        with self._lock:
            if self._closed:
                return False
            try:
                self._write(data)
                return True
            except (OSError, EOFError):
                return False

    def kill(self):
        """Kill a stalled agent (best effort, in the background, over SSH)."""
        if self.pid and self.pool is not None:
            threading.Thread(target=self._kill, daemon=True).start()

    def _kill(self):
        try:
            self.pool.run(self.node, f"kill -9 {int(self.pid)}", timeout=10)
        except (KabinError, OSError) as exc:  # the node may be gone: nothing more to do
            log.debug("%s: cannot kill the agent: %s", self.node, exc)

    def close(self):
        """End the agent: its commands end (stdin or connection closed), so it exits."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._close()


class _LocalHandle(AgentHandle):
    def __init__(self, node, events, proc):
        super().__init__(node, events)
        self.proc = proc

    def _write(self, data):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def exit_reason(self):
        try:
            code = self.proc.wait(EXIT_WAIT)
        except subprocess.TimeoutExpired:
            return "agent stopped answering"
        return _describe_exit(code, self.proc.stderr.read().decode("utf-8", "replace"))

    def kill(self):
        self.proc.kill()

    def _close(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass


class LocalLauncher(Launcher):
    """Runs agents as local processes (``python`` defaults to this interpreter)."""

    def __init__(self, python=None):
        self.python = python or sys.executable

    def start(self, node, job, events, timeout):
        argv, start = agent_start(self.python, job)
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        handle = _LocalHandle(node, events, proc)
        handle._write(start)
        handle.start_reader(proc.stdout)
        return handle

    def close(self):
        pass


class _SshHandle(AgentHandle):
    def __init__(self, node, events, channel, pool):
        super().__init__(node, events, pool)
        self.channel = channel

    def _write(self, data):
        self.channel.sendall(data)

    def exit_reason(self):
        channel = self.channel
        if not channel.status_event.wait(EXIT_WAIT):
            return "ssh connection lost"
        if channel.exit_status < 0:  # sshd reported a signal, not a status
            return "agent ended (killed by a signal)"
        err = b""
        while channel.recv_stderr_ready():
            err += channel.recv_stderr(65536)
        return _describe_exit(channel.exit_status, err.decode("utf-8", "replace"))

    def _close(self):
        close_quietly(self.channel)


class SshLauncher(Launcher):
    """Runs agents on the nodes through an ``SshPool``."""

    def __init__(self, pool, python="python3"):
        self.pool, self.python = pool, python

    def start(self, node, job, events, timeout):
        channel = self.session(node, job, timeout)
        handle = _SshHandle(node, events, channel, self.pool)
        handle.start_reader(channel.makefile("r"))
        return handle

    def session(self, node, job, timeout, forward_agent=False):
        """The SSH channel of a new agent on ``node``, the agent and its job sent."""
        argv, start = agent_start(self.python, job)
        channel = self.pool.open(node, "exec " + " ".join(shlex.quote(a) for a in argv), timeout,
                                 forward_agent)
        try:
            channel.sendall(start)
        except (OSError, EOFError) as exc:
            close_quietly(channel)
            raise OSError(f"cannot send the agent: {exc}") from None
        channel.settimeout(None)  # the broadcast watches heartbeats; close() wakes the reader
        return channel

    def launch(self, nodes, job_of, events, timeout, executor, tree=None):
        if not tree or len(nodes) <= tree:
            return super().launch(nodes, job_of, events, timeout, executor)
        from .treelaunch import TreeStart
        return TreeStart(self, events, timeout, executor, tree).run(nodes, job_of)

    def close(self):
        self.pool.close()


def _describe_exit(code, stderr):
    last = stderr.strip().splitlines()[-1:] or [""]
    what = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    return f"agent ended ({what})" + (f": {last[0][:200]}" if last[0] else "")
