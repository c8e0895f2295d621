"""Where a testbed instance lives and what its parts are called.

Several instances run side by side (each tester brings up their own); each has
a slot number S, so their addresses, namespaces and files never collide:

- the instance ``default`` (slot 0) is the cluster the shipped sample
  configuration (etc/kadeploy) describes: node-K at 127.0.1.K, its BMC at
  127.0.2.K port 623, state in /var/lib/kabin, PXE root /var/lib/kabin/tftpboot;
- another instance (slot 1..254) puts node-K at 127.S.1.K, its BMC at
  127.S.2.K, and its state, PXE root and database under its own directory.

Beyond 254 nodes the next ones take the next pair of /24s (127.S.3.K and
127.S.4.K, ...). In the netns tier the nodes' addresses are 10.S.x.y instead
(inside namespaces only), the frontend's is 10.S.0.1; the BMCs stay at 127.S.2.K
in the frontend's namespace. The SSH key and the BMC password are shared by every
instance (the sample names them), in /var/lib/kabin/testbed.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

STATE_ROOT = Path("/var/lib/kabin")
TESTBED_ROOT = STATE_ROOT / "testbed"
SHARED_KEY = TESTBED_ROOT / "id_ed25519"
SHARED_SECRET = TESTBED_ROOT / "bmc.secret"
DEFAULT = "default"
BMC_PORT = 623
BMC_USER = "admin"
NODES_PER_BLOCK = 254
MAX_NODES = 127 * NODES_PER_BLOCK
MAX_SLOT = 254
STATE_FILE = "testbed.json"
NETNS_PREFIX_LEN = 16         # 10.S.0.0/16: the netns tier's network of an instance


def check_instance_name(name):
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}", name or ""):
        raise UsageError(f"invalid instance name {name!r}: letters, digits, '-' and '_' "
                         "(at most 32, starting with a letter or digit)")
    return name


def instance_dir(name):
    return TESTBED_ROOT / check_instance_name(name)


def used_slots(exclude=None):
    """Slots of the instances that exist (their state file says), but ``exclude``'s."""
    slots = set()
    for state in TESTBED_ROOT.glob(f"*/{STATE_FILE}"):
        if state.parent.name == exclude:
            continue
        try:
            slots.add(int(json.loads(state.read_text(encoding="utf-8"))["slot"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return slots


def free_slot(name):
    """The slot of a new instance ``name`` (call under the testbed lock)."""
    if name == DEFAULT:
        return 0
    taken = used_slots(exclude=name)
    for slot in range(1, MAX_SLOT + 1):
        if slot not in taken:
            return slot
    raise UsageError(f"no free slot: {MAX_SLOT} instances exist already")


@dataclass(frozen=True)
class Layout:
    """Names, addresses and paths of one instance of ``size`` nodes."""

    name: str
    slot: int
    size: int
    netns: bool = False

    # ------------------------------------------------ files

    @property
    def dir(self):
        return TESTBED_ROOT / self.name

    @property
    def state_dir(self):
        """The kabin state directory of the instance's configuration (paths.state_dir)."""
        return STATE_ROOT if self.name == DEFAULT else self.dir

    @property
    def pxe_root(self):
        return self.state_dir / "tftpboot"

    @property
    def http_root(self):
        return self.state_dir / "http"

    @property
    def config_dir(self):
        return self.dir / "config"

    @property
    def state_file(self):
        return self.dir / STATE_FILE

    @property
    def control_socket(self):
        return self.dir / "control.sock"

    def node_dir(self, index):
        return self.dir / "nodes" / self.node_name(index)

    # ------------------------------------------------ nodes and addresses

    def node_name(self, index):
        return f"node-{index + 1}"

    def index_of(self, name):
        match = re.fullmatch(r"node-(\d+)", name)
        if not match or not 1 <= int(match.group(1)) <= self.size:
            raise UsageError(f"unknown node {name!r} in testbed instance {self.name} "
                             f"(node-1 .. node-{self.size})")
        return int(match.group(1)) - 1

    @property
    def node_names(self):
        return [self.node_name(i) for i in range(self.size)]

    def _block_host(self, index):
        return divmod(index, NODES_PER_BLOCK)

    def node_address(self, index):
        block, host = self._block_host(index)
        first = 10 if self.netns else 127
        return f"{first}.{self.slot}.{1 + 2 * block}.{host + 1}"

    def bmc_address(self, index):
        block, host = self._block_host(index)
        return f"127.{self.slot}.{2 + 2 * block}.{host + 1}"

    def mac(self, index):
        """02:00 (locally administered) then the node's IPv4 address."""
        octets = [2, 0] + [int(x) for x in self.node_address(index).split(".")]
        return ":".join(f"{x:02x}" for x in octets)

    @property
    def frontend_address(self):
        return f"10.{self.slot}.0.1"

    @property
    def frontend_ipv6(self):
        """The frontend's unique local IPv6 address (VM tier: router advertisements)."""
        return f"fd00:{self.slot:x}::1"

    # ------------------------------------------------ network namespaces (netns tier)

    @property
    def netns_prefix(self):
        return netns_prefix(self.name)

    @property
    def frontend_netns(self):
        return f"{self.netns_prefix}frontend"

    @property
    def switch_netns(self):
        return f"{self.netns_prefix}switches"

    def node_netns(self, index):
        return f"{self.netns_prefix}{self.node_name(index)}"


def netns_prefix(name):
    """What the names of instance ``name``'s network namespaces start with ('.' is in no
    instance name, so no instance's prefix is another's)."""
    return f"kt-{name}."


def switch_groups(size, switches):
    """Node indexes per switch: ``switches`` contiguous groups of near-equal size."""
    count = max(1, min(switches, size))
    per, extra = divmod(size, count)
    groups, start = [], 0
    for k in range(count):
        end = start + per + (1 if k < extra else 0)
        groups.append(range(start, end))
        start = end
    return groups
