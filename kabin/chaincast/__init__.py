"""Pipelined, topology-aware, fault-tolerant image broadcast (ka-chaincast).

The source streams the image to the first node, which writes it and forwards
the same bytes to the next, and so on (``method='chain'``), or down a fanout
tree (``method='tree'``, for small files; ``pick_method`` chooses). Each node
runs a relay agent (``agent.py``, sent over SSH, standard library only), checks
a SHA-256 of what it received against the source's, and a node that dies or
stalls is routed around without stopping the others.

    from kabin import chaincast
    options = chaincast.Options(image="debian.tar.zst", kind="tar", method="auto")
    for record in chaincast.run(config, records, options):
        ...

Modules: ``agent`` (the relay), ``sender`` (the source), ``launch`` (starting
agents; ``treelaunch`` and ``spawn``: agents starting agents), ``order`` (topology
order, layouts, method choice), ``topology`` (repairs, stalled-node detection),
``broadcast`` (the coordinator), ``image``, ``sinks`` and ``written`` (writing and
reading back on the nodes), ``multicast``, ``bittorrent`` and ``receivers``.
"""

from .. import records
from ..errors import UsageError
from .broadcast import STEP, Broadcast, Options, broadcast_timeout
from .image import (
    COMPRESSIONS,
    KINDS,
    Image,
    default_dest,
    from_environment,
    open_image,
)
from .order import METHODS, ORDERS, pick_method

__all__ = [
    "COMPRESSIONS",
    "KINDS",
    "METHODS",
    "ORDERS",
    "STEP",
    "Broadcast",
    "Image",
    "Options",
    "broadcast_timeout",
    "default_dest",
    "from_environment",
    "image_of",
    "new_broadcast",
    "open_image",
    "pick_method",
    "run",
]


def run(config, items, options, stop=None, observer=None, launcher=None):
    """Broadcast ``options``' image to the OK records of ``items``; yield every record once.

    ``launcher`` defaults to SSH to the deployment environments; ``observer(snapshot)``:
    see Broadcast. With ``options.env`` the OK records name it (field ``env``: the next
    steps' KADEPLOY_ENV_* come from it).
    """
    image = image_of(config, options)
    job = new_broadcast(image, config, options.dest, options.store, options, stop, observer,
                        launcher)
    try:
        for record in job.run(items):
            if options.env and records.is_ok(record):
                record = dict(record, env=record.get("env") or options.env)
            yield record
    finally:
        if launcher is None:
            job.launcher.close()


def image_of(config, options):
    """The Image ``options`` name: the file ``image`` (``env`` then only names it, as when
    kadeploy has resolved and checked it), else environment ``env``'s, checked."""
    if not (options.env or options.image):
        raise UsageError("give the image with --env NAME or --image IMAGE")
    if options.store and not options.dest:
        raise UsageError("--store needs --to FILE")
    if not options.image:
        return from_environment(config, options.env, options.owner, options.kind,
                                options.compression)
    return open_image(options.image, options.kind or "tar", options.compression or "auto",
                      sha256=options.sha256)


def new_broadcast(image, config, dest=None, store=False, options=None, stop=None,
                  observer=None, launcher=None):
    """A ``Broadcast`` wired from the configuration (addresses, ports, switches)."""
    if launcher is None:
        from ..ssh import SshPool
        from .launch import SshLauncher
        launcher = SshLauncher(SshPool(config, target="deploy", stop=stop))
    switches = {s.name: s for c in config.clusters.values() for s in c.switches}
    return Broadcast(
        image, launcher,
        address_of=lambda node: config.node(node).address,
        dest_of=(lambda node: dest) if dest else (lambda node: default_dest(config, node, image.kind)),
        ports=config.server.chaincast_ports, options=options or Options(),
        switch_of=config.switch_of, uplink_of=lambda name: switches[name].uplink,
        store=store, stop=stop, observer=observer)
