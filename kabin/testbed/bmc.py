"""The testbed's BMCs: one IPMI 2.0 server (RMCP+, ``ipmitool -I lanplus``) per node.

All the BMCs of a testbed run in one thread: 500 of them cost a few tens of MB.
They are built on pyghmi's BMC server (``pyghmi.ipmi.bmc.Bmc``): its command
handlers (chassis status and control, boot options, device ID) and its RMCP+
framing (integrity, AES, payload parsing) are used as they are. What does not
hold at scale is replaced here, in our code:

- I/O. pyghmi hands server sockets to its process-wide client I/O thread, which
  makes them non-blocking to read while handlers make them blocking to write:
  ``recvfrom`` then blocks forever and every BMC of the process goes silent.
  Here one thread owns the BMC sockets (``selectors``: epoll) and reads with
  ``MSG_DONTWAIT``, which never blocks whatever the socket's mode; pyghmi's I/O
  thread never sees them, so a pyghmi client in the same process is harmless.
- Session routing. pyghmi files server sessions in one process-wide table keyed
  by (client address, server port), so BMCs sharing a port mix their sessions up
  (a pyghmi client talks to up to 64 BMCs from one socket). Here each BMC keeps
  its own table keyed by its session ID, which the client puts in every packet
  (in the payload for RAKP 1 and 3). Sessions end on Close Session, expire after
  60 s idle and are bounded per BMC (the least recently used one is evicted).
  An Open Session Request sent again (the client's retry) gets the session it
  opened, not a second one that nobody would close.
- Cipher suites. pyghmi answers any Open Session Request with suite 3: a client
  proposing 17 (SHA-256: pyghmi's own client, ``ipmitool -C 17``) crashes in
  RAKP 2. Suites 3 and 17 are implemented and advertised here; any other proposal
  gets the RMCP+ status "no matching cipher suite". An unknown user gets
  "unauthorized name" in RAKP 2 and a bad RAKP 3 "invalid integrity check value",
  so clients fail at once instead of timing out.
- pyghmi's packet queue calls ``sessionless_data`` on session objects, which have
  none; our dispatch never goes through that queue. A malformed packet is logged
  and dropped: it never stops the loop.
- Each BMC binds its own address (pyghmi binds ``::`` unless told otherwise).

The node controller (duck-typed, from the testbed core) is called in the BMC
thread, so its methods must return quickly (start a boot, do not wait for it):
``power_on()``, ``power_off()``, ``reset()``, ``cycle()``, ``is_on() -> bool``,
``set_bootdev(dev)`` (dev is 'network', 'hd', 'safe', 'optical', 'setup',
'floppy' or 'default') and ``faults``, a set of strings: 'bmc-dead' (the BMC
answers nothing), 'bmc-lies' (it answers "done" to actions but does nothing).
``MemoryNode`` is such a controller for BMCs with no testbed node behind them.

Every action is appended to the journal (``log_path``) as one JSON line,
``{"time": <epoch>, "node": NAME, "action": on|off|soft-off|cycle|reset|bootdev}``,
with ``"device"`` for bootdev and ``"lied": true`` when 'bmc-lies' swallowed it.

pyghmi is imported on first use, so importing this module stays cheap.
"""

import functools
import hashlib
import hmac
import json
import logging
import os
import selectors
import socket
import struct
import threading
import time
import uuid
from collections import namedtuple

from ..errors import SystemRequirementError

log = logging.getLogger(__name__)

SESSION_IDLE_TIMEOUT = 60.0   # the IPMI default inactivity timeout
MAX_SESSIONS = 64             # per BMC; the least recently used one is evicted beyond
_BURST = 64                   # datagrams read from one socket before serving the others

_RMCP_IPMI = b"\x06\x00\xff\x07"  # RMCP version 1.0, no ack, class IPMI
_AUTHTYPE_RMCPPLUS = 6
_OPEN_REQUEST, _OPEN_RESPONSE, _RAKP1, _RAKP2, _RAKP3, _RAKP4 = range(0x10, 0x16)
_BMC_ADDRESS = 0x20
_ADMINISTRATOR = 4

# RMCP+ status codes (IPMI 2.0 table 13-15)
_INVALID_ROLE, _UNAUTHORIZED_NAME, _BAD_INTEGRITY_VALUE = 0x09, 0x0D, 0x0F
_NO_CIPHER_SUITE_MATCH, _ILLEGAL_PARAMETER = 0x11, 0x12

# completion codes
_BAD_LENGTH, _UNSPECIFIED = 0xC7, 0xFF

Suite = namedtuple("Suite", "number auth integrity confidentiality hash icv_len")
# RAKP-HMAC-SHA1 / HMAC-SHA1-96 / AES-CBC-128 and their SHA-256 / -128 counterparts
SUITES = (Suite(3, 1, 1, 1, hashlib.sha1, 12), Suite(17, 3, 4, 1, hashlib.sha256, 16))

# request data the pyghmi handlers index without checking: (netfn, command) -> length
_MIN_REQUEST_DATA = {(0, 2): 1, (0, 8): 1, (0, 9): 1}

Entry = namedtuple("Entry", "address port user password controller node")


def _checksum(data):
    return -sum(data) & 0xFF


def _send_plain(sock, peer, payload_type, payload):
    """An RMCP+ packet outside any session (open session and RAKP messages)."""
    header = _RMCP_IPMI + bytes([_AUTHTYPE_RMCPPLUS, payload_type]) + bytes(8)
    sock.sendto(header + struct.pack("<H", len(payload)) + bytes(payload), peer)


def _proposed_suite(request):
    """The suite matching an Open Session Request's algorithms, or None."""
    algorithms = (request[12], request[20], request[28])
    for suite in SUITES:
        if algorithms == (suite.auth, suite.integrity, suite.confidentiality):
            return suite
    return None


# ---------------------------------------------------------------- one session

class _Session:
    """One RMCP+ session: our handshake (suites 3 and 17), pyghmi's framing after it.

    Mixed into pyghmi's ServerSession (see ``_pyghmi_classes``): ``send_payload``,
    ``_handle_ipmi2_packet`` and ``handle_client_request`` come from there.
    """

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)  # pyghmi's __new__ wants its own arguments

    def __init__(self, bmc, peer, request, suite):
        # the attributes pyghmi's framing reads, set without pyghmi's global tables
        self.bmc, self.socket, self.sockaddr = bmc, bmc.serversocket, peer
        self.servermode, self.ipmiversion, self.authtype = True, 2.0, _AUTHTYPE_RMCPPLUS
        self.sequencenumber = self.sessionid = self.integrityalgo = self.confalgo = 0
        self.rqaddr, self.rqlun, self.lastpayload, self.k1 = _BMC_ADDRESS, None, None, None
        self.pendingpayloads = []
        self.broken = False
        self.suite, self.currhashlib, self.currhashlen = suite, suite.hash, suite.icv_len
        self.clientsessionid = bytes(request[4:8])
        self.managedsessionid = bmc.new_session_id()
        self.localsid = struct.unpack("<I", self.managedsessionid)[0]
        self.rakp1 = self.rakp2 = self.rakp4 = None
        self.last_request = self.last_reply = self.sent = None
        self.last_used = time.monotonic()

    def answer_open(self, tag):
        _send_plain(self.socket, self.sockaddr, _OPEN_RESPONSE, self._open_response(tag))

    def _open_response(self, tag):
        def algorithm(kind, number):
            return bytes([kind, 0, 0, 8, number, 0, 0, 0])
        return (bytes([tag, 0, _ADMINISTRATOR, 0]) + self.clientsessionid + self.managedsessionid
                + algorithm(0, self.suite.auth) + algorithm(1, self.suite.integrity)
                + algorithm(2, self.suite.confidentiality))

    def _mac(self, key, data):
        return hmac.new(key, bytes(data), self.suite.hash).digest()

    def _got_rakp1(self, data):
        if self.rakp2 is not None:  # one handshake per session: only our lost RAKP 2 is redone
            if bytes(data) == self.rakp1:
                _send_plain(self.socket, self.sockaddr, _RAKP2, self.rakp2)
            return
        if len(data) < 28:
            return
        self.Rm, self.rolem = bytes(data[8:24]), data[24]
        self.username = bytes(data[28:28 + data[27]])
        self.maxpriv = self.rolem & 0x0F
        self.clientpriv = min(2, self.maxpriv)  # a session starts at User level
        status = 0
        if not 0 < self.maxpriv <= _ADMINISTRATOR:
            status = _INVALID_ROLE
        elif not hmac.compare_digest(self.username, self.bmc.user):
            status = _UNAUTHORIZED_NAME
        if status:
            self._end(_RAKP2, bytes([data[0], status, 0, 0]) + self.clientsessionid)
            return
        self.Rc, guid = os.urandom(16), self.bmc.uuid.bytes
        authcode = self._mac(self.bmc.password, self.clientsessionid + self.managedsessionid
                             + self.Rm + self.Rc + guid + self._role_and_name())
        self.rakp1 = bytes(data)
        self.rakp2 = bytes([data[0], 0, 0, 0]) + self.clientsessionid + self.Rc + guid + authcode
        _send_plain(self.socket, self.sockaddr, _RAKP2, self.rakp2)

    def _role_and_name(self):
        return bytes([self.rolem, len(self.username)]) + self.username

    def _got_rakp3(self, data):
        if self.rakp4 is not None:  # the client lost our RAKP 4: say it again
            _send_plain(self.socket, self.sockaddr, _RAKP4, self.rakp4)
            return
        if self.rakp2 is None or len(data) < 8 or data[1] != 0:
            self.bmc.drop_session(self.managedsessionid)
            return
        expected = self._mac(self.bmc.password,
                             self.Rc + self.clientsessionid + self._role_and_name())
        if not hmac.compare_digest(bytes(data[8:]), expected):
            self._end(_RAKP4, bytes([data[0], _BAD_INTEGRITY_VALUE, 0, 0]) + self.clientsessionid)
            return
        self.sik = self._mac(self.bmc.password, self.Rm + self.Rc + self._role_and_name())
        self.k1 = self._mac(self.sik, b"\x01" * 20)
        self.aeskey = self._mac(self.sik, b"\x02" * 20)[:16]
        icv = self._mac(self.sik, self.Rm + self.managedsessionid + self.bmc.uuid.bytes)
        self.rakp4 = bytes([data[0], 0, 0, 0]) + self.clientsessionid + icv[:self.suite.icv_len]
        _send_plain(self.socket, self.sockaddr, _RAKP4, self.rakp4)
        # from now on pyghmi's framing signs and encrypts, and requests go to the BMC
        self.integrityalgo, self.confalgo, self.sequencenumber = "hmac", "aes", 1
        self.sessionid = struct.unpack("<I", self.clientsessionid)[0]
        self.ipmicallback = self.handle_client_request

    def _end(self, payload_type, payload):
        _send_plain(self.socket, self.sockaddr, payload_type, payload)
        self.bmc.drop_session(self.managedsessionid)

    def close_server_session(self):
        self.bmc.drop_session(self.managedsessionid)

    def _parse_ipmi_payload(self, payload):
        """A request sent again (our answer was lost or late) is answered again, not redone:
        a client's retry must not power-cycle a node twice."""
        request = bytes(payload)
        if request == self.last_request:
            self.send_payload(self.last_reply, payload_type=0, retry=False)
            return
        self.sent = None
        super()._parse_ipmi_payload(payload)
        if self.sent is not None:
            self.last_request, self.last_reply = request, self.sent

    def send_payload(self, payload=(), payload_type=None, retry=True, **kwargs):
        self.sent = payload  # what answers the request being handled
        super().send_payload(payload, payload_type, retry, **kwargs)

    def handle(self, packet):
        self.last_used = time.monotonic()
        self._handle_ipmi2_packet(packet)


# ---------------------------------------------------------------- one BMC

class _NodeBmc:
    """One node's BMC: its socket, its sessions, the chassis commands on its controller.

    Mixed into pyghmi's Bmc (see ``_pyghmi_classes``), whose ``handle_raw_request``
    dispatches the IPMI commands to the methods below.
    """

    def __init__(self, entry, journal, session_class):
        # pyghmi's IpmiServer.__init__ would bind through its shared I/O thread
        self.revision = self.deviceid = self.additionaldevices = self.mfgid = self.prodid = 0
        self.firmwaremajor, self.firmwareminor, self.ipmiversion = 1, 0, 2
        self.uuid, self.kg, self.port = uuid.uuid4(), None, entry.port
        # channel 1; IPMI 2.0 only; non-null user names; no Kg
        self.authcap = bytes([0, 1, 0x80, 0x04, 0x02, 0, 0, 0, 0])
        self.node, self.controller, self.journal = entry.node, entry.controller, journal
        self.user, self.password = bytes(entry.user), bytes(entry.password)
        self.sessions, self._session_class = {}, session_class
        self.bootdev = "default"
        self.serversocket = _bind(entry.address, entry.port, entry.node)

    # ------------------------------------------------ packets

    def handle_datagram(self, data, peer):
        if "bmc-dead" in self.controller.faults:
            return
        if len(data) < 16 or data[:4] != _RMCP_IPMI:
            return
        if data[4] != _AUTHTYPE_RMCPPLUS:  # IPMI 1.5 framing: only sessionless requests
            self.sessionless_data(data, peer)
            return
        payload_type = data[5] & 0x3F
        if payload_type == _OPEN_REQUEST:
            self._open_session(bytearray(data[16:]), peer)
            return
        session_id = data[20:24] if payload_type in (_RAKP1, _RAKP3) else data[6:10]
        session = self.sessions.get(bytes(session_id))
        if session is not None and session.sockaddr == peer:
            session.handle(bytearray(data))
        elif session_id == bytes(4):
            self.sessionless_data(data, peer)

    def _open_session(self, request, peer):
        if len(request) < 8:
            return
        if len(request) < 32:
            status = _ILLEGAL_PARAMETER
        else:
            suite = _proposed_suite(request)
            status = 0 if suite else _NO_CIPHER_SUITE_MATCH
        if status:
            _send_plain(self.serversocket, peer, _OPEN_RESPONSE,
                        bytes([request[0], status, 0, 0]) + bytes(request[4:8]))
            return
        again = self._opening(peer, bytes(request[4:8]), suite)
        if again is not None:  # our answer was lost or late: the same session, not a second one
            again.answer_open(request[0])
            return
        self._make_room()
        session = self._session_class(self, peer, request, suite)
        # filed before it is answered: the client's next packet (RAKP 1) may come at once
        self.sessions[session.managedsessionid] = session
        session.answer_open(request[0])

    def _opening(self, peer, client_session_id, suite):
        """The session ``peer`` opened with this id and suite and has not started to use, if any."""
        return next((s for s in self.sessions.values() if s.sockaddr == peer and s.rakp1 is None
                     and s.clientsessionid == client_session_id and s.suite is suite), None)

    def _make_room(self):
        """Forget idle sessions (clients that never closed theirs), then the oldest if full."""
        now = time.monotonic()
        for key, session in list(self.sessions.items()):
            if now - session.last_used > SESSION_IDLE_TIMEOUT:
                del self.sessions[key]
        if len(self.sessions) >= MAX_SESSIONS:
            oldest = min(self.sessions.values(), key=lambda s: s.last_used)
            del self.sessions[oldest.managedsessionid]

    def new_session_id(self):
        while True:
            candidate = os.urandom(4)
            if candidate != bytes(4) and candidate not in self.sessions:
                return candidate

    def drop_session(self, session_id):
        self.sessions.pop(session_id, None)

    def send_cipher_suites(self, myaddr, mylun, clientaddr, clientlun, clientseq, data, sockaddr):
        """Get Channel Cipher Suites: 3 and 17, all in the first record list."""
        records = b""
        if len(data) > 22 and data[22] & 0x3F == 0:  # list index 0; later ones are empty
            records = b"".join(bytes([0xC0, s.number, s.auth, 0x40 | s.integrity,
                                      0x80 | s.confidentiality]) for s in SUITES)
        head = bytes([clientaddr, (7 << 2) | clientlun])  # response netfn: application
        body = bytes([myaddr, (clientseq << 2) | mylun, 0x54, 0, 1]) + records
        message = head + bytes([_checksum(head)]) + body + bytes([_checksum(body)])
        _send_plain(self.serversocket, sockaddr, 0, message)

    def handle_raw_request(self, request, session):
        data, key = request["data"], (request["netfn"], request["command"])
        needed = _MIN_REQUEST_DATA.get(key, 0)
        if key == (0, 8) and data[:1] == b"\x05":  # boot flags: the device is in byte 2
            needed = 3
        if len(data) < needed:
            session.send_ipmi_response(code=_BAD_LENGTH)
            return
        super().handle_raw_request(request, session)

    # ------------------------------------------------ the chassis, on the node controller

    def get_power_state(self):
        return "on" if self.controller.is_on() else "off"

    def power_on(self):
        return self._act("on", self.controller.power_on)

    def power_off(self):
        return self._act("off", self.controller.power_off)

    def power_shutdown(self):
        return self._act("soft-off", self.controller.power_off)

    def power_cycle(self):
        return self._act("cycle", self.controller.cycle)

    def power_reset(self):
        return self._act("reset", self.controller.reset)

    def get_boot_device(self):
        return self.bootdev

    def set_boot_device(self, bootdevice):
        if self._act("bootdev", lambda: self.controller.set_bootdev(bootdevice),
                     device=bootdevice) == 0:
            self.bootdev = bootdevice

    def get_system_guid(self):
        return self.uuid

    def _act(self, action, do, **fields):
        """Run one action on the controller; the IPMI completion code."""
        lied = "bmc-lies" in self.controller.faults
        self.journal.write(self.node, action, lied=lied, **fields)
        if lied:
            return 0
        try:
            do()
        except Exception:  # the controller is foreign code: its bug must not stop the BMCs
            log.exception("%s: BMC action %s failed in the node controller", self.node, action)
            return _UNSPECIFIED
        return 0


def _bind(address, port, node):
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(address, port, 0,
                                                              socket.SOCK_DGRAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise SystemRequirementError(f"{node}: BMC address {address}: {exc}") from None
    try:
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise SystemRequirementError(f"{node}: cannot bind the BMC to {address} port {port}: "
                                     f"{exc.strerror}") from None
    return sock


@functools.cache
def _pyghmi_classes():
    """Our BMC and session classes over pyghmi's, built on first use (pyghmi is slow to import)."""
    from pyghmi.ipmi import bmc
    from pyghmi.ipmi.private import serversession
    session = type("RmcpSession", (_Session, serversession.ServerSession), {})
    node_bmc = type("NodeBmc", (_NodeBmc, bmc.Bmc), {})
    return node_bmc, session


# ---------------------------------------------------------------- the journal

class _Journal:
    """Power actions as JSON lines (the testbed reads reboot windows from it)."""

    def __init__(self, path):
        self._file = open(path, "a", buffering=1, encoding="utf-8") if path else None

    def write(self, node, action, lied=False, **fields):
        if self._file is None:
            return
        line = {"time": time.time(), "node": node, "action": action, **fields}
        if lied:
            line["lied"] = True
        self._file.write(json.dumps(line) + "\n")

    def close(self):
        if self._file is not None:
            self._file.close()


class MemoryNode:
    """A node controller that only keeps, in memory, its power state and what was done to it
    (for BMCs without a testbed node behind them: the BMC tests, the power benchmark)."""

    def __init__(self, on=False):
        self.on, self.bootdev, self.actions, self.faults = on, None, [], set()

    def power_on(self):
        self.actions.append("on")
        self.on = True

    def power_off(self):
        self.actions.append("off")
        self.on = False

    def reset(self):
        self.actions.append("reset")

    def cycle(self):
        self.actions.append("cycle")
        self.on = True

    def is_on(self):
        return self.on

    def set_bootdev(self, dev):
        self.bootdev = dev


# ---------------------------------------------------------------- all the BMCs

class BmcFarm:
    """The BMCs of ``entries``, served by one thread.

    ``entries``: iterable of ``(address, port, user: bytes, password: bytes,
    controller, node_name)``. Every socket is bound in the constructor, so an
    address in use raises there (SystemRequirementError naming it). Use as a
    context manager, or ``start()``/``stop()``, or ``serve(stop_event)`` in a
    thread of your own.
    """

    def __init__(self, entries, log_path=None):
        node_bmc, session = _pyghmi_classes()
        self._journal = _Journal(log_path)
        self.bmcs = []
        try:
            for entry in entries:
                self.bmcs.append(node_bmc(Entry(*entry), self._journal, session))
        except BaseException:
            self.close()
            raise
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._stop = threading.Event()
        self._thread = None

    def serve(self, stop_event):
        """Answer IPMI requests until ``stop_event`` is set (it is set on return, too)."""
        watcher = threading.Thread(target=self._wake_on, args=(stop_event,), daemon=True,
                                   name="kabin-bmc-stop")
        watcher.start()
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self._wake_reader, selectors.EVENT_READ, None)
                for bmc in self.bmcs:
                    selector.register(bmc.serversocket, selectors.EVENT_READ, bmc)
                while not stop_event.is_set():
                    for key, _ in selector.select():
                        if key.data is not None:
                            _serve_burst(key.data)
        finally:
            stop_event.set()
            watcher.join()

    def _wake_on(self, stop_event):
        stop_event.wait()
        self._wake_writer.send(b"!")

    def start(self):
        self._thread = threading.Thread(target=self.serve, args=(self._stop,), daemon=True,
                                        name="kabin-bmcs")
        self._thread.start()
        return self

    def stop(self, timeout=10.0):
        """Stop serving and close every socket and the journal."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the BMC thread did not stop within %g s (a node controller "
                            "call is stuck?)", timeout)
                return
        self.close()

    def close(self):
        for bmc in self.bmcs:
            bmc.serversocket.close()
        for sock in (getattr(self, "_wake_reader", None), getattr(self, "_wake_writer", None)):
            if sock is not None:
                sock.close()
        self._journal.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


def _serve_burst(bmc):
    """Read what is waiting on one BMC's socket (a bounded burst, for fairness)."""
    for _ in range(_BURST):
        try:
            data, peer = bmc.serversocket.recvfrom(4096, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            log.debug("%s: receive error: %s", bmc.node, exc)
            return
        try:
            bmc.handle_datagram(data, peer)
        except Exception as exc:  # a malformed packet must not silence the BMCs
            log.warning("%s: dropped a bad IPMI packet from %s: %s: %s",
                        bmc.node, peer[0], type(exc).__name__, exc)
            log.debug("traceback", exc_info=True)


def serve_bmcs(entries, stop_event, log_path=None):
    """Serve the BMCs of ``entries`` in the calling thread until ``stop_event`` is set."""
    farm = BmcFarm(entries, log_path)
    try:
        farm.serve(stop_event)
    finally:
        farm.close()
