"""Parallel execution on the nodes: a command, a local script, file sends.

``execute(config, items, job)`` runs ``job`` on every OK record of ``items``
over SSH (one paramiko connection per node, reused by the sends and the
command), at most ``fanout`` nodes at once, and yields each node's record as
soon as it is known. KO records pass through unchanged at once.

A record gets ``rc``, ``stdout``, ``stderr`` and ``time``; a non-zero rc, a
timeout or an unreachable node makes it KO with the reason.

``--env`` exports Kadeploy's variables (see ``kadeploy_env``): from the
configuration (cluster, block device, partitions, directories) and from the
record when an earlier step set them (``env``, ``block_device``,
``deploy_partition``).
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
class Job:
    """What to do on each node: sends first, then a command or a script."""

    command: str | None = None
    script: bytes | None = None
    script_args: tuple = ()
    sends: tuple = ()
    timeout: float = DEFAULT_TIMEOUT
    export_env: bool = False

    def __post_init__(self):
        if self.command is not None and self.script is not None:
            raise UsageError("give a command or a script, not both")
        if self.command is None and self.script is None and not self.sends:
            raise UsageError("nothing to do: give a command (-- CMD), --script FILE or --send")
        if self.timeout <= 0:
            raise UsageError("the timeout must be positive")

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


# ---------------------------------------------------------------- KADEPLOY_* variables

def _env_description(config, record):
    """The environment named by the record: (name, description mapping or {}); a name
    (``NAME[@VERSION]``, as ka-chaincast --env leaves it) is looked up in the library."""
    env = record.get("env")
    if isinstance(env, dict):
        return env.get("name"), env
    if isinstance(env, str):
        return env.split("@", 1)[0], _library_description(str(config.dir), env)
    return None, {}


@functools.lru_cache(maxsize=16)
def _library_description(config_dir, spec):
    from . import config as config_mod
    from . import db, envs
    try:
        with db.open_database(config_mod.load(config_dir)) as database:
            return dict(envs.resolve(database, spec, envs.current_user()).description)
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


def run_on_node(pool, config, record, job):
    """Do ``job`` on the record's node; return its OK or KO record."""
    node, start = record["node"], time.monotonic()
    deadline = Deadline(job.timeout)
    record = _fresh(record)
    env = kadeploy_env(config, record) if job.export_env else None
    try:
        for send in job.sends:
            result = pool.send(node, send.source, send.dest, send.mode, deadline.remaining())
            if not result.ok:
                return records.ko(record, STEP, f"cannot send {send.source} to {send.dest}: "
                                  f"{result.error()}", time.monotonic() - start)
        command = job.remote_command(config.server.tmp_dir)
        if command is None:
            return records.ok(record, STEP, time.monotonic() - start)
        result = pool.run(node, command, max(deadline.remaining(), 0.001),
                          stdin=job.script, env=env)
    except SshError as exc:
        return records.ko(record, STEP, str(exc), time.monotonic() - start)
    fields = {"rc": result.rc, "stdout": result.stdout, "stderr": result.stderr}
    elapsed = time.monotonic() - start
    if result.ok:
        return records.ok(record, STEP, elapsed, **fields)
    return records.ko(record, STEP, result.error(), elapsed, **fields)


def execute(config, items, job, fanout=None, target="deploy", stop=None):
    """Run ``job`` on the OK records of ``items``; yield records in completion order."""
    executor = Executor(fanout or config.server.fanout, stop)
    pool = SshPool(config, target, executor.stop)
    try:
        yield from executor.map_records(items, lambda r: run_on_node(pool, config, r, job), STEP)
    finally:
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
