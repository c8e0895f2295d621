"""One broadcast: start the agents, wire the chain (or tree), heal it, verify, report.

The coordinator runs in the caller's thread and yields each node's record as
soon as it is known. It learns everything from events: the agents' (over their
control channels) and the source's. Every wait is bounded: the agents' start,
the heartbeats (``stall_timeout``), the whole broadcast (``timeout``).

Failures, as in Kascade: a relay that dies (its control channel ends, or its
parent loses the connection) or stalls (its parent has had data for it for
``stall_timeout`` seconds and it took none, see ``topology.stalled_nodes``) is
KO with the reason and taken out: its parent adopts its children, which resume
from their own offsets. A node whose disk fails is KO but keeps relaying.
"""

import dataclasses
import logging
import queue
import secrets
import socket
import threading
import time
from dataclasses import dataclass

from .. import records
from ..errors import KabinError
from ..parallel import Deadline, Executor
from . import order
from .bittorrent import Swarm
from .multicast import RENDEZVOUS, UdpSender, interface_towards, route_towards
from .sender import Source, SourceDigest, WrittenDigest
from .topology import SOURCE, Topology, stalled_nodes

log = logging.getLogger(__name__)
progress_log = logging.getLogger("kabin.progress")

STEP = "chaincast"
ENGINES = ("multicast", "bittorrent")   # methods whose data goes through another engine
MB = 1 << 20


@dataclass(frozen=True)
class Options:
    """A broadcast: what is sent where (``ka-chaincast``'s options; ``to_argv()`` renders
    them) and how the chain runs (the last five fields are library-only tuning)."""

    env: str | None = None           # the environment whose image is sent (NAME[@VERSION])
    owner: str | None = None         # its owner
    image: str | None = None         # or this image file
    kind: str | None = None          # tar | dd (default: the environment's, else tar)
    compression: str | None = None   # default: the environment's, else read from the file
    sha256: str | None = None        # the image file's, when known (checked on the way)
    dest: str | None = None          # where each node writes (default: image.default_dest)
    store: bool = False              # write the image as it is into the file ``dest``
    method: str = "chain"            # chain | tree | multicast | bittorrent | auto (order.pick_method)
    fanout: int = order.TREE_FANOUT  # children per node with the tree method
    min_receivers: int | None = None  # multicast: start when this many joined (default: all)
    fec: str | None = None           # multicast: udpcast's forward error correction, SxR/L
    spool: str = "/tmp"              # bittorrent: where each node keeps the image it fetches
    order: str = "topology"          # topology | name | input
    stall_timeout: float = 30.0      # seconds without progress before a node is declared stalled
    timeout: float | None = None     # the whole broadcast (default: broadcast_timeout)
    max_rate: float | None = None    # bytes per second the source sends at most
    ring: int = 16 * MB              # bytes each relay keeps for repairs (its memory bound)
    verify: str = "written"          # written (read back from the disk) | stream (as received)
    launch: str = "auto"             # direct | tree | auto (tree past start_fanout nodes)
    launch_fanout: int = 8           # agents each agent starts, with a tree launch
    step: str = STEP
    start_timeout: float = 60.0      # starting every agent
    interval: float = 1.0            # seconds between two state reports of an agent
    start_fanout: int = 64           # agents started at once by the frontend
    progress_every: float = 2.0      # seconds between two progress lines

    def to_argv(self):
        """The ka-chaincast command line doing the same."""
        default = Options()
        argv = ["ka-chaincast"] + ([] if self.step == STEP else [f"--step={self.step}"])
        argv += [f"--env={self.env}"] if self.env else [f"--image={self.image}"]
        flags = (("--owner", "owner"), ("--kind", "kind"), ("--compression", "compression"),
                 ("--to", "dest"), ("--order", "order"), ("--verify", "verify"))
        argv += [f"{flag}={getattr(self, name)}" for flag, name in flags
                 if getattr(self, name) != getattr(default, name)]
        argv.append(f"--method={self.method}")   # the command's default is auto
        argv += ["--store"] if self.store else []
        if self.method == "tree" and self.fanout != default.fanout:
            argv.append(f"--tree-fanout={self.fanout}")
        if self.method == "multicast":
            argv += [f"--min-receivers={self.min_receivers}"] if self.min_receivers else []
            argv += [f"--fec={self.fec}"] if self.fec else []
        if self.method == "bittorrent" and self.spool != default.spool:
            argv.append(f"--spool={self.spool}")
        if self.launch != default.launch:
            argv.append(f"--launch={self.launch}")
        if self.launch_fanout != default.launch_fanout:
            argv.append(f"--launch-fanout={self.launch_fanout}")
        for flag, name, unit in (("--stall-timeout", "stall_timeout", 1), ("--timeout", "timeout", 1),
                                 ("--max-rate", "max_rate", MB), ("--ring-size", "ring", MB)):
            value = getattr(self, name)
            if value is not None and value != getattr(default, name):
                argv.append(f"{flag}={value / unit:g}")
        return argv


@dataclass
class _Node:
    record: dict
    address: str
    handle: object = None
    port: int | None = None
    state: dict | None = None
    heard: float = 0.0
    status: str | None = None        # ok | ko once the node's record is out
    usage: dict | None = None        # the agent's CPU seconds and peak memory when it was done
    fed: float = 0.0                 # when its parent last reported it took data (a sign of life)
    fed_offset: int = -1             # the offset its parent reported then
    via: str | None = None           # the address its agent was started from (SSH), or "-"


class Broadcast:
    """Broadcast ``image`` (an ``image.Image``) to the OK records given to ``run``.

    ``launcher`` starts agents (``SshLauncher`` or ``LocalLauncher``);
    ``address_of(node)`` is where its agent listens; ``dest_of(node)`` where it
    writes; ``ports`` the (first, last) TCP port range; ``observer``, if given,
    receives a progress snapshot at each tick.
    """

    def __init__(self, image, launcher, address_of, dest_of, ports, options=Options(),
                 switch_of=None, uplink_of=None, store=False, stop=None, observer=None):
        if options.timeout is None:
            options = dataclasses.replace(options, timeout=broadcast_timeout(image.size))
        self.image, self.launcher, self.options = image, launcher, options
        self.address_of, self.dest_of, self.ports = address_of, dest_of, ports
        self.switch_of, self.uplink_of, self.store = switch_of, uplink_of, store
        self.executor = Executor(options.start_fanout, stop)
        self.stop = self.executor.stop     # the caller gives up (Ctrl-C, broken pipe)
        self.halt = threading.Event()      # this broadcast is over: the source stops
        self.observer = observer
        self.events = queue.Queue()
        self.token = secrets.token_hex(16)
        self.nodes, self.topology, self.source, self.digest = {}, None, None, None
        self.written = None
        self.engine = None                 # multicast's UdpSender, bittorrent's Swarm
        self.launching = None              # a tree launch (closed at the end)

    # ------------------------------------------------------------ the whole run

    def run(self, items):
        """Yield the records of ``items``: KO ones at once, the others when their fate is known."""
        wanted = []
        for record in items:
            if records.is_ok(record):
                wanted.append(record)
            else:
                yield record
        if not wanted:
            return
        if self.options.method == "auto":
            self.options = dataclasses.replace(
                self.options, method=order.pick_method(self.image.size, len(wanted)))
        self.started = time.monotonic()
        self.deadline = Deadline(self.options.timeout)
        try:
            if self.options.method == "bittorrent":
                self.engine = self._swarm([record["node"] for record in wanted])
            yield from self._start(wanted)
            ready = [name for name, n in self.nodes.items() if _ready(n)]
            if ready:
                self._digests()
                self._wire(ready)
                yield from self._watch()
        finally:
            self._close()

    def _start(self, wanted):
        """Start every agent (in parallel) and wait until each is ready or failed."""
        for record in wanted:
            name = record["node"]
            try:
                self.nodes[name] = _Node(record, self.address_of(name))
            except KabinError as exc:  # e.g. a node the configuration does not know
                self.nodes[name] = _Node(record, None)
                yield from self._fail(name, str(exc))
                continue
        waiting = {name for name, node in self.nodes.items() if node.status is None}
        self.launching = self.launcher.launch(
            {name: self.nodes[name].address for name in self._ordered(
                [name for name in self.nodes if name in waiting])}, self._job,
            self.events, self.options.start_timeout, self.executor, self._launch_fanout(waiting))
        start = Deadline(self.options.start_timeout)
        while waiting and not start.expired:
            try:
                name, event = self.events.get(timeout=start.remaining())
            except queue.Empty:
                break
            yield from self._handle(name, event)
            if _ready(self.nodes[name]) or self.nodes[name].status:
                waiting.discard(name)
        for name in waiting:
            yield from self._fail(name, f"relay agent not ready after {self.options.start_timeout:.0f} s")

    def _digests(self):
        """What the nodes' digests must be, computed in the background during the stream
        (not during the agents' start: it would hold the GIL their SSH handshakes need)."""
        self.digest = SourceDigest(self.image.path, self.halt, self.image.sha256)
        if self.options.verify == "written":
            self.written = self.digest if self.store else WrittenDigest(self.image, self.halt)

    def _launch_fanout(self, names):
        """The fanout of a tree launch, or None when the frontend starts every agent."""
        how = self.options.launch
        if how == "tree" or (how == "auto" and len(names) > self.options.start_fanout):
            return self.options.launch_fanout
        return None

    def _ordered(self, names):
        switch_of = self.switch_of if self.options.order == "topology" else None
        return order.order_nodes(names, self.options.order, switch_of, self.uplink_of)

    def _job(self, name, address):
        """What ``name``'s agent is told when it starts."""
        bind = _resolve(address)
        return {"name": name, "token": self.token, "size": self.image.size,
                "kind": self.image.kind, "compression": self.image.compression,
                "store": self.store, "dest": self.dest_of(name), "ports": list(self.ports),
                "bind": bind, "ring": self.options.ring, "interval": self.options.interval,
                "verify": self.options.verify, "multicast": self._multicast_job(bind or address),
                "bittorrent": self._bittorrent_job(), "deadline": self._lifetime()}

    def _multicast_job(self, interface):
        """What a node's receiver needs (None with the other methods): it gives up when no
        sender starts within the agents' start-up, or the stream stops for a stall."""
        if self.options.method != "multicast":
            return None
        return {"portbase": self.ports[0], "interface": interface,
                "rendezvous": RENDEZVOUS,
                "start_timeout": int(2 * self.options.start_timeout),
                "receive_timeout": int(self.options.stall_timeout)}

    def _bittorrent_job(self):
        """The torrent and how long to seed (None with the other methods)."""
        if self.options.method != "bittorrent":
            return None
        return {"torrent": self.engine.job(), "spool": self.options.spool,
                "ports": list(self.ports), "stall": int(self.options.stall_timeout),
                "seed_seconds": self._lifetime()}

    def _lifetime(self):
        """The longest an agent (and what it runs: aria2c seeding) lives: start-up and broadcast."""
        return self.options.timeout + self.options.start_timeout

    def _swarm(self, names):
        """Tracker and seeder, on the frontend's address towards the nodes (the first
        known one's; the unknown ones fail in ``_start``)."""
        for name in names:
            try:
                address = _resolve(self.address_of(name)) or name
            except KabinError:
                continue
            return Swarm(self.image.path, route_towards(address)[1], self.ports,
                         self._lifetime())
        return None

    def _wire(self, ready):
        ordered = self._ordered(ready)
        self.source = Source(self.image.path, self.image.size, self.token, self.events, self.halt,
                             self.options.max_rate)
        self.wired = time.monotonic()
        if self.options.method in ENGINES:   # no relay sends: a node joins to be repaired
            self.topology = Topology({})
        else:
            fanout = 1 if self.options.method == "chain" else self.options.fanout
            self.topology = Topology(order.layout(ordered, fanout))
        log.debug("%s order: %s", self.options.method, " ".join(ordered))
        for sender in ordered + [SOURCE]:  # every node, leaves too: its ring holds data till then
            self._send_children(sender)
        if self.options.method == "multicast":
            self._start_multicast(ordered)

    def _watch(self):
        """Handle events until every node's fate is known or the deadline passes."""
        next_check = time.monotonic() + self.options.interval
        self.next_progress = time.monotonic() + self.options.progress_every
        while any(n.status is None for n in self.nodes.values()):
            if self.deadline.expired or self.stop.is_set():
                yield from self._time_out()
                break
            try:
                name, event = self.events.get(timeout=max(0.0, next_check - time.monotonic()))
            except queue.Empty:
                pass
            else:
                yield from self._handle(name, event)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + self.options.interval
                yield from self._check_stalls()
                self._progress()
        self._progress(final=True)

    def _start_multicast(self, ready):
        receivers = min(self.options.min_receivers or len(ready), len(ready))
        interface = interface_towards(_resolve(self.nodes[ready[0]].address))
        log.info("multicast on %s to %d node(s), starting with %d", interface, len(ready),
                 receivers)
        self.engine = UdpSender(self.image.path, self.ports[0], interface, receivers,
                                   int(self.options.start_timeout), self.options.fec,
                                   self.options.max_rate)

    def _repair(self, name, offset, why):
        """A multicast or bittorrent receiver ended short: the source sends it the rest
        by unicast."""
        node = self.nodes.get(name)
        if node is None or node.status is not None or name in self.topology:
            return
        log.info("%s: %s at byte %d; repaired by unicast from the source", name, why, offset)
        self.topology.feed_from_source(name)
        self._send_children(SOURCE)

    # ------------------------------------------------------------ events

    def _handle(self, name, event):
        kind = event["ev"]
        node = self.nodes.get(name)
        if kind == "state" and node:
            node.state, node.heard = event, time.monotonic()
            self._note_feeding(event, node.heard)
        elif kind == "started":
            yield from self._started(name, event)
        elif kind == "ready":
            node.port, node.heard, node.via = event["port"], time.monotonic(), event.get("via")
            log.debug("%s: agent ready, started from %s", name, node.via)
            if self.topology is not None:  # too late: the chain is wired
                yield from self._fail(name, "relay agent started too late")
        elif kind == "done":
            yield from self._done(name, event)
        elif kind == "sink-failed":
            yield from self._resolve(name, "ko", error=event["reason"])
        elif kind == "child-lost":
            if self.topology and self.topology.parent.get(event["child"], 0) == name:
                sender = "the source" if name is SOURCE else name
                yield from self._fail(event["child"], f"connection from {sender} lost: "
                                                      f"{event['reason']}")
        elif kind == "cannot-serve":
            self._refeed(name, event["child"], event["offset"])
        elif kind in ("fatal", "exit"):
            yield from self._fail(name, event["reason"])
        elif kind == "upstream-lost" and self.engine is not None:
            self._repair(name, event["offset"], event.get("reason", "upstream lost"))
        elif kind == "upstream-lost":
            log.debug("%s: lost its upstream at %d bytes", name, event["offset"])

    def _started(self, name, event):
        if event["error"] is not None:
            exc = event["error"]
            reason = str(exc) if str(exc) else type(exc).__name__
            yield from self._fail(name, f"cannot start the relay agent: {reason}")
        else:
            self.nodes[name].handle = event["handle"]
            if self.nodes[name].status is not None:  # failed while starting
                event["handle"].close()

    def _done(self, name, event):
        self.nodes[name].usage = usage = {k: event[k] for k in ("cpu", "peak_mb") if k in event}
        log.info("%s: received and written (agent: %s s of CPU, peak memory %s MB)", name,
                 usage.get("cpu", "?"), usage.get("peak_mb", "?"))
        log.debug("%s: agent's timeline (s): %s, done %s", name, event.get("timeline"),
                  event.get("time"))
        fields = {"bytes": event["bytes"], "sha256": event["sha256"]}
        if "written" in event:
            fields["written_sha256"] = event["written"]
        error = self._verify(self.digest, event["sha256"], "received data differs from the image")
        if error is None and self.written is not None:
            error = self._verify(self.written, event.get("written"),
                                 "the disk gave back other data than the image's")
        if error:
            yield from self._resolve(name, "ko", error=error, **fields)
        else:
            yield from self._resolve(name, "ok", **fields)

    def _verify(self, expected, seen, mismatch):
        """None if ``seen`` is the digest ``expected`` computes, else why not."""
        value = expected.result(self.deadline.remaining())
        if value is None:
            why = expected.error or "the source digest is not known"
            return f"cannot verify the data: {why}"
        if seen != value:
            return f"checksum mismatch: {mismatch}"
        return None

    def _resolve(self, name, status, error=None, **fields):
        node = self.nodes[name]
        if node.status is not None:
            return
        node.status = status
        elapsed = time.monotonic() - self.started
        if status == "ok":
            yield records.ok(node.record, STEP, elapsed, **fields)
        else:
            yield records.ko(node.record, STEP, error, elapsed, **fields)

    # ------------------------------------------------------------ failures and repairs

    def _fail(self, name, reason, kill=False):
        """``name`` is dead or stalled: KO (if not already known) and out of the chain."""
        node = self.nodes.get(name)
        if node is None:
            return
        received = (node.state or {}).get("recv", 0)
        if self.topology is not None and received < self.image.size:
            reason += f" (at {100 * received // max(self.image.size, 1)} % of the image)"
        yield from self._resolve(name, "ko", error=reason)
        if self.topology is not None and name in self.topology:
            log.info("%s: taken out of the %s: %s", name, self.options.method, reason)
            parent = self.topology.remove(name)
            self._send_children(parent)
        if node.handle is not None:
            if kill:
                node.handle.kill()
            node.handle.close()

    def _refeed(self, parent, child, offset):
        """``parent`` no longer holds ``child``'s offset: the source feeds the child."""
        if self.topology is None or self.topology.parent.get(child, 0) != parent:
            return
        log.info("%s: resumes from the source at byte %d", child, offset)
        self.topology.feed_from_source(child)
        self._send_children(parent)
        self._send_children(SOURCE)

    def _send_children(self, sender):
        children = [[kid, self.nodes[kid].address, self.nodes[kid].port]
                    for kid in self.topology.children.get(sender, [])]
        if sender is SOURCE:
            self.source.set_children(children)
        elif self.nodes[sender].handle is not None:
            self.nodes[sender].handle.send({"cmd": "children", "children": children})

    def _check_stalls(self):
        limit, now = self.options.stall_timeout, time.monotonic()
        source_state = self.source.state()
        self._note_feeding(source_state, now)
        silent = [name for name, node in self.nodes.items()   # multicast nodes too
                  if node.status is None and node.port is not None
                  and now - max(node.heard, node.fed) > limit]
        for name in silent:
            yield from self._fail(name, f"not responding for {limit:.0f} s", kill=True)
        states = {name: self.nodes[name].state for name in self.topology.parent}
        states[SOURCE] = source_state
        for name, reason in stalled_nodes(self.topology, states, limit):
            yield from self._fail(name, reason, kill=True)

    def _note_feeding(self, state, now):
        """A child whose offset moved since its parent's last report took data: it is alive,
        even when its own reports are late (they share its saturated link with the data)."""
        for child, (offset, _) in state.get("fwd", {}).items():
            node = self.nodes.get(child)
            if node is not None and offset is not None and offset > node.fed_offset:
                node.fed_offset, node.fed = offset, now

    def _time_out(self):
        why = "interrupted" if self.stop.is_set() else f"timeout after {self.options.timeout:.0f} s"
        for name, node in list(self.nodes.items()):
            if node.status is None:
                yield from self._fail(name, why)

    # ------------------------------------------------------------ progress and end

    def snapshot(self):
        """Where the broadcast stands: bytes of the slowest node still receiving, nodes done."""
        waiting = [n for n in self.nodes.values() if n.status is None]
        received = {name: (n.state or {}).get("recv", 0) for name, n in self.nodes.items()}
        return {"size": self.image.size,
                "bytes": min(((n.state or {}).get("recv", 0) for n in waiting), default=self.image.size),
                "nodes": received, "total": len(self.nodes),
                "done": sum(n.status == "ok" for n in self.nodes.values()),
                "ko": sum(n.status == "ko" for n in self.nodes.values())}

    def _progress(self, final=False):
        snap = self.snapshot()
        if self.observer:
            self.observer(snap)
        now = time.monotonic()
        if not final and now < self.next_progress:
            return
        self.next_progress = now + self.options.progress_every
        elapsed = max(now - self.wired, 1e-3)
        rate = snap["bytes"] / elapsed
        eta = f", ETA {(snap['size'] - snap['bytes']) / rate:.0f} s" if rate and not final else ""
        progress_log.info("image at every node: %.1f/%.1f MB, %.1f MB/s%s, %d/%d nodes done%s",
                          snap["bytes"] / MB, snap["size"] / MB, rate / MB, eta, snap["done"],
                          snap["total"], f", {snap['ko']} KO" if snap["ko"] else "")

    def _close(self):
        self.halt.set()
        for node in self.nodes.values():
            if node.handle is not None:
                node.handle.close()
        if self.source is not None:
            self.source.close()
        if self.engine is not None:
            self.engine.close()
        if self.launching is not None:
            self.launching.close()


def broadcast_timeout(size):
    """A deadline for the whole broadcast: 5 minutes plus 1 s per MB (a 1 MB/s floor)."""
    return 300.0 + size / (1 << 20)


def _ready(node):
    return node.status is None and node.port is not None and node.handle is not None


def _resolve(address):
    """The IP the agent should listen on (it falls back to all addresses if not its own)."""
    try:
        return socket.gethostbyname(address)
    except OSError:
        return ""
