"""PXE profiles for PXELINUX, iPXE and GRUB (ka-pxe), as record-stream jobs.

``set_profiles``, ``show_profiles`` and ``clear_profiles`` read records and yield
one record per node: a KO record passes through unchanged and at once; an OK one
comes out with the step's outcome appended to its history. Nodes are handled one
after the other as they arrive: a profile is a small local file (1,000 take tens
of milliseconds), so threads would only add cost, and the stream keeps flowing.

See ``profiles`` (what each profile holds, chainloading, atomic writes),
``naming`` (the file layout), ``templates`` and ``netboot``.
"""

import time

from .. import records
from ..errors import KabinError
from .profiles import DISK, PROFILES, ProfileWriter, Request, clear, show
from .templates import NODE_VALUES, load_file

__all__ = ["DISK", "PROFILES", "ProfileWriter", "Request", "clear", "clear_profiles",
           "custom_request", "set_profiles", "show", "show_profiles"]

STEP, SHOW_STEP, CLEAR_STEP = "pxe", "pxe-show", "pxe-clear"


def custom_request(template_path):
    """A Request for the custom profile of ``template_path`` (checked at once)."""
    template = load_file(template_path, NODE_VALUES)
    return Request("custom", template=template,
                   stamp={"template": str(template_path).rsplit("/", 1)[-1].replace(" ", "_")})


def _per_node(items, step, job):
    """Apply ``job(node) -> fields`` to every OK record; a KabinError makes the node KO."""
    for record in items:
        if not records.is_ok(record):
            yield record
            continue
        start = time.monotonic()
        try:
            fields = job(record["node"])
        except KabinError as exc:
            yield records.ko(record, step, str(exc), time.monotonic() - start)
        else:
            yield records.ok(record, step, time.monotonic() - start, **fields)


def set_profiles(config, request, items):
    """Write ``request``'s profile for every OK record of ``items``."""
    writer = ProfileWriter(config, request)  # checks templates before reading any record

    def job(node):
        return {"profile": request.profile, "pxe_files": writer.apply(node)}

    return _per_node(items, STEP, job)


def show_profiles(config, items, content=False):
    """Report each node's profile (``profile``: None when it has none) and its files."""
    def job(node):
        stamp, found = show(config, node)
        profile = None if stamp is None else stamp.get("profile", "unknown")
        fields = {"profile": profile, "pxe_files": list(found), "pxe": stamp or {}}
        if content:
            fields["pxe_content"] = found
        return fields

    return _per_node(items, SHOW_STEP, job)


def clear_profiles(config, items):
    """Remove every profile file of each node."""
    return _per_node(items, CLEAR_STEP, lambda node: {"pxe_files": clear(config, node)})
