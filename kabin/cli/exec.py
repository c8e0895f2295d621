"""ka-exec: parallel execution (not implemented yet, issue #4)."""

import click

from ..errors import NotImplementedYet
from . import common


@click.command(context_settings=common.CONTEXT)
@common.verbosity_options
@common.command
def cli(**opts):
    """parallel execution (not implemented yet)."""
    raise NotImplementedYet("ka-exec is not implemented yet (parallel execution: issue #4)")


main = common.entry_point(cli, "ka-exec")
