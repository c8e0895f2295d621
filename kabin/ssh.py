"""SSH to the nodes with paramiko: run commands, pipe scripts, send files.

One ``SshPool`` per command: a connection per node, opened once and reused by
every channel of that command (paramiko multiplexes channels on a transport).
Every call is bounded: connect timeout from the config, a deadline per command.

Host keys: nodes change identity at every redeploy, so the policy is explicit
(``ssh.host_key_policy`` in server.yml): ``ignore`` accepts any key (test
clusters), ``known_hosts`` trusts a key on first use and refuses a changed one.
Deployment environments and deployed systems use separate files
(``known_hosts_deploy`` / ``known_hosts``), picked by ``SshPool(target=...)``.
"""

import logging
import select
import shlex
import threading
import time
from dataclasses import dataclass

from .errors import KabinError

log = logging.getLogger(__name__)

OUTPUT_LIMIT = 1 << 20  # bytes kept per stream; the rest is counted, not stored
TARGETS = ("deploy", "system")


class SshError(KabinError):
    """A node could not be reached or a command could not be run on it."""


@dataclass
class CommandResult:
    node: str
    rc: int | None        # None when the command timed out
    stdout: str
    stderr: str
    time: float

    @property
    def ok(self):
        return self.rc == 0

    def error(self):
        """The short reason of a failure, for the node's record."""
        if self.rc is None:
            return f"timeout after {self.time:.0f} s"
        last = self.stderr.strip().splitlines()[-1:] or [""]
        return f"exit code {self.rc}" + (f": {last[0][:200]}" if last[0] else "")


def env_prefix(env):
    """``export A='x' B='y'; `` so variables reach the command whatever sshd's AcceptEnv says."""
    if not env:
        return ""
    return "export " + " ".join(f"{k}={shlex.quote(str(v))}" for k, v in env.items()) + "; "


class SshPool:
    """Connections to the nodes of one command, reused by every call on the same node."""

    def __init__(self, config, target="deploy", stop=None):
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}")
        self.config, self.ssh = config, config.server.ssh
        self.known_hosts = self.ssh.known_hosts_deploy if target == "deploy" else self.ssh.known_hosts
        self.stop = stop or threading.Event()
        self._clients, self._locks = {}, {}
        self._lock = threading.Lock()
        self._pkey = None

    # ------------------------------------------------------------ connections

    def _key(self):
        import paramiko

        with self._lock:
            if self._pkey is None:
                try:
                    self._pkey = paramiko.PKey.from_path(str(self.ssh.key))
                except (OSError, paramiko.SSHException) as exc:
                    from .errors import ConfigError
                    raise ConfigError(f"cannot load the SSH key: {exc}", self.ssh.key) from None
            return self._pkey

    def _node_lock(self, node):
        with self._lock:
            return self._locks.setdefault(node, threading.Lock())

    def client(self, node):
        """The node's connected client, opening it on first use."""
        with self._node_lock(node):
            client = self._clients.get(node)
            if client is not None and client.get_transport() and client.get_transport().is_active():
                return client
            client = self._connect(node)
            self._clients[node] = client
            return client

    def _connect(self, node):
        import paramiko

        cfg = self.config.node(node)
        client = paramiko.SSHClient()
        self._set_host_key_policy(client)
        timeout = self.ssh.connect_timeout
        try:
            client.connect(cfg.address, port=cfg.ssh_port, username=self.ssh.user,
                           pkey=self._key(), timeout=timeout, banner_timeout=timeout,
                           auth_timeout=timeout, allow_agent=False, look_for_keys=False)
        except paramiko.BadHostKeyException:
            client.close()
            raise SshError(f"host key of {cfg.address} changed (remove it from {self.known_hosts})")
        except (OSError, EOFError, paramiko.SSHException) as exc:
            client.close()
            raise SshError(f"ssh to {cfg.address}:{cfg.ssh_port} failed: {_reason(exc)}") from None
        if self.ssh.host_key_policy == "known_hosts":
            self._save_host_keys(client)
        return client

    def _set_host_key_policy(self, client):
        import paramiko

        if self.ssh.host_key_policy == "ignore":
            client.set_missing_host_key_policy(_AcceptPolicy())
            return
        if self.known_hosts.exists():
            client.load_host_keys(str(self.known_hosts))
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())

    def _save_host_keys(self, client):
        with self._lock:
            self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
            client.save_host_keys(str(self.known_hosts))

    def forget(self, node):
        """Drop a node's connection (it rebooted or changed identity)."""
        with self._node_lock(node):
            client = self._clients.pop(node, None)
        if client:
            client.close()

    def close(self):
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # ------------------------------------------------------------ commands

    def run(self, node, command, timeout, stdin=None, env=None):
        """Run ``command`` on ``node`` within ``timeout`` seconds; never raises on a non-zero rc.

        ``stdin`` (bytes) is fed to the command, then closed. Raises SshError when
        the node cannot be reached.
        """
        start = time.monotonic()
        channel = self.open(node, env_prefix(env) + command, timeout)
        try:
            if stdin is not None:
                _feed_in_background(channel, stdin)
            rc, out, err = _collect(channel, start + timeout, self.stop)
        finally:
            channel.close()
        return CommandResult(node, rc, out, err, time.monotonic() - start)

    def open(self, node, command, timeout):
        """Start ``command`` on ``node`` and return its paramiko channel (caller closes it)."""
        import paramiko

        transport = self.client(node).get_transport()
        try:
            channel = transport.open_session(timeout=timeout)
            channel.settimeout(timeout)
            channel.exec_command(command)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            self.forget(node)
            raise SshError(f"cannot run a command: {_reason(exc)}") from None
        log.debug("%s: started %s", node, command)
        return channel

    def send(self, node, data, dest, mode=0o644, timeout=60):
        """Write ``data`` (bytes) to ``dest`` on the node atomically (temporary file + rename)."""
        tmp = f"{dest}.kabin-{threading.get_ident()}"
        command = (f"mkdir -p {shlex.quote(_dirname(dest))} && cat > {shlex.quote(tmp)} && "
                   f"chmod {mode:o} {shlex.quote(tmp)} && mv -f {shlex.quote(tmp)} {shlex.quote(dest)}")
        return self.run(node, command, timeout, stdin=data)


class _AcceptPolicy:
    """Host key policy 'ignore': accept any key without recording it."""

    def missing_host_key(self, client, hostname, key):
        return None


def _dirname(path):
    head = path.rsplit("/", 1)[0] if "/" in path else "."
    return head or "/"


def _reason(exc):
    text = str(exc) or type(exc).__name__
    if isinstance(exc, TimeoutError) or "timed out" in text:
        return "connection timed out"
    return text


def _feed_in_background(channel, data):
    def feed():
        try:
            channel.sendall(data)
            channel.shutdown_write()
        except (OSError, EOFError):
            pass  # the command ended or the node died: _collect reports it
    threading.Thread(target=feed, daemon=True, name="kabin-ssh-stdin").start()


def _collect(channel, deadline, stop):
    """Read stdout and stderr until the command exits or the deadline passes."""
    out, err = bytearray(), bytearray()
    while True:
        while channel.recv_ready():
            _append(out, channel.recv(65536))
        while channel.recv_stderr_ready():
            _append(err, channel.recv_stderr(65536))
        if channel.exit_status_ready() and not channel.recv_ready() \
                and not channel.recv_stderr_ready():
            return channel.recv_exit_status(), _text(out), _text(err)
        if channel.closed and not channel.exit_status_ready():
            raise SshError("connection lost while the command ran")
        remaining = deadline - time.monotonic()
        if remaining <= 0 or stop.is_set():
            return None, _text(out), _text(err)
        select.select([channel], [], [], remaining)


def _append(buffer, chunk):
    room = OUTPUT_LIMIT - len(buffer)
    if room > 0:
        buffer += chunk[:room]


def _text(buffer):
    return buffer.decode("utf-8", "replace")
