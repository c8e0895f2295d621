"""``ka-testbed mkenv``: the click command (ka-testbed's group adds it with add_command)."""

import click

from .. import db as db_mod
from ..testbed import mkenv
from . import common, tabular

COLUMNS = ("name", "version", "kind", "compression", "file", "size")


@click.command("mkenv", context_settings=common.CONTEXT)
@click.option("--instance", default="default", show_default=True, metavar="NAME",
              help="Testbed instance: images go to <state_dir>/testbed/NAME/envs.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Build the images in DIR instead.")
@click.option("--pad-size", default="0", metavar="SIZE",
              help="Add SIZE of incompressible padding to each image (e.g. 64M).")
@click.option("--only", multiple=True, metavar="NAME",
              type=click.Choice([v[0] for v in mkenv.VARIANTS]),
              help="Build only this environment (repeatable; default: all).")
@tabular.format_option
@common.config_option
@common.verbosity_options
@common.command
def mkenv_command(**opts):
    """Build busybox test environments (tar gz/xz/zstd, ext4 dd) and register them.

    They become public environments of root: testenv-tgz, testenv-txz,
    testenv-tzst and testenv-dd.
    """
    config = common.load_config(opts)
    out_dir = opts["out_dir"] or mkenv.default_out_dir(config, opts["instance"])
    pad_size = mkenv.parse_size(opts["pad_size"])
    with db_mod.open_database(config) as database:
        made = mkenv.mkenv(database, out_dir, pad_size, opts["only"])
    rows = [{**env.summary(), "file": env.image_file, "size": env.file().size} for env in made]
    tabular.write_rows(rows, COLUMNS, opts["fmt"])
