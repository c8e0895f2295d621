"""ka-testbed: the local test cluster (issue #3)."""

import os

import click

from . import common, tabular, testbed_mkenv

STATUS_COLUMNS = ("node", "address", "bmc", "power", "booted", "partition", "detail", "faults")
VM_STATUS_COLUMNS = ("node", "kind", "firmware", "address", "bmc", "power", "booted", "console",
                     "faults")
LIST_COLUMNS = ("instance", "size", "tier", "slot", "running")

instance_option = common.instance_option(
    "The testbed instance (several run side by side, each with its own addresses).")


_format_option = tabular.format_option


def _rows(rows, columns, fmt):
    tabular.write_rows(rows, columns, fmt, flatten={"faults": lambda f: ", ".join(f or ())})


@click.group(context_settings=common.CONTEXT)
def cli():
    """A real local cluster to deploy to: nodes with sshd and disks, IPMI BMCs, PXE boot.

    \b
    Each node runs a real OpenSSH sshd (root, by key) in its own mount, pid and
    UTS namespaces, and sees only its own files: its disk (a sparse file on a
    loop device with real partitions) as /dev/sda, its /tmp, /rambin, /mnt/dest
    and /root. Its BMC speaks IPMI 2.0 over UDP (ipmitool -I lanplus, pyghmi).
    At every power-on, reset, reboot or kexec, its firmware reads its PXE
    profile where a real one would (PXELINUX, iPXE or GRUB syntax) and boots
    what it names: the deployment environment (sshd, port 25300 open), the
    system installed on a partition (its files become the node's root), or
    nothing (the node does not come back).

    \b
    Tiers:
      loopback (default)  nodes at 127.S.1.K, BMCs at 127.S.2.K:623; S is the
                          instance's slot (0 for 'default', which is the cluster
                          of the shipped sample configuration, etc/kadeploy)
      --netns             a network namespace per node on bridges (switches)
                          joined by uplinks, addresses 10.S.x.y; links can be
                          shaped (--link-rate, fault slow-link). The frontend
                          has its own namespace: run kabin's commands there
                          with 'ka-testbed exec -- COMMAND'.
      --vm                each node is a QEMU machine (TCG) with real firmware
                          (--firmware bios: SeaBIOS + iPXE; uefi: OVMF), a disk
                          image, a NIC on a tap of the switches' bridge; the
                          frontend's namespace runs dnsmasq (DHCP, TFTP) and an
                          HTTP server over the PXE tree, configured by ka-pxe
                          install-loaders and dhcp-config; each BMC drives its
                          machine through QMP. Addresses as in --netns.

    \b
    Examples:
      ka-testbed up -n 8 && eval "$(ka-testbed env)"
      ka-exec -m node-[1-8] -- uname -n
      ipmitool -I lanplus -H 127.0.2.3 -U admin \\
          -f /var/lib/kabin/testbed/bmc.secret chassis power cycle
      ka-testbed fault node-3 never-returns; ka-testbed fault node-3 clear
      ka-testbed up --instance net -n 16 --netns --link-rate 100mbit
      ka-testbed exec --instance net -- ka-exec -m node-[1-16] -- true
      ka-testbed status --format json; ka-testbed down

    \b
    Files: /var/lib/kabin/testbed/NAME/ holds an instance: its kabin
    configuration (config/), state (testbed.json), supervisor.log, the BMC
    journal (bmc.log: one JSON line per power action), each node's files and
    console (nodes/node-K/console.log). The SSH key (id_ed25519) and the BMC
    password (bmc.secret) in /var/lib/kabin/testbed are shared by instances.
    Needs root, namespaces and loop devices.
    """


@cli.command()
@click.option("-n", "--nodes", "size", type=click.IntRange(1), default=8, show_default=True,
              help="Number of nodes.")
@click.option("--netns", is_flag=True, help="A network namespace per node (shapable links).")
@click.option("--switches", type=click.IntRange(1), default=2, show_default=True,
              help="Switches the nodes are spread over (the cluster's topology).")
@click.option("--link-rate", metavar="RATE", help="Shape every node link, e.g. 100mbit (netns).")
@click.option("--uplink-rate", metavar="RATE", help="Shape the switches' uplinks (netns).")
@click.option("--disk-size", default=None, metavar="SIZE",
              help="Each node's disk (sparse), e.g. 1G (default: 512M; 4G with --vm).")
@click.option("--boot-delay", type=click.FloatRange(0), default=2.0, show_default=True,
              metavar="SECONDS", help="How long a boot takes.")
@click.option("--fault", "initial_faults", multiple=True, metavar="NODE=KIND",
              help="A fault from the start, e.g. node-3=never-returns (repeatable).")
@common.timeout_option("How long to wait for the nodes to boot (default: 60 + 0.2 per node).")
@click.option("--vm", is_flag=True, help="Nodes are QEMU machines booted by real firmware.")
@click.option("--firmware", type=click.Choice(["bios", "uefi", "mixed"]), default="bios",
              show_default=True, help="VM firmware: SeaBIOS + iPXE, OVMF, or both in turn.")
@click.option("--pxe-method", type=click.Choice(["pxelinux", "grub", "ipxe"]),
              help="VM cluster's PXE method (default: pxelinux; grub if a VM is UEFI).")
@click.option("--local-method", type=click.Choice(["pxelinux", "grub", "ipxe"]),
              help="VM cluster's local boot loader (default: the PXE method's; grub with "
                   "ipxe). ipxe boots the disk's MBR, so the disk gets an MBR table.")
@click.option("--vm-memory", type=click.IntRange(1), default=512, show_default=True,
              metavar="MB", help="Memory of each VM.")
@click.option("--nic", type=click.Choice(["virtio", "e1000"]), default="virtio",
              show_default=True, help="VM network card.")
@click.option("--disk-bus", type=click.Choice(["virtio", "sata"]), default="virtio",
              show_default=True, help="VM disk: /dev/vda (virtio) or /dev/sda (SATA).")
@click.option("--disk-format", type=click.Choice(["raw", "qcow2"]), default="raw",
              show_default=True, help="VM disk image format.")
@instance_option
@common.verbosity_options
@common.command
def up(**opts):
    """Bring an instance up, with its kabin configuration (idempotent).

    Returns once every node has booted. Run again with the same settings, it
    does nothing; with others, it says to bring the instance down first.
    """
    from ..testbed import lifecycle
    vm = None
    if opts["vm"]:
        vm = {"firmware": opts["firmware"], "memory": opts["vm_memory"], "nic": opts["nic"],
              "disk_bus": opts["disk_bus"], "disk_format": opts["disk_format"],
              "pxe_method": opts["pxe_method"], "local_method": opts["local_method"]}
    lifecycle.up(opts["instance"], opts["size"], opts["netns"], opts["switches"],
                 opts["link_rate"], opts["uplink_rate"], opts["disk_size"], opts["boot_delay"],
                 opts["initial_faults"], opts["timeout"], vm=vm)


@cli.command()
@instance_option
@common.verbosity_options
@common.command
def down(**opts):
    """Remove an instance and everything it made, even after a crash."""
    from ..testbed import lifecycle
    if not lifecycle.down(opts["instance"]):
        click.echo(f"ka-testbed: instance {opts['instance']} is not up", err=True)


@cli.command()
@instance_option
@_format_option
@common.verbosity_options
@common.command
def status(**opts):
    """Each node's address, BMC, power and what it booted.

    booted: booting, deploy (the deployment environment), system (the system of
    a partition, given as partition), hung (with the reason in detail), off.
    """
    from ..testbed import instance
    rows = instance.status(opts["instance"])
    columns = VM_STATUS_COLUMNS if rows and rows[0].get("kind") == "vm" else STATUS_COLUMNS
    _rows(rows, columns, opts["fmt"])


@cli.command()
@click.argument("node")
@click.option("--no-follow", is_flag=True, help="Print what is there and stop.")
@instance_option
@common.verbosity_options
@common.command
def console(node, no_follow, **opts):
    """Print a node's serial console and follow it (Ctrl-C stops).

    The console of a VM (its ttyS0), or what a namespace node's init printed.
    """
    from ..testbed import instance
    for chunk in instance.console(opts["instance"], node, follow=not no_follow):
        click.echo(chunk, nl=False)


@cli.command(name="fault")
@click.argument("nodeset")
@click.argument("kind")
@instance_option
@_format_option
@common.verbosity_options
@common.command
def fault_command(**opts):
    """Give nodes a fault (KIND), or take theirs away (clear).

    \b
    KIND: never-returns, returns-on-boot=N, ssh-dead, bmc-dead, bmc-lies,
    die-after-bytes=SIZE, disk-full, slow-link=RATE (netns tier), or clear.
    See pydoc kabin.testbed.faults for what each does.
    """
    from ..testbed import instance
    _rows(instance.fault(opts["instance"], opts["nodeset"], opts["kind"]), STATUS_COLUMNS,
          opts["fmt"])


@cli.command(name="power")
@click.argument("nodeset")
@click.argument("action", type=click.Choice(["on", "off", "reset", "cycle"]))
@instance_option
@_format_option
@common.verbosity_options
@common.command
def power_command(**opts):
    """Press the nodes' power buttons (the BMCs' actions, without IPMI)."""
    from ..testbed import instance
    _rows(instance.power(opts["instance"], opts["nodeset"], opts["action"]), STATUS_COLUMNS,
          opts["fmt"])


@cli.command()
@instance_option
@common.verbosity_options
@common.command
def env(**opts):
    """Print the variables that point kabin at an instance.

    Use: eval "$(ka-testbed env --instance NAME)".
    """
    from ..testbed import instance, lifecycle
    for key, value in instance.environment(opts["instance"]).items():
        click.echo(f"export {key}={value}")
    if (lifecycle.read_state(opts["instance"]) or {}).get("netns"):
        click.echo(f"# netns tier: run kabin's commands in the frontend's namespace, e.g.\n"
                   f"#   ka-testbed exec --instance {opts['instance']} -- ka-exec -m node-1 -- true")


@cli.command(name="exec", context_settings=dict(common.CONTEXT, ignore_unknown_options=True,
                                                allow_interspersed_args=False))
@instance_option
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
def exec_command(instance, command):
    """Run a command where the instance's frontend is, its variables set.

    In the netns tier that is the frontend's network namespace (the nodes'
    10.S.x.y addresses are reachable only there); in the loopback tier, here.
    """
    from ..testbed import instance as instance_mod
    argv = instance_mod.exec_argv(instance, command)
    environment = dict(os.environ, **instance_mod.environment(instance))
    try:
        os.execvpe(argv[0], argv, environment)
    except FileNotFoundError:
        raise click.UsageError(f"command not found: {argv[0]}") from None


@cli.command(name="list")
@_format_option
@common.verbosity_options
@common.command
def list_command(**opts):
    """The instances on this machine."""
    from ..testbed import lifecycle
    _rows(lifecycle.instances(), LIST_COLUMNS, opts["fmt"])


cli.add_command(testbed_mkenv.mkenv_command)
main = common.entry_point(cli, "ka-testbed")
