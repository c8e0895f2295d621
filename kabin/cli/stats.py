"""ka-stats: the deployment log (not implemented yet, issue #7)."""

import click

from ..errors import NotImplementedYet
from . import common


@click.command(context_settings=common.CONTEXT)
@common.verbosity_options
@common.command
def cli(**opts):
    """the deployment log (not implemented yet)."""
    raise NotImplementedYet("ka-stats is not implemented yet (the deployment log: issue #7)")


main = common.entry_point(cli, "ka-stats")
