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
from dataclasses import dataclass

from .. import records
from ..errors import KabinError
from .profiles import DISK, PROFILES, ProfileWriter, Request, clear, show
from .templates import NODE_VALUES, load_file

__all__ = ["DISK", "PROFILES", "Options", "ProfileWriter", "Request", "clear", "clear_profiles",
           "custom_request", "run", "set_profiles", "show", "show_profiles"]

STEP, SHOW_STEP, CLEAR_STEP = "pxe", "pxe-show", "pxe-clear"


def custom_request(template_path):
    """A Request for the custom profile of ``template_path`` (checked at once)."""
    template = load_file(template_path, NODE_VALUES)
    return Request("custom", template=template,
                   stamp={"template": str(template_path).rsplit("/", 1)[-1].replace(" ", "_")})


def _per_node(items, step, job):
    """Apply ``job(node) -> fields`` to every OK record; a KabinError makes the node KO.

    In the caller's thread, not the executor's: each record comes out before the
    next is read (a profile is a small local file), which a feeding thread would
    not keep."""
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


@dataclass(frozen=True)
class Options:
    """``ka-pxe set PROFILE``: what to boot, from what; ``to_argv()`` is its command line.

    ``partition`` (local: a number or DISK); ``env`` and ``owner`` (netboot an
    environment's kernel), or ``kernel`` and ``initrd`` (netboot local files),
    with ``params``; ``template`` (custom: a template file).
    """

    profile: str = "deploy"
    partition: object = None
    env: str | None = None
    owner: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    params: str = ""
    template: str | None = None
    step: str = STEP

    def request(self, config):
        """The profile Request (netboot copies its files into the PXE tree's cache now)."""
        if self.profile == "custom":
            return custom_request(self.template)
        if self.profile == "netboot":
            from . import netboot
            if self.env:
                return netboot.request_from_env(config, self.env, owner=self.owner,
                                                params=self.params)
            return netboot.request_from_files(config, self.kernel, self.initrd, self.params)
        return Request(self.profile, partition=self.partition)

    def to_argv(self):
        argv = ["ka-pxe", "set", self.profile] + ([] if self.step == STEP else
                                                  [f"--step={self.step}"])
        fields = (("--partition", self.partition), ("--env", self.env), ("--owner", self.owner),
                  ("--kernel", self.kernel), ("--initrd", self.initrd),
                  ("--params", self.params), ("--template", self.template))
        return argv + [f"{flag}={value}" for flag, value in fields if value]


def run(config, items, options, stop=None):
    """Write ``options``' profile for every OK record of ``items`` (one small local file
    per node: ``stop`` is not needed)."""
    return set_profiles(config, options.request(config), items, options.step)


def set_profiles(config, request, items, step=STEP):
    """Write ``request``'s profile for every OK record of ``items``."""
    writer = ProfileWriter(config, request)  # checks templates before reading any record

    def job(node):
        return {"profile": request.profile, "pxe_files": writer.apply(node)}

    return _per_node(items, step, job)


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
