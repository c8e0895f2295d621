"""ka-env: the environment library (not implemented yet, issue #7)."""

import click

from ..errors import NotImplementedYet
from . import common


@click.command(context_settings=common.CONTEXT)
@common.verbosity_options
@common.command
def cli(**opts):
    """the environment library (not implemented yet)."""
    raise NotImplementedYet("ka-env is not implemented yet (the environment library: issue #7)")


main = common.entry_point(cli, "ka-env")
