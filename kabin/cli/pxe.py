"""ka-pxe: write, show and clear the PXE profiles of nodes (PXELINUX, iPXE, GRUB)."""

from pathlib import Path

import click

from .. import pxe
from . import common, tabular

COLUMNS = ("profile", "pxe_files")
LOADER_COLUMNS = ("file", "method", "firmware", "action", "source")


@click.group(context_settings=common.CONTEXT)
def cli():
    """PXE profiles: what each node boots from the network next.

    The method (pxelinux, ipxe, grub), the file naming and the headers come from
    the node's cluster (its 'pxe' section); files go under the server's pxe_root:
    pxelinux.cfg/NAME, ipxe/NAME, grub/grub.cfg-NAME. Templates live in
    share/pxe-templates/ and a file of the same name in CONFIG_DIR/pxe-templates/
    replaces one. Each file is replaced atomically.

    \b
    Examples:
      ka-pxe set deploy -m node-[1-8]
      ka-pxe set local --partition 3 -f nodes.txt
      ka-pxe set netboot --env debian12 -m node-1
      ka-pxe set custom --template my.tmpl -m node-2
      ka-pxe show -m node-[1-8] --content
      ka-pxe clear -m node-[1-8]
    """


@cli.group("set", context_settings=common.CONTEXT)
def set_group():
    """Write a profile for every OK node, then pass the records on.

    KO records pass through unchanged. A node whose profile cannot be written
    (unknown node, no MAC known with the mac naming...) ends KO and no file of
    it is written.
    """


def _run(opts, make_output):
    """Emit ``make_output(config, records)``; a pxe.Options stands for its pxe.run."""
    if isinstance(make_output, pxe.Options):
        options = make_output

        def make_output(config, items):
            return pxe.run(config, items, options)
    config = common.load_config(opts)
    items = (common.read_unheld(config, opts, pxe.STEP) if "force" in opts
             else common.read_input(opts))
    return common.emit(opts, make_output(config, items), COLUMNS)


@set_group.command("deploy", context_settings=common.CONTEXT)
@common.step_option
@common.force_option
@common.stream_options
@common.command
def set_deploy(step, **opts):
    """Boot the cluster's deployment kernel, initrd and params (boot.kernels.deploy)."""
    return _run(opts, pxe.Options("deploy", step=step or pxe.STEP))


class _Partition(click.ParamType):
    name = "P|disk"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value == pxe.DISK:
            return value
        try:
            number = int(value)
        except ValueError:
            number = 0
        if not 1 <= number <= pxe.profiles.MAX_PARTITION:
            self.fail(f"expected a partition number (1-{pxe.profiles.MAX_PARTITION}) or "
                      f"'{pxe.DISK}', got {value!r}", param, ctx)
        return number


@set_group.command("local", context_settings=common.CONTEXT)
@click.option("-p", "--partition", type=_Partition(), default=None,
              help="Boot this partition of the first disk, or 'disk' for its MBR "
                   "(default: the cluster's deploy partition).")
@common.step_option
@common.force_option
@common.stream_options
@common.command
def set_local(partition, step, **opts):
    """Boot the local disk (chainloaded when pxe.local_method differs from pxe.method)."""
    return _run(opts, pxe.Options("local", partition=partition, step=step or pxe.STEP))


@set_group.command("netboot", context_settings=common.CONTEXT)
@common.env_option("Boot this environment's kernel and initrd (read from its tar image).")
@common.owner_option
@click.option("--kernel", type=click.Path(exists=True, dir_okay=False),
              help="Boot this kernel file instead of an environment's.")
@click.option("--initrd", type=click.Path(exists=True, dir_okay=False),
              help="With --kernel: its initrd.")
@click.option("--params", default="", metavar="TEXT",
              help="More kernel parameters (after the cluster's user params and the env's).")
@common.step_option
@common.force_option
@common.stream_options
@common.command
def set_netboot(env_spec, owner, kernel, initrd, params, step, **opts):
    """Boot a kernel and initrd copied into the PXE tree (cached by content).

    The files are stored once under pxe_root/kabin-cache/, named by their
    SHA-256; the cache is bounded by paths.pxe_cache_size_mb (least recently
    used files go first, never one a profile still names).
    """
    if bool(env_spec) == bool(kernel):
        raise click.UsageError("give either --env NAME or --kernel FILE")
    if initrd and not kernel:
        raise click.UsageError("--initrd goes with --kernel (an environment names its own)")
    if "\n" in params:
        raise click.UsageError("--params must be one line")
    return _run(opts, pxe.Options("netboot", env=env_spec, owner=owner, kernel=kernel,
                                  initrd=initrd, params=params, step=step or pxe.STEP))


@set_group.command("custom", context_settings=common.CONTEXT)
@click.option("--template", "template_file", required=True, metavar="FILE",
              help="The profile template; placeholders {{ name }} get each node's values.")
@common.step_option
@common.force_option
@common.stream_options
@common.command
def set_custom(template_file, step, **opts):
    """Write a template of yours, with per-node values, as each node's profile.

    It goes where the cluster's pxe.method reads it. Placeholders: node, short,
    cluster, name, ip, ip_hex, mac, header, kernel, initrd, params (the deploy
    kernel's), user_params, deploy_partition. An unknown one is an error before
    any file is written.
    """
    options = pxe.Options("custom", template=template_file, step=step or pxe.STEP)
    options.request(None)          # the template is checked before the config is read
    return _run(opts, options)


@cli.command("show", context_settings=common.CONTEXT)
@click.option("--content", is_flag=True, help="Include the files' text (field pxe_content).")
@common.stream_options
@common.command
def show(content, **opts):
    """Report each node's profile (field profile: deploy, local, ... or null) and files."""
    return _run(opts, lambda config, items: pxe.show_profiles(config, items, content))


@cli.command("clear", context_settings=common.CONTEXT)
@common.stream_options
@common.command
def clear(**opts):
    """Remove every profile file of each node (its firmware falls back to its default)."""
    return _run(opts, pxe.clear_profiles)


@cli.command("install-loaders", context_settings=common.CONTEXT)
@click.option("--method", "methods", multiple=True, type=click.Choice(["pxelinux", "grub", "ipxe"]),
              help="Install this method's loaders (repeatable; default: every method and "
                   "local_method of the config's clusters).")
@click.option("--firmware", "firmwares", multiple=True, type=click.Choice(["bios", "uefi"]),
              help="For these clients (repeatable; default: both).")
@click.option("--pxe-root", type=click.Path(file_okay=False), metavar="DIR",
              help="Install here (default: the server's paths.pxe_root).")
@tabular.format_option
@common.config_option
@common.verbosity_options
@common.command
def install_loaders(methods, firmwares, pxe_root, fmt, **opts):
    """Copy the boot programs of the PXE methods into the TFTP tree (idempotent).

    \b
    pxelinux: pxelinux.0, ldlinux.c32, chain.c32 and its libraries (BIOS only)
    grub:     grub-mknetdir's grub/i386-pc/core.0 and grub/x86_64-efi/core.efi
    ipxe:     undionly.kpxe, ipxe.lkrn (BIOS), ipxe.efi (UEFI)
    From Debian's pxelinux, syslinux-common, grub-pc-bin, grub-efi-amd64-bin and
    ipxe packages. A file already there with the same content is left alone.
    """
    from ..pxe import loaders
    config = common.load_config(opts)
    done = loaders.install(pxe_root or config.server.pxe_root,
                           methods or loaders.methods_in_use(config),
                           firmwares or loaders.FIRMWARES)
    tabular.write_rows([d.row() for d in done], LOADER_COLUMNS, fmt)


@cli.command("dhcp-config", context_settings=common.CONTEXT)
@click.option("--format", "dhcp_format", type=click.Choice(["dnsmasq", "isc"]),
              default="dnsmasq", show_default=True, help="The DHCP server's syntax.")
@click.option("-m", "--machine", "nodesets", multiple=True, metavar="NODESET",
              help="Only these nodes (repeatable; default: every node of the config).")
@click.option("--server", metavar="ADDRESS",
              help="The TFTP server, when it is not the DHCP server (next-server).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write to FILE (replaced atomically) instead of stdout.")
@common.config_option
@common.verbosity_options
@common.command
def dhcp_config(dhcp_format, nodesets, server, output, **opts):
    """Print DHCP host entries and boot files for the nodes (dnsmasq or ISC dhcpd).

    One fixed address per MAC (from clusters.yml) and the boot file of the node's
    cluster: an iPXE client of an ipxe cluster gets its profile script, a UEFI
    client (DHCP option 93) the UEFI loader, others the BIOS one. Include it in
    the site's configuration (dnsmasq: conf-file=FILE; dhcpd: include "FILE";).

    \b
    Example (dnsmasq also serving TFTP from pxe_root):
      ka-pxe install-loaders
      ka-pxe dhcp-config -o /etc/dnsmasq.d/kabin-hosts.conf
    """
    from .. import nodes as nodes_mod
    from ..pxe import dhcp
    config = common.load_config(opts)
    names = [n for nodeset in nodesets for n in nodes_mod.expand(nodeset)] or None
    text = dhcp.render(config, dhcp_format, names, server)
    if output:
        pxe.profiles.write_atomic(Path(output).absolute(), text)
    else:
        click.echo(text, nl=False)


main = common.entry_point(cli, "ka-pxe")
