"""ka-env: the environment library (Kadeploy3's kaenv3).

The owner of what you add is you (your Unix user); root is the administrator.
Lookup: your own environments, then public ones; shared ones need -u OWNER;
the latest version unless --version N (or NAME@N).
"""

import functools
import sys

import click

from .. import db as db_mod
from .. import envs
from . import common, tabular

COLUMNS = ("name", "version", "owner", "visibility", "destructive", "kind", "compression",
           "description")


@click.group(context_settings=common.CONTEXT)
def cli():
    """The environment library: add, list, show, change and delete environments.

    \b
    Examples:
      ka-env add debian12.yml
      ka-env list 'debian*' --all-versions
      ka-env show debian12@2 -u alice > debian12.yml
      ka-env set-visibility debian12 shared
    """


_subcommand = functools.partial(tabular.subcommand, cli)   # a ka-env subcommand
owner_option = click.option("-u", "--owner", metavar="USER",
                            help="The environment's owner (default: you; needed for shared ones).")
version_option = click.option("--version", "version", type=click.IntRange(1), metavar="N",
                              help="That version (default: the latest).")
name_argument = click.argument("name", metavar="NAME[@VERSION]")


def _open(opts):
    return db_mod.open_database(common.load_config(opts))


def _print(opts, environments):
    tabular.write_rows([e.summary() for e in environments], COLUMNS, opts.get("fmt"))


def _target(opts):
    name, version = envs.parse_spec(opts["name"], opts.get("version"))
    return dict(name=name, owner=opts.get("owner"), version=version)


def _resolved(opts):
    """The environment NAME[@VERSION] [-u OWNER] names, by the library's lookup rules."""
    target = _target(opts)
    with _open(opts) as database:
        return envs.resolve(database, target["name"], envs.current_user(), target["owner"],
                            target["version"])


@_subcommand(click.argument("description", metavar="DESC.yml", type=click.Path(dir_okay=False)))
def add(**opts):
    """Add an environment from a Kadeploy3 YAML description (its files are checksummed)."""
    with _open(opts) as database:
        _print(opts, [envs.add_file(database, opts["description"], envs.current_user())])


@_subcommand(click.argument("pattern", required=False),
             owner_option,
             click.option("--all-versions", is_flag=True, help="Every version, not the latest."),
             name="list")
def list_environments(**opts):
    """List the environments you may use (PATTERN: a glob on names, e.g. 'debian*')."""
    with _open(opts) as database:
        found = envs.list_environments(database, envs.current_user(), opts["owner"],
                                       opts["pattern"], opts["all_versions"])
    _print(opts, found)


@_subcommand(name_argument, version_option, owner_option, rows=False)
def show(**opts):
    """Print an environment's YAML description (ka-env add reads it back)."""
    sys.stdout.write(_resolved(opts).to_yaml())


@_subcommand(name_argument, version_option, owner_option,
             click.option("--all-versions", is_flag=True, help="Delete every version."))
def delete(**opts):
    """Delete the latest version of an environment (or --version N, or --all-versions)."""
    with _open(opts) as database:
        _print(opts, envs.delete(database, envs.current_user(), all_versions=opts["all_versions"],
                                 **_target(opts)))


@_subcommand(name_argument, click.argument("visibility", type=click.Choice(["private", "shared",
                                                                             "public"])),
             version_option, owner_option)
def set_visibility(**opts):
    """Make an environment private, shared or public (public: administrator only)."""
    with _open(opts) as database:
        _print(opts, [envs.set_visibility(database, envs.current_user(),
                                          visibility=opts["visibility"], **_target(opts))])


@_subcommand(name_argument, version_option, owner_option)
def toggle_destructive(**opts):
    """Flip an environment's destructive flag."""
    with _open(opts) as database:
        _print(opts, [envs.toggle_destructive(database, envs.current_user(), **_target(opts))])


@_subcommand(name_argument, version_option, owner_option)
def update_checksums(**opts):
    """Record the current checksums of an environment's image, preinstall and postinstalls."""
    with _open(opts) as database:
        _print(opts, [envs.update_checksums(database, envs.current_user(), **_target(opts))])


@_subcommand(click.argument("old_prefix"), click.argument("new_prefix"))
def move_files(**opts):
    """Rewrite file locations starting with OLD_PREFIX to NEW_PREFIX (administrator)."""
    with _open(opts) as database:
        _print(opts, envs.move_files(database, envs.current_user(), opts["old_prefix"],
                                     opts["new_prefix"]))


@_subcommand(name_argument, version_option, owner_option, rows=False)
def verify(**opts):
    """Check an environment's files against their recorded checksums."""
    env = _resolved(opts)
    envs.verify(env)


main = common.entry_point(cli, "ka-env")
