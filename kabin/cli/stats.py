"""ka-stats: the deployment log, failure rates and node states (kastat3, kanodes3)."""

import click

from .. import db as db_mod
from .. import nodes as nodes_mod
from .. import stats
from . import common, tabular

RATE_COLUMNS = ("node", "total", "successes", "failures", "rate")
STATE_COLUMNS = ("node", "state", "user", "env", "deployment", "since", "holder", "stale")
FLATTEN = {"steps": stats.steps_text}


@click.group(context_settings=common.CONTEXT)
def cli():
    """The deployment log: record runs, query them, failure rates, node states.

    \b
    Examples:
      kadeploy -e debian12 -f nodes.txt | ka-stats record
      ka-stats list -m 'node-[1-8]' --from 2024-05-01 --operation deploy --format csv
      ka-stats failure-rate --min 0.2
      ka-stats nodes
    """


def _subcommand(*decorators, name=None):
    def apply(fn):
        fn = common.command(fn)
        for decorator in reversed((*decorators, tabular.format_option, common.config_option,
                                   common.verbosity_options)):
            fn = decorator(fn)
        return cli.command(name, context_settings=common.CONTEXT)(fn)
    return apply


def _open(opts):
    return db_mod.open_database(common.load_config(opts))


nodes_option = click.option("-m", "--machine", "nodesets", multiple=True, metavar="NODESET",
                            help="Only these nodes, e.g. node-[1-4] (repeatable).")
filter_options = (
    nodes_option,
    click.option("--from", "since", metavar="DATE", help="Runs started at or after DATE "
                 "(2024-05-01, 2024-05-01T14:30, or Unix seconds)."),
    click.option("--to", "until", metavar="DATE", help="Runs started before DATE."),
    click.option("--operation", "operations", multiple=True,
                 type=click.Choice(stats.OPERATIONS), help="Only this operation (repeatable)."),
    click.option("--deployment", metavar="ID", help="Only this deployment."),
    click.option("--min-retries", "min_retries", multiple=True, metavar="STEP=N",
                 help="Only runs that retried STEP at least N times, e.g. BroadcastEnv=1."),
)


def _nodes(opts):
    if not opts["nodesets"]:
        return None
    return [name for pattern in opts["nodesets"] for name in nodes_mod.expand(pattern)]


def _filters(opts):
    return stats.Filters(
        nodes=_nodes(opts),
        since=stats.parse_time(opts["since"]) if opts["since"] else None,
        until=stats.parse_time(opts["until"]) if opts["until"] else None,
        operations=opts["operations"], deployment=opts["deployment"],
        min_retries=stats.parse_min_retries(opts["min_retries"]))


@cli.command(context_settings=common.CONTEXT)
@click.option("--deployment", metavar="ID",
              help="Deployment id of records without one (default: a new id for this run).")
@click.option("--operation", type=click.Choice(stats.OPERATIONS), default="deploy",
              show_default=True, help="Operation of records without one.")
@click.option("--env", metavar="NAME@VERSION", help="Environment of records without one.")
@common.stream_options
@common.command
def record(deployment, operation, env, **opts):
    """Store final records in the log and pass them on unchanged (it can sit mid-pipe)."""
    options = stats.Options(deployment=deployment, operation=operation, env=env)
    return common.emit(opts, stats.run(common.load_config(opts), common.read_input(opts),
                                       options))


@_subcommand(*filter_options,
             tabular.fields_option(stats.RUN_FIELDS, stats.DEFAULT_RUN_FIELDS),
             click.option("--sort", "sort", multiple=True, type=click.Choice(stats.SORTABLE),
                          help="Sort by this field (repeatable; default: start)."),
             click.option("--reverse", is_flag=True, help="Sort in descending order."),
             click.option("--limit", type=click.IntRange(1), metavar="N",
                          help="At most N runs."),
             name="list")
def list_runs(**opts):
    """The log: one line per node per deployment, reboot or power operation."""
    with _open(opts) as database:
        runs = stats.list_runs(database, _filters(opts), opts["sort"] or ("start",),
                               opts["reverse"], opts["limit"])
    tabular.write_rows(runs, opts["fields"], opts["fmt"], FLATTEN)


@_subcommand(*filter_options,
             click.option("--min", "min_rate", type=click.FloatRange(0, 1), metavar="RATE",
                          help="Only nodes failing at least this often (0 to 1)."))
def failure_rate(**opts):
    """Failure rate per node, 1 - successes / total, worst first (the defunct-node detector)."""
    with _open(opts) as database:
        rates = stats.failure_rates(database, _filters(opts), opts["min_rate"])
    tabular.write_rows(rates, RATE_COLUMNS, opts["fmt"])


@_subcommand(click.argument("deployment", metavar="ID"),
             tabular.fields_option(stats.RUN_FIELDS, stats.RUN_FIELDS))
def show(**opts):
    """Every node of one deployment, with its steps."""
    with _open(opts) as database:
        runs = stats.show(database, opts["deployment"])
    tabular.write_rows(runs, opts["fields"], opts["fmt"], FLATTEN)


@_subcommand(nodes_option)
def nodes(**opts):
    """The current state of each node: deploying, deployed, deploy_failed, ..., aborted."""
    with _open(opts) as database:
        states = stats.node_states(database, _nodes(opts))
    tabular.write_rows(states, STATE_COLUMNS, opts["fmt"])


main = common.entry_point(cli, "ka-stats")
