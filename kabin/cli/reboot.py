"""ka-reboot: reboot, power and boot checks (not implemented yet, issue #4)."""

import click

from ..errors import NotImplementedYet
from . import common


@click.command(context_settings=common.CONTEXT)
@common.verbosity_options
@common.command
def cli(**opts):
    """reboot, power and boot checks (not implemented yet)."""
    raise NotImplementedYet("ka-reboot is not implemented yet (reboot, power and boot checks: issue #4)")


main = common.entry_point(cli, "ka-reboot")
