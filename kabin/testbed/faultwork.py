"""The supervisor's side of the faults (faults.py says what each one means).

A mixin of the Supervisor: it uses its lock, its timers and ``crash``. Effects
on a running node start when the fault is set or when the node is up
(``node_started``) and stop when it is cleared or the node goes
(``node_stopped``).
"""

import logging

from ..errors import UsageError
from . import effects, netns
from . import node as node_mod

log = logging.getLogger(__name__)

BYTES_PERIOD = 0.05         # byte counters have no event: they are read this often


class FaultWork:
    def __init__(self):
        self._counting = False

    # ------------------------------------------------ setting and clearing

    def set_fault(self, node, fault):
        if fault.kind == "slow-link" and not self.lay.netns:
            raise UsageError("slow-link shapes a node's link: the instance needs the netns tier "
                             "(ka-testbed up --netns)")
        with self.lock:
            node.faults[fault.kind] = fault
            node.fault_names = frozenset(f.text for f in node.faults.values())
            log.info("%s: fault %s", node.name, fault.text)
            if fault.kind == "returns-on-boot":
                node.boots_since_fault = 0
            elif fault.kind == "slow-link":
                netns.shape_node(self.lay, node.index, fault.value)
            elif fault.kind == "die-after-bytes" and node.running:
                counts = effects.tcp_received(node.address, self._node_netns(node))
                node.received = {key: (value, value) for key, value in counts.items()}
            elif fault.kind == "disk-full":
                node_mod.set_disk_full(node.dir, True)
                if node.running:
                    effects.disk_full(node.init, node.dir, True, node.loop)
            if node.running:
                self.node_started(node)
            self.changed.notify_all()

    def clear_faults(self, node):
        with self.lock:
            cleared, node.faults, node.fault_names = node.faults, {}, frozenset()
            log.info("%s: faults cleared", node.name)
            if "ssh-dead" in cleared and node.init:
                effects.freeze_sshd(node.init, False)
            if "slow-link" in cleared:
                netns.shape_node(self.lay, node.index, self.link_rate)
            if "disk-full" in cleared:
                node_mod.set_disk_full(node.dir, False)
                effects.disk_full(node.init, node.dir, False, node.loop)
            self.changed.notify_all()

    def fault_hang(self, node):
        """Why this boot hangs because of a fault, or None (counts the boots)."""
        if "never-returns" in node.faults:
            return "fault never-returns: the node does not come back"
        fault = node.faults.get("returns-on-boot")
        if fault is not None:
            node.boots_since_fault += 1
            if node.boots_since_fault < fault.value:
                return (f"fault {fault.text}: boot {node.boots_since_fault} of {fault.value} "
                        "hangs")
        return None

    # ------------------------------------------------ a node comes up or goes

    def node_started(self, node):
        """Apply the faults that act on a running node."""
        if "ssh-dead" in node.faults and node.init:
            effects.freeze_sshd(node.init, True)
        if "die-after-bytes" in node.faults and not self._counting:
            self._counting = True
            self._schedule(BYTES_PERIOD, self._count_bytes)

    def node_stopped(self, node):
        node.received = {}

    # ------------------------------------------------ die-after-bytes

    def _node_netns(self, node):
        return self.lay.node_netns(node.index) if self.lay.netns else None

    def _count_bytes(self):
        watched = [n for n in self.nodes if "die-after-bytes" in n.faults and n.running]
        for node in watched:
            counts = effects.tcp_received(node.address, self._node_netns(node))
            for key, value in counts.items():
                base, _ = node.received.get(key, (0, 0))
                node.received[key] = (base, value)
            total = sum(last - base for base, last in node.received.values())
            limit = node.faults["die-after-bytes"]
            if total > limit.value:
                self.crash(node, f"fault {limit.text}: died after receiving {total} bytes")
        self._counting = bool(watched)
        if self._counting:
            self._schedule(BYTES_PERIOD, self._count_bytes)
