"""The netns tier's network: a namespace per node, bridges as switches, tc shaping.

    node-K netns: eth0 (10.S.x.y/16) ==veth== nK in bridge br-sJ  \\
                                                                 | switches netns:
    frontend netns: eth0 (10.S.0.1/16) ==veth== fe in br-core    | br-sJ ==uplink veth
                                                                 / (upJ, dnJ)== br-core
Namespaces are named ``kt-NAME.frontend``, ``kt-NAME.switches``, ``kt-NAME.node-K``
(NAME: the instance's), so instances never meet.
A node link is shaped at both ends (the switch port for what the node receives,
the node's eth0 for what it sends) with a token bucket (``tbf``): this kernel
has no netem, so rates only.
"""

import logging
import subprocess

from ..errors import SystemRequirementError
from ..parallel import Executor
from . import layout as layout_mod

log = logging.getLogger(__name__)

TIMEOUT = 60


def _run(argv, commands=None, check=True):
    try:
        done = subprocess.run(argv, input=commands, capture_output=True, text=True,
                              timeout=TIMEOUT)
    except FileNotFoundError:
        raise SystemRequirementError(f"{argv[0]} is missing: install iproute2") from None
    except subprocess.TimeoutExpired:
        raise SystemRequirementError(f"{' '.join(argv)} did not finish in {TIMEOUT} s") from None
    if check and done.returncode != 0:
        raise SystemRequirementError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done


def _batch(tool, netns, lines):
    """Run ``lines`` through ``ip -b`` or ``tc -b`` (in ``netns`` if given)."""
    argv = [tool] + (["-n", netns] if netns else []) + ["-b", "-"]
    _run(argv, "\n".join(lines) + "\n")


def tbf(rate_bits):
    """tc parameters of a token bucket at ``rate_bits`` bits/s: a burst of 10 ms (64 KiB
    at least: a smaller one makes TCP lose packets at low rates), 100 ms of queue."""
    burst = max(rate_bits // 8 // 100, 64 * 1024)
    return f"tbf rate {rate_bits}bit burst {burst} latency 100ms"


def create(lay, groups, link_rate=None, uplink_rate=None, fanout=16, vm=False):
    """Make the namespaces, bridges and links of ``lay`` (``groups``: node indexes per switch).

    ``vm``: the nodes are virtual machines, each on a tap ``nK`` of its switch (opened
    by QEMU in the switches' namespace) instead of a veth into a namespace of its own.
    """
    nodes = range(lay.size)
    spaces = [lay.frontend_netns, lay.switch_netns] + ([] if vm else
                                                       [lay.node_netns(i) for i in nodes])
    _batch("ip", None, [f"netns add {name}" for name in spaces])
    _batch("ip", lay.switch_netns, _switch_commands(lay, groups, vm))
    _bridges_skip_netfilter(lay.switch_netns)
    prefix = f"/{layout_mod.NETNS_PREFIX_LEN}"
    _batch("ip", lay.frontend_netns, ["link set lo up", f"addr add {lay.frontend_address}{prefix}"
                                      " dev eth0", "link set eth0 up"])
    if link_rate or uplink_rate:
        shaping = [f"qdisc add dev n{i + 1} root {tbf(link_rate)}" for i in nodes if link_rate]
        shaping += [f"qdisc add dev {end}{k + 1} root {tbf(uplink_rate)}"
                    for k in range(len(groups)) for end in ("up", "dn") if uplink_rate]
        _batch("tc", lay.switch_netns, shaping)
    if vm:
        # iPXE waits ~13 s for IPv6 autoconfiguration unless a router answers: the boot
        # server's dnsmasq sends router advertisements from this address
        _batch("ip", lay.frontend_netns, [f"addr add {lay.frontend_ipv6}/64 dev eth0"])
        for i in nodes if link_rate else ():
            _shape_tap_ingress(lay, i, link_rate)
        return

    def configure(index):
        node_ns = lay.node_netns(index)
        _batch("ip", node_ns, ["link set lo up", f"addr add {lay.node_address(index)}{prefix} "
                               "dev eth0", "link set eth0 up"])
        if link_rate:
            _batch("tc", node_ns, [f"qdisc add dev eth0 root {tbf(link_rate)}"])

    Executor(fanout).map(configure, nodes, timeout=300)


# With br_netfilter loaded (docker, some distributions), every frame a bridge forwards
# goes through the iptables hooks: at 32 shaped links that was a tenth of the CPU, a
# cost no real switch has.
BRIDGE_NETFILTER = [f"/proc/sys/net/bridge/bridge-nf-call-{t}" for t in ("iptables", "ip6tables",
                                                                        "arptables")]


def _bridges_skip_netfilter(netns):
    """The switches forward frames as switches do (no-op when br_netfilter is not loaded)."""
    script = f'for f in {" ".join(BRIDGE_NETFILTER)}; do [ ! -e "$f" ] || echo 0 > "$f"; done'
    _run(["ip", "netns", "exec", netns, "sh", "-c", script])


def _shape_tap_ingress(lay, index, rate_bits):
    """Shape what a VM sends (its tap's ingress): this kernel has no policing action,
    so the tap's ingress is redirected to an IFB device, shaped there with tbf."""
    tap, ifb = f"n{index + 1}", f"ifb{index + 1}"
    _batch("ip", lay.switch_netns, [f"link add {ifb} type ifb", f"link set {ifb} up"])
    _batch("tc", lay.switch_netns, [
        f"qdisc add dev {tap} handle ffff: ingress",
        f"filter add dev {tap} parent ffff: protocol all prio 1 u32 match u32 0 0 "
        f"action mirred egress redirect dev {ifb}",
        f"qdisc add dev {ifb} root {tbf(rate_bits)}"])


def _switch_commands(lay, groups, vm=False):
    lines = ["link set lo up", "link add br-core type bridge", "link set br-core up",
             f"link add fe type veth peer name eth0 netns {lay.frontend_netns}",
             "link set fe master br-core up"]
    for k, members in enumerate(groups, 1):
        lines += [f"link add br-s{k} type bridge", f"link set br-s{k} up",
                  f"link add up{k} type veth peer name dn{k}",
                  f"link set up{k} master br-s{k} up", f"link set dn{k} master br-core up"]
        for i in members:
            lines.append(f"tuntap add dev n{i + 1} mode tap" if vm else
                         f"link add n{i + 1} type veth peer name eth0 address {lay.mac(i)} "
                         f"netns {lay.node_netns(i)}")
            lines.append(f"link set n{i + 1} master br-s{k} up")
    return lines


def shape_node(lay, index, rate_bits):
    """Shape node ``index``'s link to ``rate_bits`` both ways (None: unshaped)."""
    for netns, dev in ((lay.switch_netns, f"n{index + 1}"), (lay.node_netns(index), "eth0")):
        if rate_bits:
            _run(["tc", "-n", netns, "qdisc", "replace", "dev", dev, "root"]
                 + tbf(rate_bits).split())
        else:
            _run(["tc", "-n", netns, "qdisc", "del", "dev", dev, "root"], check=False)


def existing(prefix):
    """Names of the network namespaces that start with ``prefix``."""
    listing = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in listing.splitlines()
            if line.split() and line.split()[0].startswith(prefix)]


def delete(prefix):
    """Delete every namespace of an instance (what lives in them goes with them)."""
    names = existing(prefix)
    if names:
        _run(["ip", "-b", "-"], "".join(f"netns del {n}\n" for n in names), check=False)
    return names
