"""A running testbed instance, from the outside: ask its supervisor, act on its nodes.

``Testbed`` is the handle tests and benchmarks use (tests/conftest.py's fixture
returns one); the functions below it are what the ``ka-testbed`` subcommands
call.
"""

import ctypes
import os
import select
import subprocess

from .. import config as config_mod
from .. import nodes as nodes_mod
from ..errors import UsageError
from . import control, faults, lifecycle
from . import layout as layout_mod

SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
               "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
               "-o", "ConnectTimeout=10")


def _layout(name):
    return lifecycle.layout_of(lifecycle.running_state(name))


def _ask(name, message, timeout=30.0):
    return control.request(_layout(name).control_socket, message, timeout)


def _targets(name, nodeset):
    lay = _layout(name)
    names = nodes_mod.expand(nodeset)
    for node in names:
        lay.index_of(node)
    return names


def status(name):
    """One record per node: node, address, bmc, power, booted (+ partition, detail, faults)."""
    return _ask(name, {"op": "status"})["nodes"]


def console(name, node, follow=True):
    """The text of ``node``'s console log, then (``follow``) what is appended, as it comes."""
    lay = _layout(name)
    path = lay.node_dir(lay.index_of(node)) / "console.log"
    with open(path, "rb") as handle, _Modified(path) as modified:
        while True:
            chunk = handle.read(65536)
            if chunk:
                yield chunk.decode("utf-8", "replace")
            elif not follow:
                return
            else:
                modified.wait()


class _Modified:
    """Waits for a file to be written to (inotify IN_MODIFY)."""

    IN_MODIFY = 0x2

    def __init__(self, path):
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_CLOEXEC)
        if self.fd < 0 or libc.inotify_add_watch(self.fd, os.fsencode(path),
                                                 self.IN_MODIFY) < 0:
            raise OSError(ctypes.get_errno(), f"inotify on {path}")

    def wait(self):
        select.select([self.fd], [], [])
        os.read(self.fd, 4096)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def fault(name, nodeset, kind):
    """Give the nodes of ``nodeset`` a fault (``clear``: take all theirs away); their records."""
    if kind != "clear":
        faults.parse(kind)
    out = []
    for node in _targets(name, nodeset):
        message = {"op": "clear", "node": node} if kind == "clear" else \
            {"op": "fault", "node": node, "fault": kind}
        out += _ask(name, message)["nodes"]
    return out


def power(name, nodeset, action):
    """Press a node's power button, as its BMC would: on, off, reset or cycle."""
    out = []
    for node in _targets(name, nodeset):
        out += _ask(name, {"op": "power", "node": node, "action": action})["nodes"]
    return out


def wait(name, nodes, booted="up", timeout=60.0):
    """Wait until ``nodes`` have booted ``booted``; the records of those that did not."""
    answer = _ask(name, {"op": "wait", "nodes": list(nodes), "booted": booted,
                         "timeout": timeout}, timeout=timeout + 10)
    return answer["pending"]


def environment(name):
    """The variables that point kabin's commands at instance ``name``."""
    state = lifecycle.read_state(name)
    if not state:
        raise UsageError(f"testbed instance {name} is not up (ka-testbed up --instance {name})")
    lay = lifecycle.layout_of(state)
    return {"KABIN_CONFIG": str(lay.config_dir), "KABIN_TESTBED_INSTANCE": name}


def exec_argv(name, argv):
    """The command line that runs ``argv`` where the instance's frontend is."""
    lay = _layout(name)
    if not argv:
        raise UsageError("no command given: ka-testbed exec -- COMMAND [ARGS]")
    if lay.netns:
        return ["nsenter", f"--net=/run/netns/{lay.frontend_netns}", "--"] + list(argv)
    return list(argv)


class Testbed:
    """A testbed instance for tests and benchmarks (see tests/conftest.py)."""

    __test__ = False        # not a test class, whatever pytest thinks of its name

    def __init__(self, instance):
        self.instance = layout_mod.check_instance_name(instance)
        self._layout = self._config = None

    def up(self, size=8, **params):
        self._layout = lifecycle.up(self.instance, size, **params)
        self._config = None
        return self

    @property
    def layout(self):
        if self._layout is None:
            self._layout = _layout(self.instance)
        return self._layout

    def down(self):
        self._layout = self._config = None
        return lifecycle.down(self.instance)

    @property
    def config_dir(self):
        return self.layout.config_dir

    @property
    def config(self):
        """The instance's configuration, as this incarnation of it wrote it (not
        config.load's per-process cache: an instance brought up again may differ)."""
        if self._config is None:
            self._config = config_mod.Config(self.config_dir)
        return self._config

    @property
    def nodes(self):
        return self.layout.node_names

    @property
    def env(self):
        return dict(os.environ, **environment(self.instance))

    def address(self, node):
        return self.layout.node_address(self.layout.index_of(node))

    def status(self):
        return {rec["node"]: rec for rec in status(self.instance)}

    def fault(self, node, kind):
        fault(self.instance, node, kind)

    def clear(self, node=None):
        """Clear the faults of ``node`` (of every node that has one if None)."""
        targets = [node] if node else [n for n, r in self.status().items() if r.get("faults")]
        for target in targets:
            fault(self.instance, target, "clear")

    def power(self, node, action):
        power(self.instance, node, action)

    def wait_booted(self, nodes, what="up", timeout=60.0):
        """Wait until ``nodes`` (a name or a list) booted ``what``: deploy, system,
        system:P, hung, off, up (deploy or system); AssertionError naming the others."""
        nodes = [nodes] if isinstance(nodes, str) else list(nodes)
        pending = wait(self.instance, nodes, what, timeout)
        if pending:
            raise AssertionError(f"not {what} after {timeout} s: " + "; ".join(
                f"{r['node']} {r['booted']} {r.get('detail', '')}".strip() for r in pending))

    def ssh_argv(self, node, command):
        """An OpenSSH client command line running ``command`` on ``node`` as root."""
        cfg = self.config.server.ssh
        return ["ssh", "-i", str(cfg.key), *SSH_OPTIONS, "-p", str(cfg.port),
                f"root@{self.address(node)}", command]

    def ssh(self, node, command, timeout=60, **kwargs):
        """Run ``command`` on ``node`` (real OpenSSH); the CompletedProcess (text)."""
        argv = exec_argv(self.instance, self.ssh_argv(node, command))
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
