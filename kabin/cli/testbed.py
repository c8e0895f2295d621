"""ka-testbed: the local test cluster (not implemented yet, issue #3)."""

import click

from ..errors import NotImplementedYet
from . import common


@click.command(context_settings=common.CONTEXT)
@common.verbosity_options
@common.command
def cli(**opts):
    """the local test cluster (not implemented yet)."""
    raise NotImplementedYet("ka-testbed is not implemented yet (the local test cluster: issue #3)")


main = common.entry_point(cli, "ka-testbed")
