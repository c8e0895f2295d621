"""What to broadcast and where each node writes it."""

import os
from dataclasses import dataclass
from pathlib import Path

from ..partitioning import partition_device
from ..errors import UsageError

KINDS = ("tar", "dd")
COMPRESSIONS = ("gzip", "bzip2", "xz", "zstd", "none")
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
          (b"\x28\xb5\x2f\xfd", "zstd"))


@dataclass(frozen=True)
class Image:
    path: Path
    size: int
    kind: str              # tar | dd
    compression: str       # gzip | bzip2 | xz | zstd | none
    sha256: str | None = None  # known in advance (an environment's recorded checksum)


def detect_compression(path):
    """The compression of a file from its first bytes ('none' if none is recognised)."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    return next((name for magic, name in _MAGIC if head.startswith(magic)), "none")


def open_image(path, kind="tar", compression="auto", sha256=None):
    """Describe a local image file; ``compression='auto'`` reads it from the file."""
    path = Path(path)
    if kind not in KINDS:
        raise UsageError(f"image kind {kind!r} cannot be broadcast (expected {', '.join(KINDS)})")
    try:
        size = os.stat(path).st_size
        if compression == "auto":
            compression = detect_compression(path)
    except OSError as exc:
        raise UsageError(f"cannot read the image {path}: {exc.strerror}") from None
    if compression not in COMPRESSIONS:
        raise UsageError(f"unknown compression {compression!r} (expected {', '.join(COMPRESSIONS)})")
    if not path.is_file():
        raise UsageError(f"the image {path} is not a regular file")
    return Image(path, size, kind, compression, sha256)


def from_environment(config, spec, owner=None, kind=None, compression=None):
    """The image of environment ``spec`` (NAME[@VERSION]), checked against its recorded checksum."""
    from .. import db, envs

    with db.open_database(config) as database:
        env = envs.resolve(database, spec, envs.current_user(), owner=owner)
    envs.verify(env)
    path = envs.local_path(env.image_file)
    if path is None:
        raise UsageError(f"the image of {env.label} is not a local file ({env.image_file}): "
                         "fetch it first and use --image")
    recorded = next((f.sha256 for f in env.files if f.role == "image"), None)
    return open_image(path, kind or env.image_kind, compression or env.image_compression or "auto",
                      sha256=recorded)


def default_dest(config, node, kind):
    """Where a node writes by default: the extraction dir (tar), the deploy partition (dd)."""
    if kind == "tar":
        return config.server.extraction_dir
    partitioning = config.cluster_of(node).partitioning
    return partition_device(partitioning.block_device, partitioning.partitions["deploy"])
