"""ka-rights: who may deploy, reboot and boot which nodes (Kadeploy3's karights3)."""

import logging

import click

from .. import db as db_mod
from .. import envs, nodes, rights
from . import common, tabular

COLUMNS = ("user", "node", "part", "granted")
progress = logging.getLogger("kabin.progress")


@click.group(context_settings=common.CONTEXT)
def cli():
    """Grant, revoke and list users' rights on nodes (the administrator grants them).

    A user runs kabin through sudo; the requesting user is $SUDO_USER, and root
    without it is the administrator, who needs no rights. kadeploy, ka-reboot,
    ka-pxe set, ka-chaincast and ka-exec refuse a run (exit 3, nothing done) when
    one of its nodes is not the user's.

    \b
    Examples:
      ka-rights add -u alice -m node-[1-8]
      ka-rights add -u bob -m node-9 --part 3
      ka-rights list -u alice
      ka-rights delete -u alice -m node-[1-8]
    """


def _user_option(required):
    return click.option("-u", "--user", "user", required=required, metavar="USER",
                        help="The user whose rights these are.")


machines_option = click.option("-m", "--machine", "nodesets", multiple=True, metavar="NODESET",
                               help="Nodes, e.g. node-[1-8] (repeatable).")
part_option = click.option("--part", metavar="N|*", default=None,
                           help="Only on this partition (a number), or '*': any (the default).")


def _nodes(nodesets):
    return [name for pattern in nodesets for name in nodes.expand(pattern)]


@tabular.subcommand(cli, _user_option(True), machines_option, part_option, rows=False,
                    name="add")
def add(user, nodesets, part, **opts):
    """Grant USER the nodes (on one partition, or any)."""
    if not nodesets:
        raise click.UsageError("give the nodes: -m NODESET")
    with db_mod.open_database(common.load_config(opts)) as database:
        added = rights.add(database, envs.current_user(), user, _nodes(nodesets), part)
    progress.info("%d right(s) granted to %s", added, user)


@tabular.subcommand(cli, _user_option(True), machines_option, part_option, rows=False,
                    name="delete")
def delete(user, nodesets, part, **opts):
    """Revoke USER's rights on the nodes (all of USER's without -m)."""
    with db_mod.open_database(common.load_config(opts)) as database:
        removed = rights.delete(database, envs.current_user(), user,
                                _nodes(nodesets) if nodesets else None, part)
    progress.info("%d right(s) of %s revoked", removed, user)


@tabular.subcommand(cli, _user_option(False), machines_option, name="list")
def list_rights(user, nodesets, **opts):
    """The rights (of USER, on the nodes), one row per user, node and partition."""
    with db_mod.open_database(common.load_config(opts)) as database:
        rows = rights.listing(database, user, _nodes(nodesets) if nodesets else None)
    from ..stats import iso
    tabular.write_rows([dict(r, granted=iso(r["granted"])) for r in rows], COLUMNS,
                       opts.get("fmt"))


main = common.entry_point(cli, "ka-rights")
