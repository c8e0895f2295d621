"""The data links between chaincast relays: the handshake and the socket helpers.

A parent connects to its child and sends ``MAGIC token name``; the child answers
with its offset (8 bytes, ``OFFSET``), and the parent streams from there. Used by
the agent on the nodes (standard library only: it is sent ahead of ``agent.py``,
see ``launch.agent_source``) and by the source on the frontend.
"""

import socket
import struct
import sys

MAGIC = b"KBCC1"
CONTROL_MAGIC = b"KBCT1"    # a tree-launched agent reporting to the frontend (treelaunch)
OFFSET = struct.Struct(">Q")
HANDSHAKE_TIMEOUT = 10.0
SOCKET_BUFFER = 4 << 20     # kernel buffer of each data link, each way
# Bytes a relay waits for before reading (SO_RCVLOWAT): a shaped link delivers a few
# segments at a time, and a loop turn per segment costs more CPU than moving the data.
BATCH = 64 * 1024
IO_TICK = 1.0               # longest blocking call before a thread checks for abort


def connect_child(address, port, token, name):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    sock.settimeout(HANDSHAKE_TIMEOUT)
    sock.connect((address, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _greet(sock, MAGIC, token, name)
    return sock


def connect_control(address, token, name):
    """The connection to the frontend that carries a tree-launched agent's commands and
    events (``address``: the job's ``control``)."""
    sock = socket.create_connection(tuple(address), HANDSHAKE_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _greet(sock, CONTROL_MAGIC, token, name)
    sock.settimeout(None)
    return sock


def _greet(sock, magic, token, name):
    sock.sendall(b" ".join([magic, token.encode(), name.encode()]) + b"\n")


def read_line(sock, limit):
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk or len(data) > limit:
            raise OSError("bad handshake")
        data += chunk
    return data.rstrip(b"\n")


def read_exact(sock, count):
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise OSError("connection closed during the handshake")
        data += chunk
    return data


def shutdown(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def set_low_mark(sock, remaining, current):
    """Make ``sock`` wait for BATCH bytes (fewer near the end); returns (sock, low mark)."""
    mark = max(1, min(BATCH, remaining))
    if current == (sock, mark):
        return current
    sock.settimeout(IO_TICK)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, mark)
    except (OSError, AttributeError):
        pass  # no low mark here: reads are smaller, nothing else changes
    return sock, mark


def reason(exc):
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    tarfile = sys.modules.get("tarfile")  # imported by the sink if it extracts
    if tarfile and isinstance(exc, tarfile.TarError):
        return f"bad tar archive: {exc or type(exc).__name__}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
