"""ka-chaincast: image broadcast (not implemented yet, issue #6)."""

import click

from ..errors import NotImplementedYet
from . import common


@click.command(context_settings=common.CONTEXT)
@common.verbosity_options
@common.command
def cli(**opts):
    """image broadcast (not implemented yet)."""
    raise NotImplementedYet("ka-chaincast is not implemented yet (image broadcast: issue #6)")


main = common.entry_point(cli, "ka-chaincast")
