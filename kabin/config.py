"""Configuration: etc/kadeploy YAML files -> typed, validated objects.

Layout (close to Kadeploy3's): ``server.yml`` (paths, ssh, windows, ports),
``clusters.yml`` (clusters and their nodes), one file per cluster (partitioning,
boot kernels, remote operations, pxe, timeouts, automata, topology). Every
invalid value raises one ConfigError naming the file, the key and what is
expected; unknown keys are errors too, so a typo never goes unnoticed.
"""

import ast
import operator
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import nodes, paths
from .partitioning import Partitioning, parse_partitioning, partition_device  # noqa: F401
from .errors import ConfigError, UsageError
from .schema import Section as _Section

SYSTEM_DIR = Path("/etc/kadeploy")
MACRO_STEPS = {
    "SetDeploymentEnv": ("Untrusted", "Kexec", "Prod"),
    "BroadcastEnv": ("Chain", "Tree", "Multicast", "Bittorrent", "Custom"),
    "BootNewEnv": ("Kexec", "Classical", "HardReboot"),
}
REMOTEOP_TYPES = ("ssh", "ipmi", "command")
IPMI_ACTIONS = ("on", "off", "cycle", "reset", "off_on", "status")
PXE_METHODS = ("pxelinux", "ipxe", "grub")
PXE_NAMING = ("ip_hex", "ip", "mac", "hostname", "hostname_short")
HOST_KEY_POLICIES = ("ignore", "known_hosts")


# ---------------------------------------------------------------- server.yml

@dataclass(frozen=True)
class WindowConfig:
    size: int
    sleep_time: float = 0.0


@dataclass(frozen=True)
class SshConfig:
    user: str
    key: Path
    port: int
    connect_timeout: float
    host_key_policy: str
    known_hosts: Path
    known_hosts_deploy: Path


@dataclass(frozen=True)
class ServerConfig:
    state_dir: Path
    database: Path
    pxe_root: Path
    http_root: Path
    pxe_cache_size: int
    ssh: SshConfig
    reboot_window: WindowConfig
    check_window: WindowConfig
    fanout: int
    deploy_marker_port: int
    chaincast_ports: tuple
    extraction_dir: str
    tmp_dir: str


def _path(base, value):
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else base / path


def _window(sec, default_size, default_sleep):
    size = sec.get("size", int, default_size)
    if size < 1:
        raise sec.error("size", f"expected a positive integer, got {size}")
    sleep_time = sec.get("sleep_time", float, default_sleep)
    sec.done()
    return WindowConfig(size, sleep_time)


def _ssh(sec, base, state_dir):
    cfg = SshConfig(
        user=sec.get("user", str, "root"),
        key=_path(base, sec.get("key", str, str(state_dir / "id_ed25519"))),
        port=sec.get("port", int, 22),
        connect_timeout=sec.get("connect_timeout", float, 10.0),
        host_key_policy=sec.get("host_key_policy", str, "known_hosts", HOST_KEY_POLICIES),
        known_hosts=_path(base, sec.get("known_hosts", str, str(state_dir / "known_hosts"))),
        known_hosts_deploy=_path(base, sec.get("known_hosts_deploy", str,
                                               str(state_dir / "known_hosts.deploy"))),
    )
    sec.done()
    return cfg


def load_server(file, base):
    sec = _Section(_read_yaml(file), file)
    p = sec.section("paths")
    state_dir = _path(base, p.get("state_dir", str, "/var/lib/kabin"))
    server = dict(
        state_dir=state_dir,
        database=_path(state_dir, p.get("database", str, "kabin.db")),
        pxe_root=_path(state_dir, p.get("pxe_root", str, "tftpboot")),
        http_root=_path(state_dir, p.get("http_root", str, "http")),
        pxe_cache_size=p.get("pxe_cache_size_mb", int, 1024) * 2**20,
        extraction_dir=p.get("extraction_dir", str, "/mnt/dest"),
        tmp_dir=p.get("tmp_dir", str, "/tmp"),
    )
    p.done()
    server["ssh"] = _ssh(sec.section("ssh"), base, state_dir)
    w = sec.section("windows")
    server["reboot_window"] = _window(w.section("reboot"), 50, 10.0)
    server["check_window"] = _window(w.section("check"), 50, 0.0)
    w.done()
    server["fanout"] = sec.get("fanout", int, 64)
    ports = sec.section("ports")
    server["deploy_marker_port"] = ports.get("deploy_marker", int, 25300)
    chain = ports.get("chaincast", list, [25400, 25499])
    if len(chain) != 2 or not all(isinstance(x, int) for x in chain) or chain[0] > chain[1]:
        raise ports.error("chaincast", f"expected [first, last] port numbers, got {chain!r}")
    server["chaincast_ports"] = tuple(chain)
    ports.done()
    sec.done()
    return ServerConfig(**server)


# ---------------------------------------------------------------- clusters

@dataclass(frozen=True)
class Secret:
    """A secret read when needed from a file or an environment variable; never printed."""

    file: Path | None = None
    env: str | None = None

    def read(self):
        if self.env:
            value = os.environ.get(self.env)
            if value is None:
                raise ConfigError(f"environment variable {self.env} is not set (BMC password)")
            return value
        try:
            return self.file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the BMC password file: {exc.strerror}", self.file)

    def __repr__(self):
        return f"Secret(file={self.file}, env={self.env})"


@dataclass(frozen=True)
class BmcConfig:
    address: str
    port: int
    user: str
    password: Secret = field(repr=False)


@dataclass(frozen=True)
class RemoteOp:
    """One escalation level of a remote operation (reboot, power_on, power_off)."""

    name: str
    type: str
    cmd: str | None = None
    action: str | None = None
    wait: float = 0.0


@dataclass(frozen=True)
class NodeConfig:
    name: str
    cluster: str
    address: str
    mac: str | None
    bmc: BmcConfig | None
    ssh_port: int
    remoteops: dict


@dataclass(frozen=True)
class BootConfig:
    sleep_time_before_ping: float
    install_bootloader: Path | None
    deploy_kernel: str
    deploy_initrd: str
    deploy_params: str
    supported_fs: tuple
    user_params: str
    bootloader: str = "grub"        # grub | activate (mark the partition active only)


@dataclass(frozen=True)
class PxeConfig:
    method: str
    local_method: str
    naming: str
    headers: dict


@dataclass(frozen=True)
class Variant:
    type: str
    timeout: str
    retries: int


@dataclass(frozen=True)
class Switch:
    name: str
    nodes: tuple
    uplink: str | None


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    file: Path
    partitioning: Partitioning
    boot: BootConfig
    remoteops: dict
    pxe: PxeConfig
    timeouts: dict
    automata: dict
    switches: tuple
    admin_postinstalls: tuple = ()   # run on every deployment, before the environment's own


def _remoteop(sec):
    op = RemoteOp(
        name=sec.get("name", str),
        type=sec.get("type", str, "command", REMOTEOP_TYPES),
        cmd=sec.get("cmd", str, None),
        action=sec.get("action", str, None, IPMI_ACTIONS),
        wait=sec.get("wait", float, 0.0),
    )
    if op.type in ("ssh", "command") and not op.cmd:
        raise sec.error("cmd", f"is required for a remote operation of type {op.type}")
    if op.type == "ipmi" and not op.action:
        raise sec.error("action", "is required for a remote operation of type ipmi")
    sec.done()
    return op


def _remoteops(sec):
    ops = {}
    for name in ("reboot", "power_on", "power_off", "power_status"):
        levels = [_remoteop(s) for s in sec.items(name)]
        if levels:
            ops[name] = tuple(levels)
    sec.done()
    return ops


def _boot(sec, base):
    kernels = sec.section("kernels", required=True)
    deploy = kernels.section("deploy", required=True)
    user = kernels.section("user")
    script = sec.get("install_bootloader", str, None)
    cfg = BootConfig(
        sleep_time_before_ping=sec.get("sleep_time_before_ping", float, 20.0),
        install_bootloader=_path(base, script) if script else None,
        deploy_kernel=deploy.get("vmlinuz", str),
        deploy_initrd=deploy.get("initrd", str),
        deploy_params=deploy.get("params", str, ""),
        supported_fs=tuple(deploy.get("supported_fs", list, ["ext2", "ext3", "ext4"])),
        user_params=user.get("params", str, ""),
        bootloader=sec.get("bootloader", str, "grub", ("grub", "activate")),
    )
    for s in (deploy, user, kernels, sec):
        s.done()
    return cfg


def _pxe(sec):
    method = sec.get("method", str, "pxelinux", PXE_METHODS)
    headers = sec.get("headers", dict, {})
    for key, value in headers.items():
        if key not in PXE_METHODS or not isinstance(value, str):
            raise sec.error(f"headers.{key}", f"expected a method ({', '.join(PXE_METHODS)}) "
                                              "mapped to header text")
    cfg = PxeConfig(
        method=method,
        local_method=sec.get("local_method", str, method, PXE_METHODS),
        naming=sec.get("naming", str, "ip_hex", PXE_NAMING),
        headers=headers,
    )
    sec.done()
    return cfg


def _automata(sec):
    automata = {}
    for macro, types in MACRO_STEPS.items():
        variants = []
        for v in sec.items(macro):
            variant = Variant(v.get("type", str, ..., types), str(v.get("timeout", (int, str))),
                              v.get("retries", int, 0))
            _check_expression(variant.timeout, v, "timeout")
            v.done()
            variants.append(variant)
        if not variants:
            raise sec.error(macro, "is required: a list of {type, timeout, retries}")
        automata[macro] = tuple(variants)
    sec.done()
    return automata


def _timeouts(sec):
    timeouts = {k: str(sec.get(k, (int, str), d)) for k, d in (("reboot", 120), ("kexec", 60))}
    for key, expr in timeouts.items():
        _check_expression(expr, sec, key)
    sec.done()
    return timeouts


def _switches(sec):
    switches = []
    for s in sec.items("switches"):
        try:
            members = tuple(nodes.expand(s.get("nodes", str)))
        except UsageError as exc:
            raise s.error("nodes", str(exc)) from None
        switches.append(Switch(s.get("name", str), members, s.get("uplink", str, None)))
        s.done()
    sec.done()
    return tuple(switches)


def _postinstall(sec, base):
    """An admin post-install: an archive unpacked on the node, then its script run there."""
    item = {"archive": str(_path(base, sec.get("archive", str))),
            "compression": sec.get("compression", str, "gzip",
                                   ("none", "gzip", "bzip2", "xz", "zstd")),
            "script": sec.get("script", str, None)}
    sec.done()
    return item


def load_cluster(name, file, base):
    sec = _Section(_read_yaml(file), file)
    cluster = ClusterConfig(
        name=name,
        file=file,
        partitioning=parse_partitioning(sec.section("partitioning", True),
                                        lambda value: _path(base, value)),
        boot=_boot(sec.section("boot", True), base),
        remoteops=_remoteops(sec.section("remoteops")),
        pxe=_pxe(sec.section("pxe")),
        timeouts=_timeouts(sec.section("timeouts")),
        automata=_automata(sec.section("automata", True)),
        switches=_switches(sec.section("topology")),
        admin_postinstalls=tuple(_postinstall(p, base) for p in sec.items("admin_postinstalls")),
    )
    if "reboot" not in cluster.remoteops:
        raise ConfigError("is required: the reboot escalation levels", file, "remoteops.reboot")
    sec.done()
    return cluster


# ---------------------------------------------------------------- timeouts as expressions of n

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow,
        ast.USub: operator.neg}
_FUNCS = {"min": min, "max": max, "log": __import__("math").log, "ceil": __import__("math").ceil}


def eval_timeout(expression, n):
    """Evaluate a timeout such as ``"120 + n * 0.5"`` for ``n`` nodes (no Python eval)."""

    def value(node):
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.Name) and node.id == "n":
            return n
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.operand))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in _FUNCS and not node.keywords:
            return _FUNCS[node.func.id](*(value(a) for a in node.args))
        raise ValueError("only numbers, n, + - * / // **, min, max, log and ceil are allowed")

    try:
        result = float(value(ast.parse(str(expression), mode="eval")))
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError) as exc:
        raise ValueError(f"invalid timeout expression {expression!r}: {exc}") from None
    if result <= 0:
        raise ValueError(f"timeout expression {expression!r} gives {result} for n={n}")
    return result


def _check_expression(expr, sec, key):
    try:
        eval_timeout(expr, 1)
    except ValueError as exc:
        raise sec.error(key, str(exc)) from None


# ---------------------------------------------------------------- clusters.yml and the whole

def _bmc_defaults(sec):
    password_file = sec.get("password_file", str, None)
    secret = Secret(file=_path(sec.file.parent, password_file) if password_file else None,
                    env=sec.get("password_env", str, None))
    if not secret.file and not secret.env:
        raise sec.error("password_file", "a BMC password comes from password_file or password_env")
    defaults = {"user": sec.get("user", str, "admin"), "port": sec.get("port", int, 623),
                "password": secret}
    sec.done()
    return defaults


_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:_-]*$")
_VALUE_PATTERNS = {"address": _HOST, "bmc": _HOST,
                   "mac": re.compile(r"^[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}$")}
_VALUE_HELP = {"address": "a host name or an IP address", "bmc": "a host name or an IP address",
               "mac": "a MAC address such as 02:00:7f:00:01:01"}


def _expand_nodes(entry, cluster, bmc, ssh_port):
    try:
        names = nodes.expand(entry.get("names", str))
    except UsageError as exc:
        raise entry.error("names", str(exc)) from None
    columns = {}
    for key, kind in (("address", (str, list)), ("bmc", (str, list)), ("mac", (str, list)),
                      ("bmc_port", (int, str, list)), ("ssh_port", (int, str, list))):
        try:
            columns[key] = nodes.expand_values(entry.get(key, kind, None), len(names), key)
        except UsageError as exc:
            raise entry.error(key, str(exc)) from None
        pattern = _VALUE_PATTERNS.get(key)
        bad = [v for v in columns[key] if v is not None and pattern and not pattern.match(str(v))]
        if bad:  # these values reach command templates and file names: no shell syntax
            raise entry.error(key, f"invalid value {bad[0]!r}: expected {_VALUE_HELP[key]}")
    ops = _remoteops(entry.section("remoteops"))
    entry.done()
    result = []
    for i, name in enumerate(names):
        address = columns["address"][i] or name
        node_bmc = None
        if columns["bmc"][i]:
            if bmc is None:
                raise entry.error("bmc", "BMC addresses need the cluster's 'bmc' credentials")
            port = int(columns["bmc_port"][i] or bmc["port"])
            node_bmc = BmcConfig(columns["bmc"][i], port, bmc["user"], bmc["password"])
        port = int(columns["ssh_port"][i] or ssh_port)
        result.append(NodeConfig(name, cluster, address, columns["mac"][i], node_bmc, port, ops))
    return result


class Config:
    """The whole configuration of one directory, loaded and validated once."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.server = load_server(self._file("server.yml"), self.dir)
        self.clusters, self.nodes = {}, {}
        sec = _Section(_read_yaml(self._file("clusters.yml")), self._file("clusters.yml"))
        for c in sec.items("clusters", required=True):
            self._load_cluster_entry(c)
        sec.done()
        self._switch_of = {n: s for cl in self.clusters.values() for s in cl.switches
                           for n in s.nodes}

    def _file(self, name):
        return self.dir / name

    def _load_cluster_entry(self, sec):
        name = sec.get("name", str)
        if name in self.clusters:
            raise sec.error("name", f"cluster {name!r} is defined twice")
        file = self._file(sec.get("file", str, f"cluster-{name}.yml"))
        bmc = _bmc_defaults(sec.section("bmc")) if "bmc" in sec.data else None
        sec.used.add("bmc")
        ssh_port = self.server.ssh.port
        for entry in sec.items("nodes", required=True):
            for node in _expand_nodes(entry, name, bmc, ssh_port):
                if node.name in self.nodes:
                    raise entry.error("names", f"node {node.name} is defined twice")
                self.nodes[node.name] = node
        sec.done()
        self.clusters[name] = load_cluster(name, file, self.dir)

    def node(self, name):
        """The configuration of ``name``; an unknown node is a KabinError naming it."""
        try:
            return self.nodes[name]
        except KeyError:
            raise UsageError(f"unknown node {name!r} (not in {self.dir / 'clusters.yml'})") from None

    def cluster_of(self, name):
        return self.clusters[self.node(name).cluster]

    def switch_of(self, name):
        """The name of the switch ``name`` hangs on, or None."""
        switch = self._switch_of.get(name)
        return switch.name if switch else None

    def remoteops(self, name, operation):
        """The escalation levels of ``operation`` for a node (its own override first)."""
        node = self.node(name)
        return node.remoteops.get(operation) or self.clusters[node.cluster].remoteops.get(operation, ())


def _read_yaml(file):
    try:
        with open(file, encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError("file not found", file) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file) from None
    except UnicodeDecodeError:
        raise ConfigError("not a text (UTF-8) YAML file", file) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"invalid YAML{where}: {getattr(exc, 'problem', exc)}", file) from None


def find_config_dir(explicit=None):
    """``--config DIR``, then ``$KABIN_CONFIG``, then /etc/kadeploy, then the packaged sample."""
    if explicit:
        return Path(explicit)
    if os.environ.get("KABIN_CONFIG"):
        return Path(os.environ["KABIN_CONFIG"])
    if (SYSTEM_DIR / "server.yml").exists():
        return SYSTEM_DIR
    return paths.sample_config_dir()


_loaded = {}


def load(directory=None):
    """Load (once per process) the configuration found by ``find_config_dir``."""
    path = find_config_dir(directory).resolve()
    if not path.is_dir():
        raise ConfigError("configuration directory not found", path)
    if path not in _loaded:
        _loaded[path] = Config(path)
    return _loaded[path]
