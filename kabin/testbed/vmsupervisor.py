"""The supervisor of a VM-tier instance: QEMU machines, their BMCs, the boot server.

``ka-testbed up --vm`` starts it in the frontend's network namespace as
``python -m kabin.testbed.vmsupervisor INSTANCE_DIR READY_FD``. It starts one
QEMU per node (in the switches' namespace, where the taps are), dnsmasq and
the HTTP server, the BMCs (bmc.py, each acting on its machine through QMP)
and the control socket (control.py: the same requests as the other tiers).
QEMU and dnsmasq die with the supervisor: they are started by its main thread
with a parent-death signal (vm.die_with_parent); ``down`` finds them anyway.
"""

import logging
import threading
import time

from .. import config as config_mod
from ..errors import UsageError
from ..reboot import port_open
from ..parallel import Executor
from . import bmc, bootserver, control, faults
from . import supervisor as supervisor_mod
from . import layout as layout_mod
from .vm import Machine, MachineSpec

log = logging.getLogger(__name__)

PROBE_INTERVAL = 1.0
VM_FAULT_KINDS = ("bmc-dead", "bmc-lies", "firmware-hang", "link-down", "disk-removed")


def spec_of(lay, index, settings):
    """The MachineSpec of node ``index`` from the instance's VM settings (its state)."""
    name = lay.node_name(index)
    return MachineSpec(
        name=name, mac=lay.mac(index), firmware=settings["firmwares"][index],
        memory=settings["memory"], disk=lay.dir / "disks" / f"{name}.{settings['disk_format']}",
        disk_format=settings["disk_format"], disk_bus=settings["disk_bus"],
        nic=settings["nic"], tap=f"n{index + 1}", dir=lay.node_dir(index))


class VmSupervisor:
    def __init__(self, lay, state):
        self.lay, self.state = lay, state
        self.config = config_mod.Config(lay.config_dir)
        self.machines = {lay.node_name(i): Machine(spec_of(lay, i, state["vm"]),
                                                   netns=lay.switch_netns)
                         for i in range(lay.size)}
        self.marker_port = self.config.server.deploy_marker_port
        self._stop = threading.Event()

    # ------------------------------------------------ requests

    def dispatch(self, request):
        op = request["op"]
        if op == "ping":
            return {"ok": True}
        if op == "status":
            return {"ok": True, "nodes": self.records(self.machines)}
        if op == "shutdown":
            self._stop.set()
            return {"ok": True}
        if op == "wait":
            pending = self.wait(request["nodes"], request["booted"], float(request["timeout"]))
            return {"ok": True, "done": not pending, "pending": pending}
        machine = self._machine(request["node"])
        if op == "power":
            self._power(machine, request["action"])
        elif op == "fault":
            fault = faults.parse(request["fault"])
            if fault.kind not in VM_FAULT_KINDS:
                raise UsageError(f"fault {fault.kind} is not one of the VM tier's: "
                                 f"{', '.join(VM_FAULT_KINDS)}")
            machine.set_faults(machine.faults | {fault.text})
        elif op == "clear":
            machine.set_faults(frozenset())
        else:
            raise UsageError(f"unknown request {op!r}")
        return {"ok": True, "nodes": self.records([machine.spec.name])}

    def _machine(self, name):
        try:
            return self.machines[name]
        except KeyError:
            raise UsageError(f"unknown node {name!r}") from None

    @staticmethod
    def _power(machine, action):
        actions = {"on": machine.power_on, "off": machine.power_off, "reset": machine.reset,
                   "cycle": machine.cycle}
        if action not in actions:
            raise UsageError(f"unknown power action {action!r}: on, off, reset or cycle")
        actions[action]()

    # ------------------------------------------------ what the machines run

    def booted(self, name):
        """deploy (SSH and the marker port open), system (SSH only), none; off when off."""
        if not self.machines[name].is_on():
            return "off"
        node = self.config.node(name)
        if not port_open(node.address, node.ssh_port):
            return "none"
        return "deploy" if port_open(node.address, self.marker_port) else "system"

    def records(self, names):
        def record(name):
            machine, node = self.machines[name], self.config.node(name)
            state = machine.state()
            rec = {"node": name, "status": "ok", "kind": "vm", "address": node.address,
                   "bmc": f"{node.bmc.address}:{node.bmc.port}", "firmware":
                   machine.spec.firmware, "power": "on" if machine.is_on() else "off",
                   "qemu": state, "booted": self.booted(name),
                   "console": machine.console_tail()}
            if machine.faults:
                rec["faults"] = sorted(machine.faults)
            return rec

        return Executor(16).map(record, names, timeout=60)

    def wait(self, names, want, timeout):
        """Wait (probing every second, at most ``timeout`` s) until every node of ``names``
        booted ``want`` (deploy, system, up: either, off, settled: anything but none)."""
        deadline = time.monotonic() + timeout
        pending = list(names)
        while pending:
            pending = [n for n in pending if not _matches(self.booted(n), want)]
            if not pending or self._stop.wait(min(PROBE_INTERVAL,
                                                  max(0.0, deadline - time.monotonic()))) \
                    or time.monotonic() >= deadline:
                break
        return self.records(pending) if pending else []

    # ------------------------------------------------ life

    def bmc_entries(self):
        secret = layout_mod.SHARED_SECRET.read_text().strip().encode()
        user = layout_mod.BMC_USER.encode()
        return [(self.lay.bmc_address(i), layout_mod.BMC_PORT, user, secret,
                 self.machines[self.lay.node_name(i)], self.lay.node_name(i))
                for i in range(self.lay.size)]

    def stop(self):
        self._stop.set()

    def run(self, ready):
        started = []
        try:
            conf = bootserver.write_config(self.lay, self.config)
            dnsmasq = bootserver.start_dnsmasq(conf, self.lay.dir / "boot" / "dnsmasq.log")
            started.append(dnsmasq)
            http = bootserver.HttpServer(self.lay.frontend_address,
                                         self.config.server.pxe_root).start()
            for machine in self.machines.values():     # this thread: see die_with_parent
                machine.start()
            farm = bmc.BmcFarm(self.bmc_entries(), self.lay.dir / "bmc.log").start()
            server = control.Server(self.lay.control_socket, self.dispatch).start()
        except Exception as exc:
            log.exception("start failed")
            ready.write(f"{exc}\n")
            ready.flush()
            self._stop_all(started)
            return
        ready.write("ok\n")
        ready.flush()
        self._stop.wait()
        log.info("shutting down")
        server.stop()
        farm.stop()
        http.stop()
        self._stop_all(started)

    def _stop_all(self, processes):
        for machine in self.machines.values():
            machine.stop()
        for proc in processes:
            proc.terminate()
            proc.wait(10)


def _matches(booted, want):
    if want == "up":
        return booted in ("deploy", "system")
    if want == "settled":
        return booted != "none"
    return booted == want


def main(argv=None):
    supervisor_mod.main(argv, VmSupervisor)


if __name__ == "__main__":
    main()
