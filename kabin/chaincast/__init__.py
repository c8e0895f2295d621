"""Pipelined, topology-aware, fault-tolerant image broadcast (ka-chaincast).

The source streams the image to the first node, which writes it and forwards
the same bytes to the next, and so on (``method='chain'``), or down a fanout
tree (``method='tree'``, for small files; ``pick_method`` chooses). Each node
runs a relay agent (``agent.py``, sent over SSH, standard library only), checks
a SHA-256 of what it received against the source's, and a node that dies or
stalls is routed around without stopping the others.

    from kabin import chaincast
    image = chaincast.open_image("debian.tar.zst", kind="tar")
    for record in chaincast.broadcast(records, image, config):
        ...

Modules: ``agent`` (the relay), ``sender`` (the source), ``launch`` (starting
agents), ``order`` (topology order, layouts, method choice), ``topology``
(repairs, stalled-node detection), ``broadcast`` (the coordinator), ``image``.
"""

from .broadcast import STEP, Broadcast, Options
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
    "broadcast",
    "broadcast_timeout",
    "default_dest",
    "from_environment",
    "new_broadcast",
    "open_image",
    "pick_method",
]


def broadcast(items, image, config, dest=None, store=False, options=None, stop=None,
              observer=None, launcher=None):
    """Broadcast ``image`` to the OK records of ``items``; yield every record once.

    ``dest``: where each node writes (default: ``default_dest``). ``store``:
    write the image as it is into the file ``dest``. ``options`` default to
    ``pick_method``'s choice and ``broadcast_timeout``. ``launcher`` defaults to
    SSH to the deployment environments. ``observer(snapshot)``: see Broadcast.
    """
    items = list(items)
    if options is None:
        count = sum(1 for r in items if r.get("status", "ok") == "ok")
        options = Options(method=pick_method(image.size, count),
                          timeout=broadcast_timeout(image.size))
    job = new_broadcast(image, config, dest, store, options, stop, observer, launcher)
    try:
        yield from job.run(items)
    finally:
        if launcher is None:
            job.launcher.close()


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


def broadcast_timeout(size):
    """A deadline for the whole broadcast: 5 minutes plus 1 s per MB (a 1 MB/s floor)."""
    return 300.0 + size / (1 << 20)
