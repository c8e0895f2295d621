"""Where each boot method reads a node's profile, and under which name.

The layout (relative to ``server.pxe_root``; the testbed's boot emulator reads
exactly these files):

- PXELINUX: ``pxelinux.cfg/<NAME>``
- iPXE:     ``ipxe/<NAME>`` (a script starting with ``#!ipxe``)
- GRUB:     ``grub/grub.cfg-<NAME>``

NAME follows the cluster's ``pxe.naming``: ``ip_hex`` (10.0.0.1 -> ``0A000001``),
``ip`` (``10.0.0.1``), ``mac`` (``01-`` then the MAC in lowercase with dashes,
as PXELINUX and GRUB look it up), ``hostname`` (the node's name) or
``hostname_short`` (up to its first dot).

How the firmware finds the file: PXELINUX and GRUB look for the ``mac`` and
``ip_hex`` names by themselves; for GRUB with the other namings ka-pxe writes
``grub/grub.cfg``, which GRUB reads when neither exists and which sends it on.
An iPXE node gets ``ipxe/<NAME>`` as its DHCP boot file, or ``ipxe/boot.ipxe``
(written by ka-pxe for the ``ip``, ``mac`` and ``hostname`` namings), which
chains to it.
"""

import ipaddress
import re

from ..errors import UsageError

METHOD_FILES = {
    "pxelinux": "pxelinux.cfg/{}",
    "ipxe": "ipxe/{}",
    "grub": "grub/grub.cfg-{}",
}
METHODS = tuple(METHOD_FILES)

# The shared files that send a node to its profile when the firmware cannot find it by
# itself, and how each one spells the node's NAME with the firmware's own variables.
DISPATCH_FILES = {"grub": "grub/grub.cfg", "ipxe": "ipxe/boot.ipxe"}
DISPATCH_NAMES = {
    "grub": {"ip": "${net_default_ip}", "hostname": "${net_pxe_hostname}",
             "hostname_short": "${kabin_short}"},
    "ipxe": {"ip": "${net0/ip}", "mac": "01-${net0/mac:hexhyp}", "hostname": "${hostname}"},
}

_MAC = re.compile(r"^[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}$")


def profile_path(method, name):
    """The path of a node's profile for ``method``, relative to pxe_root."""
    return METHOD_FILES[method].format(name)


def ipv4(node):
    """The node's IPv4 address; a clear error when its address is not one."""
    try:
        return ipaddress.IPv4Address(node.address)
    except ValueError:
        raise UsageError(f"node {node.name}: address {node.address!r} is not an IPv4 address "
                         "(needed by the PXE naming ip_hex / ip)") from None


def mac(node):
    """The node's MAC address as ``aa:bb:cc:dd:ee:ff``; a clear error when unknown."""
    if not node.mac:
        raise UsageError(f"node {node.name}: no MAC address known (add 'mac' to its entry "
                         "in clusters.yml)")
    if not _MAC.match(node.mac):
        raise UsageError(f"node {node.name}: invalid MAC address {node.mac!r} "
                         "(expected six hex octets such as 02:00:7f:00:01:01)")
    return node.mac.lower().replace("-", ":")


def profile_name(node, naming):
    """The NAME of ``node``'s profile files under ``naming``."""
    if naming == "ip_hex":
        return f"{int(ipv4(node)):08X}"
    if naming == "ip":
        return str(ipv4(node))
    if naming == "mac":
        return "01-" + mac(node).replace(":", "-")
    if naming == "hostname":
        return node.name
    if naming == "hostname_short":
        return node.name.split(".", 1)[0]
    raise ValueError(f"unknown PXE naming {naming!r}")


def dispatch_name(method, naming):
    """How the dispatcher of ``method`` spells NAME, or None when it needs none / cannot."""
    return DISPATCH_NAMES.get(method, {}).get(naming)
