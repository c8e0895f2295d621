"""ka-reboot: reboot with escalation levels and boot checks; ``ka-reboot power on|off|status``."""

import click

from .. import reboot as reboot_mod
from ..errors import UsageError
from . import common

_seconds = click.FloatRange(0, min_open=True)


class _DefaultReboot(click.Group):
    """``ka-reboot ARGS`` means ``ka-reboot reboot ARGS`` unless ARGS name a subcommand."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args not in (["-h"], ["--help"]):
            args = ["reboot", *args]
        elif not args:
            args = ["reboot"]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultReboot, context_settings=common.CONTEXT)
def cli():
    """Reboot nodes through escalation levels and check they booted; power them on/off.

    \b
    ka-reboot [OPTIONS]          reboot (same as: ka-reboot reboot [OPTIONS])
    ka-reboot power on|off|status [OPTIONS]

    \b
    Examples:
      ka-reboot -m node-[1-8] --level soft,hard,very_hard --wait deploy
      ka-reboot -m node-[1-8] --kexec /mnt/dest/vmlinuz --initrd /mnt/dest/initrd.img \\
                --append 'root=/dev/sda3' --wait system
      ka-reboot power status -m node-[1-8]
    """


def _level_option(what):
    return click.option("-l", "--level", "levels", metavar="L1[,L2...]",
                        help=f"Levels tried in order, each when the previous fails (default: "
                             f"every {what} level of the cluster, e.g. soft,hard,very_hard).")


_wait_option = click.option("--wait", type=click.Choice(reboot_mod.WAIT_MODES), default=None,
                            help="What must be up after each level: deploy (22 and the marker "
                                 "port open), system (22 open, marker closed), any (22 open), "
                                 "none.  [reboot default: any; power on default: none]")
_TIMING = (
    common.timeout_option("Time a node has to go down and come back after each level "
                          "(default: the cluster's timeouts.reboot, or timeouts.kexec).",
                          dest="boot_timeout"),
    click.option("--deadline", type=_seconds, metavar="SECONDS",
                 help="Whole time per node, all levels included, from its first command "
                      "(default: the sum of its levels' budgets)."),
    click.option("--command-timeout", type=_seconds, default=reboot_mod.COMMAND_TIMEOUT,
                 show_default=True, metavar="SECONDS",
                 help="Bound of each level's command (SSH, template, BMC calls)."),
    common.running_option,
    common.fanout_option(f"Nodes in flight (default: {reboot_mod.IN_FLIGHT} for reboot and "
                         "power on/off, whose commands the reboot window bounds; the config's "
                         "fanout for status)."),
    common.step_option,
    common.force_option,
)


def _timing_options(fn):
    for decorator in reversed(_TIMING):
        fn = decorator(fn)
    return fn


def _pop_timing(opts):
    return {k: opts.pop(k) for k in ("boot_timeout", "deadline", "command_timeout", "running",
                                     "fanout", "step")}  # --force stays in opts


def _options(levels, wait, default_wait, timing):
    return reboot_mod.Options(
        levels=reboot_mod.parse_levels(levels) if levels is not None else None,
        wait=wait or default_wait,
        **timing,
    )


def _check_levels(config, operation, names):
    """A level named nowhere in the configuration is a usage error, not a KO per node."""
    if not names:
        return
    known = {op.name for cluster in config.clusters.values()
             for op in cluster.remoteops.get(operation, ())}
    known |= {op.name for node in config.nodes.values() for op in node.remoteops.get(operation, ())}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"--level: unknown {operation} level {', '.join(unknown)} "
                         f"(configured: {', '.join(sorted(known)) or 'none'})")


@cli.command("reboot", context_settings=common.CONTEXT)
@_level_option("reboot")
@_wait_option
@click.option("--kexec", "kernel", metavar="KERNEL",
              help="Reboot by kexec into KERNEL (a path on the node), before any --level.")
@click.option("--initrd", metavar="FILE", help="With --kexec: the initrd (a path on the node).")
@click.option("--append", metavar="PARAMS", help="With --kexec: the kernel command line.")
@click.option("-c", "--check-destructive", is_flag=True,
              help="Refuse (KO) nodes whose deployed environment is marked destructive.")
@_timing_options
@common.stream_options
@common.command
def reboot_command(levels, wait, kernel, initrd, append, check_destructive, **opts):
    """Reboot the OK nodes; a node moves to the next level when the command fails or when it
    does not go down and come back in time. The record's 'level' names the level that worked.
    """
    options = reboot_options(levels, wait, kernel, initrd, append, **_pop_timing(opts))
    config = common.load_config(opts)
    _check_levels(config, "reboot", options.levels)
    items = common.read_unheld(config, opts, options.step_name)
    if check_destructive:
        from .. import stats
        items = stats.refuse_destructive(config, items, options.step_name)
    output = reboot_mod.run(config, items, options)
    return common.emit(opts, output, columns=("level",))


@cli.command("power", context_settings=common.CONTEXT)
@click.argument("action", type=click.Choice(["on", "off", "status"]))
@_level_option("power_on/power_off")
@_wait_option
@_timing_options
@common.stream_options
@common.command
def power_command(action, levels, wait, **opts):
    """Power the OK nodes on or off (through the escalation levels), or read their state.

    'status' reads each node's power through its BMC (or its power_status
    template): field 'power' = on | off.
    """
    options = power_options(action, levels, wait, **_pop_timing(opts))
    config = common.load_config(opts)
    if action == "status":           # reading the power changes nothing: no rights needed
        items = common.read_input(opts)
    else:
        _check_levels(config, options.operation, options.levels)
        items = common.read_unheld(config, opts, options.step_name)
    output = reboot_mod.run(config, items, options)
    return common.emit(opts, output, columns=("power", "level"))


def reboot_options(levels, wait, kernel=None, initrd=None, append=None, **timing):
    """The reboot.Options of ``ka-reboot [reboot]``'s command line."""
    if (initrd or append is not None) and not kernel:
        raise UsageError("--initrd and --append go with --kexec KERNEL")
    timing["running"] = timing["running"] or ("deploy" if kernel else "system")
    options = _options(levels, wait, "any", timing)
    if kernel:
        options.kexec = reboot_mod.Kexec(kernel, initrd, append)
    return options


def power_options(action, levels, wait, **timing):
    """The reboot.Options of ``ka-reboot power ACTION``'s command line."""
    if action != "on" and wait not in (None, "none"):
        raise UsageError("--wait goes with 'power on'")
    if action == "status" and levels:
        raise UsageError("--level goes with 'power on' and 'power off'")
    timing["running"] = timing["running"] or "system"
    return reboot_mod.power_options(action, _options(levels, wait, "none", timing))


main = common.entry_point(cli, "ka-reboot")
