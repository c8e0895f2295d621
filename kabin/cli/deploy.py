"""kadeploy: the deployment driver (not implemented yet, issue #8)."""

import click

from ..errors import NotImplementedYet
from . import common


@click.command(context_settings=common.CONTEXT)
@common.verbosity_options
@common.command
def cli(**opts):
    """the deployment driver (not implemented yet)."""
    raise NotImplementedYet("kadeploy is not implemented yet (the deployment driver: issue #8)")


main = common.entry_point(cli, "kadeploy")
