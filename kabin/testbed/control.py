"""The supervisor's control socket: one JSON request line, one JSON answer line.

Requests (``op``): ``ping``, ``status``, ``fault`` (node, fault), ``clear`` (node),
``power`` (node, action), ``wait`` (nodes, booted, timeout), ``shutdown``.
An answer is ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.
"""

import json
import logging
import socket
import socketserver
import threading

from ..errors import KabinError, SystemRequirementError, UsageError

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20


class _Handler(socketserver.StreamRequestHandler):
    def handle(self):
        line = self.rfile.readline(MAX_LINE)
        try:
            answer = self.server.dispatch(json.loads(line))
        except KabinError as exc:
            answer = {"ok": False, "error": str(exc)}
        except (ValueError, TypeError, KeyError) as exc:
            answer = {"ok": False, "error": f"bad request: {exc}"}
        except Exception as exc:  # the supervisor must outlive a bug in one request
            log.exception("control request failed")
            answer = {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
        self.wfile.write(json.dumps(answer).encode() + b"\n")


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Serves ``dispatch(request) -> answer`` on a Unix socket, in threads."""

    daemon_threads = True

    def __init__(self, path, dispatch):
        path.unlink(missing_ok=True)
        super().__init__(str(path), _Handler)
        path.chmod(0o600)
        self.dispatch = dispatch
        self.thread = threading.Thread(target=self.serve_forever, name="kabin-control",
                                       daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.shutdown()
        self.server_close()


def request(path, message, timeout=10.0):
    """Send one request to the supervisor listening on ``path``; its answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(message).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        raise SystemRequirementError(f"the testbed's supervisor is not running ({path})") \
            from None
    except socket.timeout:
        raise SystemRequirementError(f"the testbed's supervisor did not answer in {timeout} s") \
            from None
    except OSError as exc:
        raise SystemRequirementError(f"cannot talk to the testbed's supervisor: {exc}") from None
    if not data:
        raise SystemRequirementError("the testbed's supervisor closed the connection")
    answer = json.loads(data)
    if not answer.get("ok"):
        raise UsageError(answer.get("error", "the supervisor refused the request"))
    return answer
