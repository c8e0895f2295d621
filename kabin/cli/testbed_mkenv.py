"""``ka-testbed mkenv``: the click command (ka-testbed's group adds it with add_command).

The builders are imported when the command runs, as every command does with its library.
"""

from pathlib import Path

import click

from . import common, tabular

COLUMNS = ("name", "version", "kind", "compression", "file", "size")


@click.command("mkenv", context_settings=common.CONTEXT)
@common.instance_option("Testbed instance: its configuration (unless --config is given) and "
                        "its directory, where the images go (envs/).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Build the images in DIR instead.")
@click.option("--pad-size", default="0", metavar="SIZE",
              help="Add SIZE of incompressible padding to each image (e.g. 64M).")
@click.option("--only", multiple=True, metavar="NAME",
              help="Build only this environment (repeatable; default: all): testenv-tgz, "
                   "testenv-txz, testenv-tzst, testenv-dd.")
@click.option("--real", is_flag=True,
              help="Build bootable systems instead (realenv-tzst, realenv-dd): Debian's "
                   "kernel, an initrd, sshd with the key of server.yml.")
@tabular.format_option
@common.config_option
@common.verbosity_options
@common.command
def mkenv_command(**opts):
    """Build busybox test environments (tar gz/xz/zstd, ext4 dd) and register them.

    They become public environments of root: testenv-tgz, testenv-txz,
    testenv-tzst and testenv-dd; with --real, realenv-tzst and realenv-dd, systems
    that boot on real machines (the VM tier) with their own kernel and initrd.
    """
    from .. import config as config_mod
    from .. import db as db_mod
    from ..testbed import layout, mkenv, units

    mkenv.select(opts["only"])      # an unknown name is a usage error before any work
    instance_dir = layout.instance_dir(opts["instance"])
    own = instance_dir / "config"
    config = config_mod.load(opts["config_dir"] or (own if own.is_dir() else None))
    out_dir = opts["out_dir"] or instance_dir / "envs"
    pad_size = units.parse_size(opts["pad_size"])
    keys = None
    if opts["real"]:
        key = Path(str(config.server.ssh.key) + ".pub")
        if not key.is_file():
            raise click.UsageError(f"no public key {key}: the systems' sshd accepts it")
        keys = key.read_text()
    with db_mod.open_database(config) as database:
        made = mkenv.mkenv(database, out_dir, pad_size, opts["only"], real_keys=keys)
    rows = [{**env.summary(), "file": env.image_file, "size": env.file().size} for env in made]
    tabular.write_rows(rows, COLUMNS, opts["fmt"])
