"""ka-deployenv: build the deployment environment (a kernel and an initramfs)."""

import hashlib
from pathlib import Path

import click

from . import common, tabular

COLUMNS = ("file", "kind", "version", "bytes", "sha256")


@click.group(context_settings=common.CONTEXT)
def cli():
    """The deployment environment: what nodes boot to be partitioned and written.

    \b
    Examples:
      ka-deployenv build                       # where boot.kernels.deploy points
      ka-deployenv build --out /srv/tftp/kabin
    """


@cli.command(context_settings=common.CONTEXT)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), metavar="DIR",
              help="Write DIR/vmlinuz and DIR/initrd.img (default: the files each "
                   "cluster's boot.kernels.deploy names, under the server's pxe_root).")
@click.option("--arch", type=click.Choice(["amd64"]), default="amd64", show_default=True,
              help="Architecture (the host's: the environment is made of its files).")
@click.option("--kernel-package", type=click.Path(exists=True, dir_okay=False), metavar="DEB",
              help="Use this Debian kernel package (default: linux-image-amd64's current "
                   "one, downloaded once into /var/cache/kabin/kernel).")
@tabular.format_option
@common.config_option
@common.verbosity_options
@common.command
def build(out_dir, arch, kernel_package, fmt, **opts):
    """Build the kernel and initramfs of the deployment environment.

    \b
    The kernel is Debian's; the initramfs is made of this host's files: busybox,
    sshd (root, with the key of server.yml), DHCP, the deploy marker port, and
    what the steps run: sfdisk, partx, mkfs (ext4, xfs, vfat), mkswap, GNU tar
    with gzip/bzip2/xz/zstd, dd, kexec, grub-install (BIOS and EFI), efibootmgr,
    python3 with what the chaincast agent imports. One row per file written.
    """
    from .. import deployenv
    config = common.load_config(opts)
    key = Path(str(config.server.ssh.key) + ".pub")
    if not key.is_file():
        raise click.UsageError(f"no public key {key} beside server.yml's ssh.key: the "
                               "environment's sshd accepts it")
    rows = []
    for kernel, initrd in _targets(config, out_dir):
        built = deployenv.build(kernel, initrd, key.read_text(),
                                config.server.deploy_marker_port, kernel_package)
        rows += [_row(kernel, "kernel", built["version"]), _row(initrd, "initrd",
                                                                 built["version"])]
    tabular.write_rows(rows, COLUMNS, fmt)


def _targets(config, out_dir):
    if out_dir:
        return [(Path(out_dir) / "vmlinuz", Path(out_dir) / "initrd.img")]
    root = config.server.pxe_root
    return sorted({(root / c.boot.deploy_kernel, root / c.boot.deploy_initrd)
                   for c in config.clusters.values()})


def _row(path, kind, version):
    data = Path(path).read_bytes()
    return {"file": str(path), "kind": kind, "version": version, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


main = common.entry_point(cli, "ka-deployenv")
