"""A small client of QEMU's machine protocol (QMP) over its Unix socket.

Each call opens the socket, reads QEMU's greeting, enters command mode
(``qmp_capabilities``), runs one command and closes: QEMU serves one QMP client
at a time, so no caller holds the socket while another waits. Events QEMU sends
meanwhile are skipped. Every read is bounded by the timeout.
"""

import json
import socket

from ..errors import KabinError


class QmpError(KabinError):
    """QEMU refused a command, or could not be reached."""


class Qmp:
    def __init__(self, path, timeout=5.0):
        self.path, self.timeout = str(path), timeout

    def execute(self, command, **arguments):
        """Run ``command``; its ``return`` value (QmpError on an error answer)."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(self.path)
                lines = _Lines(sock)
                lines.read_message()                       # the greeting
                _send(sock, {"execute": "qmp_capabilities"})
                lines.read_answer()
                message = {"execute": command}
                if arguments:
                    message["arguments"] = arguments
                _send(sock, message)
                return lines.read_answer()
        except (OSError, ValueError) as exc:
            raise QmpError(f"QMP {command} on {self.path}: {exc}") from None

    def status(self):
        """QEMU's run state: running, paused, prelaunch, shutdown, internal-error..."""
        return self.execute("query-status")["status"]

    def hmp(self, command_line):
        """A human-monitor command (for those QMP lacks); its text output."""
        return self.execute("human-monitor-command", **{"command-line": command_line})


def _send(sock, message):
    sock.sendall(json.dumps(message).encode() + b"\r\n")


class _Lines:
    def __init__(self, sock):
        self.sock, self.buffer = sock, b""

    def read_message(self):
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ValueError("QEMU closed the QMP socket")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)

    def read_answer(self):
        while True:
            message = self.read_message()
            if "return" in message:
                return message["return"]
            if "error" in message:
                error = message["error"]
                raise QmpError(f"QEMU: {error.get('class')}: {error.get('desc')}")
