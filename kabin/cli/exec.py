"""ka-exec: run a command, a script or file sends on every OK node, in parallel."""

import sys

import click

from .. import exec as exec_mod
from .. import records
from ..errors import EXIT_KO, EXIT_OK
from . import common


@click.command(context_settings={**common.CONTEXT, "allow_interspersed_args": False})
@click.argument("command", nargs=-1, metavar="[--] [CMD [ARG...]]")
@click.option("--script", "script", metavar="FILE", type=click.Path(dir_okay=False),
              help="Send the local FILE and run it (CMD ARGS become its arguments).")
@click.option("--send", "sends", multiple=True, metavar="SRC:DEST",
              help="Write the local file SRC to DEST on the nodes first (repeatable; "
                   "DEST ending in / keeps the name).")
@click.option("--kadeploy-env", "kadeploy_env", is_flag=True,
              help="Export the KADEPLOY_* variables to the command.")
@common.env_option("The environment the KADEPLOY_* variables describe (implies "
                   "--kadeploy-env; default: the record's env, as ka-chaincast --env leaves it).")
@common.owner_option
@click.option("--block-device", metavar="DEV", help="KADEPLOY_BLOCK_DEVICE (default: the "
                                                    "cluster's, or the record's).")
@click.option("--partition", type=click.IntRange(1), metavar="N",
              help="KADEPLOY_DEPLOY_PART_NUM (default: the cluster's deploy partition).")
@common.running_option
@click.option("-b", "--gather", is_flag=True,
              help="Human view: identical outputs folded by node set (as clush -b).")
@common.fanout_option()
@common.timeout_option()
@common.step_option
@common.force_option
@common.stream_options
@common.command
def cli(command, script, sends, kadeploy_env, env_spec, owner, block_device, partition, running,
        gather, fanout, timeout, step, **opts):
    """Run CMD (a shell command line), a local script or file sends on every OK node.

    Each node's record gets rc, stdout, stderr and time; a non-zero rc, a
    timeout (default 300 s per node) or an unreachable node makes it KO.

    \b
    Examples:
      ka-exec -m node-[1-8] -- uname -r
      ka-exec -m node-[1-8] --script ./setup.sh -- --verbose
      ka-exec -m node-[1-8] --send ./motd:/etc/motd
      ka-reboot -m node-[1-8] --wait deploy | ka-exec --kadeploy-env -- 'echo $KADEPLOY_DEPLOY_PART'
      ka-exec -m node-[1-8] --env debian12 -- 'echo $KADEPLOY_ENV_KERNEL'
    """
    options = options_of(command, script, sends, kadeploy_env, env_spec, owner, block_device,
                         partition, running, fanout, timeout, step)
    config = common.load_config(opts)
    output = exec_mod.run(config, common.read_unheld(config, opts, options.step), options)
    if gather:
        return _write_gathered(opts, output)
    return common.emit(opts, output, columns=("rc", "stdout"))


def options_of(command, script, sends, kadeploy_env, env_spec, owner, block_device, partition,
               running, fanout, timeout, step):
    """The exec.Options the command line says."""
    fields = dict(script_args=tuple(command) if script else (),
                  sends=tuple(exec_mod.Send.parse(s) for s in sends),
                  timeout=timeout or exec_mod.DEFAULT_TIMEOUT, running=running or "deploy",
                  fanout=fanout, kadeploy_env=kadeploy_env or bool(env_spec), env=env_spec,
                  owner=owner, block_device=block_device, partition=partition,
                  step=step or exec_mod.STEP)
    if script:
        return exec_mod.Options.for_script(script, **fields)
    return exec_mod.Options(command=" ".join(command) if command else None, **fields)


def _write_gathered(opts, output):
    """Print the folded view once every node is done; still honour --ok/--ko."""
    done = list(output)
    for group in exec_mod.gather(done):
        sys.stdout.write(_format_group(group))
    sys.stdout.flush()
    ok = [r["node"] for r in done if records.is_ok(r)]
    ko = [r["node"] for r in done if not records.is_ok(r)]
    if opts.get("ok_file"):
        records.write_node_list(opts["ok_file"], ok)
    if opts.get("ko_file"):
        records.write_node_list(opts["ko_file"], ko)
    return EXIT_KO if ko else EXIT_OK


def _format_group(group):
    header = f"{group.nodeset} ({len(group.nodes)})"
    if group.error:
        header += f" KO: {group.error}"
    rule = "-" * 15
    body = group.stdout + group.stderr
    if body and not body.endswith("\n"):
        body += "\n"
    return f"{rule}\n{header}\n{rule}\n{body}"


main = common.entry_point(cli, "ka-exec")
