"""ka-pxe: PXE profiles (not implemented yet, issue #5)."""

import click

from ..errors import NotImplementedYet
from . import common


@click.command(context_settings=common.CONTEXT)
@common.verbosity_options
@common.command
def cli(**opts):
    """PXE profiles (not implemented yet)."""
    raise NotImplementedYet("ka-pxe is not implemented yet (PXE profiles: issue #5)")


main = common.entry_point(cli, "ka-pxe")
