"""SSH to the nodes with paramiko: run commands, pipe scripts, send files.

One ``SshPool`` per command: a connection per node, opened once and reused by
every channel of that command (paramiko multiplexes channels on a transport).
Every call is bounded: connect timeout from the config, a deadline per command.

Host keys: nodes change identity at every redeploy, so the policy is explicit
(``ssh.host_key_policy`` in server.yml): ``ignore`` accepts any key (test
clusters), ``known_hosts`` trusts a key on first use and refuses a changed one.
Deployment environments and deployed systems use separate files
(``known_hosts_deploy`` / ``known_hosts``), picked by ``SshPool(target=...)``;
a pool reads its file once and writes it back (atomically) when closed.

Latency: sockets get TCP_NODELAY and answer with immediate ACKs (TCP_QUICKACK).
Without them, small SSH packets meet Nagle's algorithm on the server and the
delayed ACK of the client: each round trip after authentication waits ~40 ms,
which made one connection + one command cost ~110 ms instead of ~30 ms.
"""

import logging
import os
import select
import shlex
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import sshagent
from .errors import ConfigError, KabinError

log = logging.getLogger(__name__)

OUTPUT_LIMIT = 1 << 20  # bytes kept per stream; the rest is counted, not stored
TARGETS = ("deploy", "system")
STOP_CHECK = 0.5        # longest wait before a blocked reader notices the stop event
CHUNK = 1 << 16
KEEPALIVE = (5, 2, 3)   # TCP keepalive: idle, interval, count


class SshError(KabinError):
    """A node could not be reached or a command could not be run on it."""


class ConnectionLost(SshError):
    """The connection dropped while a command ran (the node died or rebooted)."""


@dataclass
class CommandResult:
    node: str
    rc: int | None        # None when the command timed out; -1 when killed by a signal
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
        what = "killed by a signal" if self.rc < 0 else f"exit code {self.rc}"
        return what + (f": {last[0][:200]}" if last[0] else "")


def env_prefix(env):
    """``export A='x' B='y'; `` so variables reach the command whatever sshd's AcceptEnv says."""
    if not env:
        return ""
    return "export " + " ".join(f"{k}={shlex.quote(str(v))}" for k, v in env.items()) + "; "


# paramiko reports dropped connections on its own loggers: without a handler of
# their own, Python would print them on stderr (only -vv should show them)
logging.getLogger("paramiko").addHandler(logging.NullHandler())


class SshPool:
    """Connections to the nodes of one command, reused by every call on the same node."""

    def __init__(self, config, target="deploy", stop=None):
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}")
        self.config, self.ssh = config, config.server.ssh
        known_hosts = self.ssh.known_hosts_deploy if target == "deploy" else self.ssh.known_hosts
        self.host_keys = None if self.ssh.host_key_policy == "ignore" else HostKeyStore(known_hosts)
        self.stop = stop or threading.Event()
        self._transports, self._locks = {}, {}
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
                    raise ConfigError(f"cannot load the SSH key: {exc}", self.ssh.key) from None
            return self._pkey

    def _node_lock(self, node):
        with self._lock:
            return self._locks.setdefault(node, threading.Lock())

    def transport(self, node):
        """The node's authenticated paramiko transport, connecting on first use."""
        with self._node_lock(node):
            transport = self._transports.get(node)
            if transport is not None and transport.is_active():
                return transport
            if self.stop.is_set():
                raise SshError("interrupted")
            transport = self._connect(node)
            self._transports[node] = transport
            return transport

    def _connect(self, node):
        import paramiko

        cfg = self.config.node(node)
        where = f"{cfg.address}:{cfg.ssh_port}"
        timeout = self.ssh.connect_timeout
        transport = None
        try:
            sock = _QuickAckSocket.connect_to(cfg.address, cfg.ssh_port, timeout)
            transport = paramiko.Transport(sock)
            transport.banner_timeout = transport.auth_timeout = timeout
            if self.host_keys:
                self.host_keys.prefer_known_types(transport, cfg.address, cfg.ssh_port)
            transport.start_client(timeout=timeout)
            if not transport.initial_kex_done:    # start_client gives up silently at its timeout
                raise paramiko.SSHException(f"no SSH handshake within {timeout:g} s")
            if self.host_keys:
                self.host_keys.check(cfg.address, cfg.ssh_port, transport.get_remote_server_key())
            transport.auth_publickey(self.ssh.user, self._key())
        except (OSError, EOFError, paramiko.SSHException, SshError) as exc:
            if transport is not None:
                transport.close()
            if isinstance(exc, SshError):
                raise
            raise SshError(f"ssh to {where} failed: {_handshake_reason(exc, timeout)}") from None
        return transport

    def forget(self, node):
        """Drop a node's connection (it rebooted or changed identity)."""
        with self._node_lock(node):
            transport = self._transports.pop(node, None)
        if transport:
            transport.close()

    def close(self):
        """Close every connection and save newly learnt host keys."""
        with self._lock:
            transports, self._transports = list(self._transports.values()), {}
        for transport in transports:
            transport.close()
        if self.host_keys:
            self.host_keys.save()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # ------------------------------------------------------------ commands

    def run(self, node, command, timeout, stdin=None, env=None):
        """Run ``command`` on ``node`` within ``timeout`` seconds; never raises on a non-zero rc.

        ``stdin`` (bytes, or a local file path to stream) is fed to the
        command, then closed. Raises SshError when the node cannot be reached,
        ConnectionLost when the connection drops while the command runs.
        """
        start = time.monotonic()
        channel = self.open(node, env_prefix(env) + command, timeout)
        try:
            if stdin is not None:
                _feed_in_background(channel, stdin)
            rc, out, err = collect(channel, start + timeout, self.stop)
        finally:
            close_quietly(channel)
        return CommandResult(node, rc, out, err, time.monotonic() - start)

    def open(self, node, command, timeout, forward_agent=False):
        """Start ``command`` on ``node`` and return its paramiko channel (caller closes it).

        ``forward_agent``: the command may log in to other nodes with the pool's key
        (``ssh -A``, see ``sshagent``)."""
        import paramiko

        transport = self.transport(node)
        try:
            channel = transport.open_session(timeout=timeout)
            channel.settimeout(timeout)
            if forward_agent:
                key = self._key()
                channel.request_forward_agent(lambda forwarded: sshagent.serve(forwarded, key))
            channel.exec_command(command)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            self.forget(node)
            raise SshError(f"cannot run a command: {_reason(exc)}") from None
        log.debug("%s: started %s", node, command)
        return channel

    def client_options(self, hosts):
        """(OpenSSH client options, known-hosts text) for a node logging in to ``hosts``
        ((address, port) pairs) as the pool would: same user, same host key policy
        (a host this pool has no key of is refused, where the pool would trust it)."""
        options = ["-A", "-T", "-l", self.ssh.user, "-o", "BatchMode=yes",
                   "-o", f"ConnectTimeout={max(1, int(self.ssh.connect_timeout))}",
                   "-o", "LogLevel=ERROR", "-o", "UpdateHostKeys=no"]
        if self.host_keys is None:
            return options + ["-o", "StrictHostKeyChecking=no",
                              "-o", "UserKnownHostsFile=/dev/null"], ""
        known = "".join(line + "\n" for line in self.host_keys.known_lines(hosts))
        return options + ["-o", "StrictHostKeyChecking=yes"], known

    def send(self, node, data, dest, mode=0o644, timeout=60):
        """Write ``data`` to ``dest`` on the node atomically (temporary file + rename).

        ``data`` is bytes, or a local file path whose content is streamed.
        """
        tmp = shlex.quote(f"{dest}.kabin-{threading.get_ident()}")
        command = (f"mkdir -p {shlex.quote(_dirname(dest))} && cat > {tmp} && "
                   f"chmod {mode:o} {tmp} && mv -f {tmp} {shlex.quote(dest)}"
                   f" || {{ rc=$?; rm -f {tmp}; exit $rc; }}")
        return self.run(node, command, timeout, stdin=data)


class HostKeyStore:
    """One known-hosts file shared by the connections of a pool: trust on first use.

    paramiko's SSHClient would give each connection its own copy of the file,
    and concurrent saves would then drop each other's new keys.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._keys = None
        self._dirty = False

    def _loaded(self):
        import paramiko

        if self._keys is None:
            self._keys = paramiko.HostKeys()
            if self.path.exists():
                try:
                    self._keys.load(str(self.path))
                except (OSError, paramiko.SSHException) as exc:
                    raise ConfigError(f"cannot read the known-hosts file: {exc}", self.path)
        return self._keys

    @staticmethod
    def _name(address, port):
        return address if port == 22 else f"[{address}]:{port}"

    def prefer_known_types(self, transport, address, port):
        """Ask the server for the key type we already know for it."""
        with self._lock:
            known = self._loaded().lookup(self._name(address, port))
        if known:
            options = transport.get_security_options()
            first = [t for t in known.keys() if t in options.key_types]
            options.key_types = tuple(first + [t for t in options.key_types if t not in first])

    def check(self, address, port, key):
        """Accept a key seen for the first time; refuse one that changed."""
        name = self._name(address, port)
        with self._lock:
            known = self._loaded().lookup(name)
            if known is not None and key.get_name() in known:
                if known[key.get_name()] != key:
                    raise SshError(f"host key of {name} changed (remove it from {self.path}, "
                                   "or use the other --running)")
                return
            self._keys.add(name, key.get_name(), key)
            self._dirty = True

    def known_lines(self, hosts):
        """The known-hosts lines of ``hosts`` ((address, port) pairs) that have a key."""
        lines = []
        with self._lock:
            for address, port in hosts:
                name = self._name(address, port)
                for kind, key in (self._loaded().lookup(name) or {}).items():
                    lines.append(f"{name} {kind} {key.get_base64()}")
        return lines

    def save(self):
        with self._lock:
            if not self._dirty:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".kabin-known-hosts-")
            os.close(fd)
            try:
                self._keys.save(tmp)
                os.replace(tmp, self.path)
            except OSError as exc:
                os.unlink(tmp)
                log.warning("cannot save the host keys to %s: %s", self.path, exc.strerror)
            self._dirty = False


class _QuickAckSocket(socket.socket):
    """A TCP socket that sends small packets at once and acknowledges at once."""

    @classmethod
    def connect_to(cls, address, port, timeout):
        plain = socket.create_connection((address, port), timeout)
        sock = cls(plain.family, plain.type, plain.proto, fileno=plain.detach())
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # a node that dies without closing (power cut, kexec) is noticed in ~11 s
        set_keepalive(sock, *KEEPALIVE)
        return sock

    def recv(self, size, *flags):
        data = super().recv(size, *flags)
        # the kernel falls back to delayed ACKs by itself: ask again after every read
        self.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        return data


def close_quietly(channel):
    """Close a channel whose node may be gone (a reboot command kills the connection):
    paramiko then raises EOFError or OSError while sending the close message."""
    try:
        channel.close()
    except (OSError, EOFError):
        pass


def set_keepalive(sock, idle, interval, count):
    """TCP keepalives: the socket fails ``idle + interval * count`` s after its peer vanished."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)


def _dirname(path):
    head = path.rsplit("/", 1)[0] if "/" in path else "."
    return head or "/"


def _reason(exc):
    text = str(exc) or type(exc).__name__
    if isinstance(exc, TimeoutError) or "timed out" in text:
        return "connection timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, EOFError):
        return "connection closed by the node"
    return text


def _handshake_reason(exc, timeout):
    """paramiko's words, made plain: its banner error alone means a timeout."""
    text = _reason(exc)
    banner = "Error reading SSH protocol banner"
    if text.startswith(banner):
        detail = text[len(banner):].strip()
        return f"no SSH handshake: {detail}" if detail else f"no SSH handshake within {timeout:g} s"
    return text


def _feed_in_background(channel, source):
    """Send bytes or a local file to the channel's stdin, then close it."""
    def chunks():
        if isinstance(source, (bytes, bytearray, memoryview)):
            yield source
            return
        with open(source, "rb") as handle:
            while chunk := handle.read(CHUNK):
                yield chunk

    def feed():
        try:
            for chunk in chunks():
                channel.sendall(chunk)
            channel.shutdown_write()
        except (OSError, EOFError) as exc:
            log.debug("stdin of %s not fully sent: %s", source if isinstance(source, Path)
                      else "the command", exc)  # the command ended or the node died
    threading.Thread(target=feed, daemon=True, name="kabin-ssh-stdin").start()


def collect(channel, deadline, stop):
    """Read stdout and stderr until the command exits or the deadline passes.

    Returns ``(rc, stdout, stderr)``; rc is None at the deadline. Raises
    ConnectionLost when the connection drops before the exit status arrives.
    """
    out, err = bytearray(), bytearray()
    # output until EOF: the channel's pipe wakes select on data, EOF or close
    while not (channel.eof_received or channel.closed):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or stop.is_set():
            return None, _text(out), _text(err)
        select.select([channel], [], [], min(remaining, STOP_CHECK))
        _drain(channel, out, err)
    _drain(channel, out, err)
    # then the exit status, which follows EOF
    while not channel.status_event.wait(min(max(deadline - time.monotonic(), 0), STOP_CHECK)):
        if time.monotonic() >= deadline or stop.is_set():
            return None, _text(out), _text(err)
    if channel.exit_status == -1 and not channel.get_transport().is_active():
        raise ConnectionLost("connection lost while the command ran")
    return channel.exit_status, _text(out), _text(err)


def _drain(channel, out, err):
    while channel.recv_ready():
        _append(out, channel.recv(CHUNK))
    while channel.recv_stderr_ready():
        _append(err, channel.recv_stderr(CHUNK))


def _append(buffer, chunk):
    room = OUTPUT_LIMIT - len(buffer)
    if room > 0:
        buffer += chunk[:room]


def _text(buffer):
    return buffer.decode("utf-8", "replace")
