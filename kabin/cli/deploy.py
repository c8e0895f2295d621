"""kadeploy: deploy an environment on nodes, in three macro-steps with fallbacks and replay."""

import os
import sys
from pathlib import Path

import click

from ..errors import EXIT_KO, EXIT_OK
from . import common

VERBOSITY = {0: (0, True), 1: (0, False), 2: (0, False), 3: (1, False), 4: (2, False),
             5: (2, False)}


def _keys(path):
    if path is None:
        return None
    path = Path(os.path.expanduser(path))
    try:
        with open(path, "rb"):
            return str(path)
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}", param_hint="-k")


def _options(opts):
    from ..deploy import custom, workflow  # the whole toolkit: loaded only to deploy

    return workflow.Options(
        env=opts["env"], owner=opts["owner"], env_version=opts["env_version"],
        description=opts["env_file"], partition=opts["partition"],
        block_device=opts["block_device"], ssh_key_file=_keys(opts["key"]),
        reformat_tmp=opts["reformat_tmp"],
        custom_steps=custom.load(opts["custom_steps"]) if opts["custom_steps"] else {},
        breakpoint=workflow.parse_breakpoint(opts["breakpoint"]) if opts["breakpoint"] else None,
        force_steps=workflow.parse_force_steps(opts["force_steps"]) if opts["force_steps"] else None,
        no_kexec=opts["no_kexec"], disable_partitioning=opts["disable_disk_partitioning"],
        disable_bootloader=opts["disable_bootloader_install"], force=opts["force"],
        debug=opts["node_debug"])


@click.command(context_settings=common.CONTEXT)
@click.option("-e", "--env", metavar="NAME[@VERSION]", help="Environment to deploy.")
@click.option("-u", "--owner", metavar="USER", help="Owner of the environment.")
@click.option("--env-version", type=click.IntRange(1), metavar="N",
              help="Version of the environment (default: the latest).")
@click.option("-a", "--env-file", metavar="DESC.yml", type=click.Path(dir_okay=False),
              help="Deploy an anonymous environment from its description.")
@click.option("-p", "--partition", type=click.IntRange(1), metavar="PART",
              help="Deploy on this partition number (default: the cluster's deploy partition).")
@click.option("-b", "--block-device", metavar="DEV", help="Deploy on this block device.")
@click.option("-k", "--key", metavar="FILE", is_flag=False, flag_value="~/.ssh/authorized_keys",
              default=None, help="Copy these SSH keys into root's authorized_keys of the "
                                 "deployed system (default file: ~/.ssh/authorized_keys).")
@click.option("-r", "--reformat-tmp", metavar="FS", help="Format the tmp partition with FS.")
@click.option("--custom-steps", metavar="FILE", type=click.Path(dir_okay=False),
              help="Operations before, after or instead of micro-steps (YAML).")
@click.option("--breakpoint", metavar="MACRO[:MICRO]", help="Stop after this step.")
@click.option("--force-steps", metavar="AUTOMATA",
              help="Override the automata: 'SetDeploymentEnv|Untrusted:200:1&BootNewEnv|"
                   "Classical:150:0,HardReboot:120:1'.")
@click.option("--no-kexec", is_flag=True, help="Never use the Kexec variants.")
@click.option("--disable-disk-partitioning", is_flag=True, help="Keep the partition table.")
@click.option("--disable-bootloader-install", is_flag=True, help="Do not install a bootloader.")
@click.option("--force", is_flag=True, help="Take over nodes another run is deploying.")
@click.option("--dry-run", is_flag=True, help="Check everything and show the plan; touch nothing.")
@click.option("--print-pipeline", is_flag=True,
              help="Print the deployment as a shell script of ka-* commands (every variant, "
                   "retries, timeouts, the fallback) and stop.")
@click.option("-d", "--node-debug", is_flag=True,
              help="Keep each node's commands, outputs and exit codes in its record (debug).")
@click.option("-V", "--verbose-level", type=click.IntRange(0, 5), default=None,
              help="Kadeploy3 verbosity: 0 quiet, 1-2 progress, 3 info, 4-5 debug.")
@common.input_options
@common.format_option
@common.ok_ko_options(("-o", "--ok"), ("-n", "--ko"))
@common.config_option
@common.verbosity_options
@common.command
def cli(**opts):
    """Deploy an environment on nodes: SetDeploymentEnv, BroadcastEnv, BootNewEnv.

    Each macro-step tries the variants of the cluster's automata in order; failed
    nodes are replayed up to the variant's retries, then fall to the next variant.
    The final record of every node goes to stdout; progress goes to stderr.
    """
    if opts["verbose_level"] is not None:
        verbose, quiet = VERBOSITY[opts["verbose_level"]]
        common.setup_logging("kadeploy", verbose, quiet)
    from ..deploy import workflow

    config = common.load_config(opts)
    deployment = workflow.Deployment(config, _options(opts))
    if opts["print_pipeline"]:       # prints, acts on nothing: no rights needed
        nodes = [r["node"] for r in common.read_input(opts)]
        sys.stdout.write(deployment.pipeline(nodes, config.dir))
        return EXIT_OK
    items = common.read_permitted(config, opts, part=lambda node: _partition(config, node, opts))
    if opts["dry_run"]:
        return common.emit(opts, deployment.dry_run(items))
    code = common.emit(opts, deployment.run(items), columns=("duration", "variant"))
    return code if code == EXIT_OK else EXIT_KO


def _partition(config, node, opts):
    """The partition a deployment writes on ``node`` (None for a node the config lacks: the
    deployment makes it KO)."""
    if opts["partition"]:
        return opts["partition"]
    known = config.nodes.get(node)
    return known and config.clusters[known.cluster].partitioning.partitions["deploy"]


main = common.entry_point(cli, "kadeploy")
