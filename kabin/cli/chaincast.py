"""ka-chaincast: broadcast an image to every OK node, pipelined, and write it there."""

import click

from ..errors import UsageError
from . import common

MB = 1 << 20


@click.command(context_settings=common.CONTEXT)
@common.env_option("Broadcast the image of this environment (checked against its checksum).")
@common.owner_option
@click.option("-i", "--image", "image_file", metavar="IMAGE", type=click.Path(dir_okay=False),
              help="Broadcast this image file (-f/--file reads nodes, as in every command).")
@click.option("--kind", type=click.Choice(["tar", "dd"]), default=None,
              help="tar: extract into DEST; dd: write to the device DEST "
                   "(default: the environment's, else tar).")
@click.option("--compression", type=click.Choice(["auto", "gzip", "bzip2", "xz", "zstd", "none"]),
              default=None, help="The image's compression (default: the environment's, else "
                                 "read from the file).")
@click.option("--to", "dest", metavar="DEST",
              help="Where each node writes: extraction dir (tar; default: the config's), "
                   "device or partition (dd; default: the cluster's deploy partition), "
                   "or a file with --store.")
@click.option("--store", is_flag=True,
              help="Store the image as it is (no decompression, no extraction) in the file DEST.")
@click.option("--method", type=click.Choice(["auto", "chain", "tree", "multicast", "bittorrent"]),
              default="auto", show_default=True,
              help="chain for images, tree (fanout tree) for small files, multicast (udpcast: "
                   "one stream for all, unicast repair), bittorrent (aria2c swarm, a tracker "
                   "and a seeder here; unicast repair); auto picks from the size and node "
                   "count.")
@click.option("--tree-fanout", type=click.IntRange(2), default=4, show_default=True,
              help="Children per node with the tree method.")
@click.option("--min-receivers", type=click.IntRange(1), default=None, metavar="N",
              help="multicast: start once N nodes have joined (default: all; the others "
                   "are repaired by unicast).")
@click.option("--fec", metavar="SxR/L", default=None,
              help="multicast: udpcast's forward error correction, e.g. 8x8/128.")
@click.option("--spool", metavar="DIR", default="/tmp", show_default=True,
              help="bittorrent: where each node keeps the image it fetches (it needs the "
                   "image's size there) until it is written.")
@click.option("--order", type=click.Choice(["topology", "name", "input"]), default="topology",
              show_default=True, help="Chain order: grouped by switch, by name, or as given.")
@click.option("--stall-timeout", type=click.FloatRange(1), default=30.0, show_default=True,
              metavar="SECONDS", help="A node that takes no data for this long is KO and "
                                      "routed around.")
@common.timeout_option("Deadline of the whole broadcast (default: 300 s + 1 s per MB).")
@click.option("--max-rate", type=click.FloatRange(0, min_open=True), default=None,
              metavar="MB/S", help="Cap the rate the source sends at (shared networks).")
@click.option("--ring-size", type=click.IntRange(1), default=16, show_default=True,
              metavar="MB", help="Data each relay keeps to repair the chain (its memory bound).")
@click.option("--verify", type=click.Choice(["written", "stream"]), default="written",
              show_default=True, help="written: each node reads back from its disk what it "
                                      "wrote, and its digest must be the image's; stream: only "
                                      "what it received is checked.")
@click.option("--launch", type=click.Choice(["auto", "direct", "tree"]), default="auto",
              show_default=True,
              help="Who starts the relay agents: direct: this host, over SSH; tree: this host "
                   "starts a few, each agent starts others (ssh -A on the nodes: the key stays "
                   "here); auto: tree past 64 nodes.")
@click.option("--launch-fanout", type=click.IntRange(2), default=8, show_default=True,
              help="Agents each agent starts, with a tree launch.")
@common.step_option
@common.stream_options
@common.command
def cli(env_spec, owner, image_file, kind, compression, dest, store, method, tree_fanout, order,
        stall_timeout, timeout, max_rate, ring_size, verify, min_receivers, fec, spool, launch,
        launch_fanout, step, **opts):
    """Send one image to every OK node in about the time it takes to send it to one.

    The source streams the image to the first node, which writes it and
    forwards the same bytes to the next (nodes ordered by switch), and so on.
    Each node checks a SHA-256 of what it received, then reads back what it
    wrote (the bytes of a dd image, the tree of a tar image: --verify); a
    digest other than the image's is KO. A node that dies or stalls is KO and
    routed around; the others complete. Records get bytes, sha256,
    written_sha256 and time. Progress (bytes, rate, ETA, nodes done) goes to
    stderr.

    \b
    Examples:
      ka-chaincast -m node-[1-8] --env debian12
      ka-chaincast -m node-[1-8] --image rootfs.tar.zst --to /mnt/dest
      ka-chaincast -m node-[1-8] --image disk.img.xz --kind dd --to /dev/sda3
      ka-chaincast -m node-[1-8] --image tools.tgz --store --to /tmp/tools.tgz
      ka-chaincast -m node-[1-8] --env debian12 --method multicast --fec 8x8/128
      ka-chaincast -m node-[1-64] --env debian12 --method bittorrent --spool /tmp
    """
    from .. import chaincast

    options = options_of(env_spec, owner, image_file, kind, compression, dest, store, method,
                         tree_fanout, order, stall_timeout, timeout, max_rate, ring_size, verify,
                         step, min_receivers, fec, spool, launch, launch_fanout)
    config = common.load_config(opts)
    output = chaincast.run(config, common.read_permitted(config, opts), options)
    return common.emit(opts, output, columns=("bytes", "sha256"))


def options_of(env_spec, owner, image_file, kind, compression, dest, store, method, tree_fanout,
               order, stall_timeout, timeout, max_rate, ring_size, verify, step,
               min_receivers=None, fec=None, spool="/tmp", launch="auto", launch_fanout=8):
    """The chaincast.Options the command line says."""
    from .. import chaincast

    if bool(env_spec) == bool(image_file):
        raise UsageError("give the image with exactly one of --env NAME or --image IMAGE")
    if store and not dest:
        raise UsageError("--store needs --to FILE")
    return chaincast.Options(
        env=env_spec, owner=owner, image=image_file, kind=kind, compression=compression,
        dest=dest, store=store, method=method, fanout=tree_fanout, order=order,
        stall_timeout=stall_timeout, timeout=timeout, ring=ring_size * MB,
        max_rate=max_rate * MB if max_rate else None, verify=verify,
        min_receivers=min_receivers, fec=fec, spool=spool, launch=launch,
        launch_fanout=launch_fanout, step=step or chaincast.STEP)


main = common.entry_point(cli, "ka-chaincast")
