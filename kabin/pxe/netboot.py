"""The netboot profile's kernel and initrd: an environment's own, or files given directly.

An environment's ``boot.kernel`` and ``boot.initrd`` are paths inside its tar
image (``/vmlinuz`` is often a symbolic link to ``boot/vmlinuz-<version>``): they
are read from the image (after its checksum is verified) and stored in the PXE
tree's kernel cache, by content. The environment's ``boot.kernel_params`` go on
the kernel command line after the cluster's ``boot.kernels.user.params``.
"""

import logging
import posixpath
import tarfile

from .. import db, envs
from ..errors import UsageError
from .cache import KernelCache
from .profiles import Request

log = logging.getLogger(__name__)
progress = logging.getLogger("kabin.progress")

# A symbolic link is followed by reading the image again: bound the passes.
MAX_PASSES = 4


def request_from_files(config, kernel, initrd=None, params=""):
    """A netboot Request booting local files ``kernel`` (and ``initrd``)."""
    cache = KernelCache(config.server.pxe_root, config.server.pxe_cache_size)
    return Request("netboot", kernel=cache.add_file(kernel),
                   initrd=cache.add_file(initrd) if initrd else None, params=params or "",
                   stamp={"kernel": posixpath.basename(str(kernel))})


def request_from_env(config, spec, owner=None, version=None, params=""):
    """A netboot Request booting the kernel and initrd of environment ``spec``."""
    with db.open_database(config) as database:
        env = envs.resolve(database, spec, envs.current_user(), owner=owner, version=version)
    if env.image_kind != "tar":
        raise UsageError(f"environment {env.label} is a {env.image_kind} image: its kernel can "
                         "only be read from a tar image (give --kernel/--initrd instead)")
    if not env.kernel:
        raise UsageError(f"environment {env.label} names no boot.kernel")
    envs.verify(env)
    cache = KernelCache(config.server.pxe_root, config.server.pxe_cache_size)
    found = extract(env, cache, {"kernel": env.kernel, **({"initrd": env.initrd}
                                                           if env.initrd else {})})
    extra = " ".join(p for p in (env.kernel_params, params) if p)
    return Request("netboot", kernel=found["kernel"], initrd=found.get("initrd"), params=extra,
                   stamp={"env": env.spec})


def _member_path(name):
    return posixpath.normpath("/" + name).lstrip("/")


def extract(env, cache, wanted):
    """Read the files ``{role: path in the image}`` from ``env``'s tar image into ``cache``;
    return ``{role: path relative to pxe_root}``."""
    pending = {role: _member_path(path) for role, path in wanted.items()}
    found = {}
    for _ in range(MAX_PASSES):
        progress.info("reading %s from %s", ", ".join(sorted(pending.values())), env.image_file)
        before = dict(pending)
        _one_pass(env, cache, pending, found)
        if not pending or pending == before:
            break
    if pending:
        missing = ", ".join(f"{role} {wanted[role]}" + (
            f" (a link to /{path})" if path != _member_path(wanted[role]) else "")
            for role, path in pending.items())
        raise UsageError(f"environment {env.label}: {missing} not found in {env.image_file}")
    return found


def _one_pass(env, cache, pending, found):
    """Stream the image once, storing the regular files wanted and following links."""
    from ..chaincast.agent import decompressed  # the decompressors the broadcast uses

    try:
        with envs.open_file(env.image_file) as raw, \
                decompressed(raw, env.image_compression) as stream, \
                tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                name = _member_path(member.name)
                for role in [r for r, path in pending.items() if path == name]:
                    if member.isreg():
                        found[role] = cache.add_stream(archive.extractfile(member),
                                                       posixpath.basename(name))
                        del pending[role]
                    elif member.issym():
                        pending[role] = _member_path(posixpath.join(posixpath.dirname(name),
                                                                    member.linkname))
                    elif member.islnk():
                        pending[role] = _member_path(member.linkname)
                if not pending:
                    return
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise envs.EnvironmentFileError(f"cannot read {env.image_file} as a "
                                        f"{env.image_compression} tar image: {exc}") from None
