"""Parallel execution on the nodes: a command, a local script, file sends.

``run(config, items, options)`` runs ``options`` on every OK record of ``items``
over SSH (one paramiko connection per node, reused by the sends and the
command), at most ``fanout`` nodes at once, and yields each node's record as
soon as it is known. KO records pass through unchanged at once.

A record gets ``rc``, ``stdout``, ``stderr`` and ``time``; a non-zero rc, a
timeout or an unreachable node makes it KO with the reason.

``--kadeploy-env`` exports Kadeploy's variables (see ``kadeploy_env``): from
the configuration (cluster, block device, partitions, directories), from the
options (``--env``, ``--block-device``, ``--partition``) and from the record
when an earlier step set them (``env``, ``block_device``, ``deploy_partition``).
"""

import functools
import logging
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import nodes, records
from .partitioning import partition_device
from .errors import KabinError, UsageError
from .parallel import Deadline, Executor
from .ssh import SshError, SshPool

log = logging.getLogger(__name__)

STEP = "exec"
RUNNING = ("deploy", "system")   # what the nodes run: the known-hosts file of SSH
DEFAULT_TIMEOUT = 300.0
COMMAND_FIELDS = ("rc", "stdout", "stderr")
# where pre/post-install archives are unpacked on the node (Kadeploy's "rambin"), under tmp_dir
PREPOST_SUBDIR = "kabin-prepost"


@dataclass(frozen=True)
class Send:
    """A local file to write on the nodes (``SRC:DEST``), keeping its permission bits."""

    source: Path
    dest: str
    mode: int

    @classmethod
    def parse(cls, spec):
        source, sep, dest = spec.partition(":")
        if not sep or not source or not dest:
            raise UsageError(f"--send {spec!r}: expected SRC:DEST")
        if not dest.startswith("/"):
            raise UsageError(f"--send {spec!r}: DEST must be an absolute path on the node")
        path = Path(source)
        try:
            mode = path.stat().st_mode
        except OSError as exc:
            raise UsageError(f"--send {spec!r}: cannot read {source}: {exc.strerror}") from None
        if not path.is_file() or not os.access(path, os.R_OK):
            raise UsageError(f"--send {spec!r}: {source} is not a readable file")
        if dest.endswith("/"):
            dest += path.name
        return cls(path, dest, mode & 0o7777)


@dataclass(frozen=True)
class Options:
    """What ka-exec does on each node (sends first, then a command or a script), and how.

    ``to_argv()`` is the equivalent command line. ``script`` is the script's
    content; ``script_file`` the local file it came from (what ``--script``
    names). ``kadeploy_env`` exports the KADEPLOY_* variables; ``env`` (a name,
    ``NAME@VERSION``, or a description mapping) is the environment they
    describe (default: the record's ``env``), ``owner`` its owner;
    ``block_device`` and ``partition`` override the cluster's. ``running``: what
    the nodes run now (deploy or system), which picks the known-hosts file.
    """

    command: str | None = None
    script: bytes | None = None
    script_file: str | None = None
    script_args: tuple = ()
    sends: tuple = ()
    stdin: bytes | None = None          # library only: data for the command's stdin
    timeout: float = DEFAULT_TIMEOUT
    kadeploy_env: bool = False
    env: object = None
    owner: str | None = None
    block_device: str | None = None
    partition: int | None = None
    running: str = "deploy"
    fanout: int | None = None
    step: str = STEP

    def __post_init__(self):
        if self.command is not None and self.script is not None:
            raise UsageError("give a command or a script, not both")
        if self.command is None and self.script is None and not self.sends:
            raise UsageError("nothing to do: give a command (-- CMD), --script FILE or --send")
        if self.timeout <= 0:
            raise UsageError("the timeout must be positive")
        if self.running not in RUNNING:
            raise UsageError(f"--running: one of {', '.join(RUNNING)}, not {self.running!r}")

    @classmethod
    def for_script(cls, path, **fields):
        """Options running the local file ``path`` (read now: a clear error if it cannot be)."""
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from None
        return cls(script=data, script_file=str(path), **fields)

    def remote_command(self, tmp_dir):
        """The command line run on the node (None for sends only)."""
        if self.script is None:
            return self.command
        # the script comes on stdin into a private temporary file, so its own
        # interpreter line is honoured; it runs with stdin closed, then goes
        template = shlex.quote(f"{tmp_dir}/kabin-script.XXXXXX")
        args = " ".join(shlex.quote(a) for a in self.script_args)
        return (f'f=$(mktemp {template}) && cat > "$f" && chmod 700 "$f" && '
                f'{{ "$f" {args} < /dev/null; rc=$?; rm -f "$f"; exit $rc; }}')

    def to_argv(self):
        """The ka-exec command line doing the same."""
        if self.script is not None and self.script_file is None or self.stdin is not None:
            raise UsageError("data given as bytes (a script, stdin) has no command line")
        argv = ["ka-exec"] + step_argv(self.step, STEP)
        argv += [f"--send={s.source}:{s.dest}" for s in self.sends]
        if self.kadeploy_env:
            argv.append("--kadeploy-env")
        if self.env is not None:
            argv.append(f"--env={_env_name(self.env)}")
        if self.owner:
            argv.append(f"--owner={self.owner}")
        if self.block_device:
            argv.append(f"--block-device={self.block_device}")
        if self.partition:
            argv.append(f"--partition={self.partition}")
        if self.running != "deploy":
            argv.append(f"--running={self.running}")
        if self.fanout:
            argv.append(f"--fanout={self.fanout}")
        if self.timeout != DEFAULT_TIMEOUT:
            argv.append(f"--timeout={self.timeout:g}")
        if self.script is not None:
            return argv + [f"--script={self.script_file}", "--", *self.script_args]
        return argv + (["--", self.command] if self.command is not None else [])


def step_argv(step, default):
    """``--step NAME`` when the step is not the command's own name."""
    return [] if step == default else [f"--step={step}"]


def _env_name(env):
    if isinstance(env, dict):
        name, version = env.get("name"), env.get("version")
        return f"{name}@{version}" if version else str(name)
    return str(env)


# ---------------------------------------------------------------- KADEPLOY_* variables

def _env_description(config, record):
    """The environment named by the record: (name, description mapping or {}); a name
    (``NAME[@VERSION]``, as ka-chaincast --env leaves it) is looked up in the library."""
    env = record.get("env")
    if isinstance(env, dict):
        return env.get("name"), env
    if isinstance(env, str):
        return env.split("@", 1)[0], _library_description(str(config.dir), env,
                                                          record.get("env_owner"))
    return None, {}


@functools.lru_cache(maxsize=16)
def _library_description(config_dir, spec, owner=None):
    from . import config as config_mod
    from . import db, envs
    try:
        with db.open_database(config_mod.load(config_dir)) as database:
            return dict(envs.resolve(database, spec, envs.current_user(),
                                     owner=owner).description)
    except KabinError as exc:
        log.warning("environment %s: %s (its KADEPLOY_ENV_* are not set)", spec, exc)
        return {}


def kadeploy_env(config, record):
    """Kadeploy's variables for the commands run on the record's node.

    From the configuration: KADEPLOY_CLUSTER, KADEPLOY_BLOCK_DEVICE,
    KADEPLOY_DEPLOY_PART_NUM, KADEPLOY_DEPLOY_PART (device of the deploy
    partition), KADEPLOY_ENV_EXTRACTION_DIR (server paths.extraction_dir),
    KADEPLOY_TMP_DIR (paths.tmp_dir), KADEPLOY_PREPOST_EXTRACTION_DIR
    (``<tmp_dir>/kabin-prepost``). The record overrides the target with the
    fields ``block_device`` and ``deploy_partition`` (kadeploy -b / -p). When
    the record has ``env`` (a name, ``NAME@VERSION``, or a Kadeploy
    description mapping): KADEPLOY_ENV, and from a description
    KADEPLOY_ENV_KERNEL, KADEPLOY_ENV_INITRD, KADEPLOY_ENV_KERNEL_PARAMS,
    KADEPLOY_OS_KIND, KADEPLOY_PART_TYPE, KADEPLOY_FS_TYPE. kabin's own, for
    partition.sh and install-bootloader.sh: KADEPLOY_PART_LABEL (dos, gpt),
    KADEPLOY_PARTITIONS ('N:role:size' words, when partitioning.sizes is set),
    KADEPLOY_ESP_PART, KADEPLOY_BOOTLOADER (grub, activate),
    KADEPLOY_USER_KERNEL_PARAMS. Variables without a value are left out.
    """
    node = config.node(record["node"])
    cluster = config.clusters[node.cluster]
    server = config.server
    name, desc = _env_description(config, record)
    boot = desc.get("boot") or {}
    block_device = record.get("block_device") or boot.get("block_device") \
        or cluster.partitioning.block_device
    number = record.get("deploy_partition") or boot.get("partition") \
        or cluster.partitioning.partitions["deploy"]
    esp = cluster.partitioning.partitions.get("esp")
    env = {
        "KADEPLOY_CLUSTER": node.cluster,
        "KADEPLOY_BLOCK_DEVICE": block_device,
        "KADEPLOY_DEPLOY_PART_NUM": number,
        "KADEPLOY_DEPLOY_PART": partition_device(block_device, number),
        "KADEPLOY_ENV_EXTRACTION_DIR": server.extraction_dir,
        "KADEPLOY_TMP_DIR": server.tmp_dir,
        "KADEPLOY_PREPOST_EXTRACTION_DIR": f"{server.tmp_dir.rstrip('/')}/{PREPOST_SUBDIR}",
        "KADEPLOY_ENV": name,
        "KADEPLOY_ENV_KERNEL": boot.get("kernel"),
        "KADEPLOY_ENV_INITRD": boot.get("initrd"),
        "KADEPLOY_ENV_KERNEL_PARAMS": boot.get("kernel_params"),
        "KADEPLOY_OS_KIND": desc.get("os"),
        "KADEPLOY_PART_TYPE": _hex_type(desc.get("partition_type")),
        "KADEPLOY_FS_TYPE": desc.get("filesystem"),
        "KADEPLOY_PART_LABEL": cluster.partitioning.label,
        "KADEPLOY_PARTITIONS": cluster.partitioning.layout(),
        "KADEPLOY_ESP_PART": esp and partition_device(block_device, esp),
        "KADEPLOY_BOOTLOADER": cluster.boot.bootloader,
        "KADEPLOY_USER_KERNEL_PARAMS": cluster.boot.user_params or None,
    }
    return {k: v for k, v in env.items() if v is not None}


def _hex_type(value):
    return f"{value:x}" if isinstance(value, int) else value


# ---------------------------------------------------------------- running

def _fresh(record):
    """The record without the command fields an earlier step left."""
    return {k: v for k, v in record.items() if k not in COMMAND_FIELDS}


def run_on_node(pool, config, record, options):
    """Do ``options``' work on the record's node; return its OK or KO record."""
    node, start, step = record["node"], time.monotonic(), options.step
    deadline = Deadline(options.timeout)
    record = _fresh(record)
    env = kadeploy_env(config, _described(record, options)) if options.kadeploy_env else None
    try:
        for send in options.sends:
            result = pool.send(node, send.source, send.dest, send.mode, deadline.remaining())
            if not result.ok:
                return records.ko(record, step, _named(step, f"cannot send {send.source} to "
                                                            f"{send.dest}: {result.error()}"),
                                  time.monotonic() - start)
        command = options.remote_command(config.server.tmp_dir)
        if command is None:
            return records.ok(record, step, time.monotonic() - start)
        result = pool.run(node, command, max(deadline.remaining(), 0.001),
                          stdin=options.script if options.script is not None else options.stdin,
                          env=env)
    except SshError as exc:
        return records.ko(record, step, str(exc), time.monotonic() - start)
    fields = {"rc": result.rc, "stdout": result.stdout, "stderr": result.stderr}
    elapsed = time.monotonic() - start
    if result.ok:
        return records.ok(record, step, elapsed, **fields)
    return records.ko(record, step, _named(step, result.error()), elapsed, **fields)


def _described(record, options):
    """The record with the environment and target the options name, for kadeploy_env."""
    extra = {"env": options.env} if options.env is not None else {}
    if options.owner:
        extra["env_owner"] = options.owner
    if options.block_device:
        extra["block_device"] = options.block_device
    if options.partition:
        extra["deploy_partition"] = options.partition
    return dict(record, **extra)


def _named(step, error):
    """A failure's reason, prefixed by the step's name when it is not ka-exec's own."""
    return error if step == STEP else f"{step}: {error}"


def run(config, items, options, stop=None, pool=None):
    """Run ``options``' work on the OK records of ``items``; yield records in completion order.

    ``pool``: an SshPool to reuse (kadeploy's, whose connections outlive one step).
    """
    executor = Executor(options.fanout or config.server.fanout, stop)
    own = pool is None
    pool = SshPool(config, options.running, executor.stop) if own else pool
    try:
        yield from executor.map_records(items, lambda r: run_on_node(pool, config, r, options),
                                        options.step)
    finally:
        if own:
            pool.close()


# ---------------------------------------------------------------- the gathered view

@dataclass
class Group:
    """Nodes that ended the same way (same status, rc, outputs and error)."""

    status: str
    rc: int | None
    stdout: str
    stderr: str
    error: str | None
    nodes: list = field(default_factory=list)

    @property
    def nodeset(self):
        return nodes.fold(self.nodes)


def gather(records_):
    """Fold records with identical results, as ``clush -b`` does: OK groups first."""
    groups = {}
    for record in records_:
        error = None if records.is_ok(record) else record.get("error")
        key = (record.get("status", records.OK), record.get("rc"), record.get("stdout", ""),
               record.get("stderr", ""), error)
        if key not in groups:
            groups[key] = Group(*key)
        groups[key].nodes.append(record["node"])
    return sorted(groups.values(), key=lambda g: (g.status != records.OK, -len(g.nodes), g.nodeset))
