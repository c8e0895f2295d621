"""The multicast method: udpcast's udp-sender on the frontend, udp-receiver on the nodes.

The sender sends the image file once to every node on the network (Clonezilla's
choice; beyond Kadeploy). It starts when ``min_receivers`` receivers have joined,
or after ``max_wait`` seconds with those there; each node's agent pipes its
receiver into the same ring, sink and digests as the chain's. A node whose
receiver ends short (it missed the start, lost the stream, the sender dropped
it) is repaired by a unicast pass from the source, from its own offset (see
broadcast.Broadcast._repair); a node that cannot be repaired is KO with the reason.
"""

import logging
import subprocess
import threading

from ..errors import KabinError

log = logging.getLogger(__name__)

SENDER = "udp-sender"
# Where receivers and sender meet. udpcast's default is the interface's broadcast
# address, which an interface set up without one (ip addr add A/N) lacks: 0.0.0.0.
RENDEZVOUS = "224.0.0.1"


class MulticastError(KabinError):
    """The multicast sender cannot run."""


def route_towards(address):
    """(interface name, source address) of this host's route to ``address``."""
    try:
        done = subprocess.run(["ip", "-o", "route", "get", address], capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MulticastError(f"cannot find the interface towards {address}: {exc}") from None
    words = done.stdout.split()
    if done.returncode or "dev" not in words or "src" not in words:
        raise MulticastError(f"no route to {address}: {done.stderr.strip() or done.stdout}")
    return words[words.index("dev") + 1], words[words.index("src") + 1]


def interface_towards(address):
    """The name of this host's interface that routes to ``address``."""
    return route_towards(address)[0]


class UdpSender:
    """udp-sender serving ``path``; ``done`` is set when it ends (a failure is logged: the
    nodes it did not serve are repaired or KO by their own records)."""

    def __init__(self, path, portbase, interface, receivers, max_wait, fec=None, max_rate=None):
        argv = [SENDER, "--nokbd", "--file", str(path), "--portbase", str(portbase),
                "--interface", interface, "--mcast-rdv-address", RENDEZVOUS,
                "--min-receivers", str(receivers),
                "--max-wait", str(max_wait), "--retries-until-drop", "30"]
        argv += ["--fec", fec] if fec else []
        argv += ["--max-bitrate", f"{int(max_rate * 8)}"] if max_rate else []
        log.debug("multicast: %s", " ".join(argv))
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except OSError as exc:
            raise MulticastError(f"cannot start {SENDER}: {exc.strerror or exc} "
                                 "(Debian package udpcast)") from None
        self.done = threading.Event()
        threading.Thread(target=self._wait, daemon=True, name="kabin-udp-sender").start()

    def _wait(self):
        said = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
        code = self.proc.wait()
        if code:
            log.info("multicast: %s exited with %d: %s", SENDER, code,
                     said[-1] if said else "no message")
        self.done.set()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.done.wait(10)
