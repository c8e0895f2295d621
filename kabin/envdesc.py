"""Kadeploy3 environment descriptions: read, validate, normalize, print back.

A description is the YAML file ``kaenv3 -a`` took; every Kadeploy3 field is
accepted unchanged (see kadeploy-reference.md), ``zstd`` is added to the
compressions. Validation is strict: an unknown field, a missing one or a bad
value raises one ``InvalidDescription`` naming the source and the field.
``normalize`` returns a plain dict with defaults filled in and file locations
made absolute; ``dump`` prints it back as YAML that loads again unchanged.
"""

import os
import re
from urllib.parse import urlparse

import yaml

from .errors import UsageError
from .schema import Section

KINDS = ("tar", "dd", "fsa")
COMPRESSIONS = ("gzip", "bzip2", "xz", "zstd")
FSA_LEVELS = range(10)
OS_KINDS = ("linux", "xen", "other")
VISIBILITIES = ("private", "shared", "public")
FIELD_ORDER = ("name", "version", "description", "author", "visibility", "destructive", "os",
               "image", "preinstall", "postinstalls", "boot", "filesystem", "partition_type",
               "multipart", "options")
BOOT_FIELDS = ("kernel", "initrd", "kernel_params", "hypervisor", "hypervisor_params",
               "block_device", "partition")
# Kadeploy3's "file on the server" and "file on the client": both local files here
LOCAL_SCHEMES = ("server", "local")
# '@' separates a name from its version in NAME@VERSION, so it cannot be part of a name
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


class InvalidDescription(UsageError):
    """An environment description that does not validate; names the file and the field."""

    def __init__(self, source, field, message):
        where = f"field '{field}': " if field else ""
        super().__init__(f"{source}: {where}{message}")
        self.source, self.field = source, field


def _invalid(message, source, field):
    """The error a schema.Section raises for a description."""
    return InvalidDescription(source, field, message)


def parse_text(text, source, base_dir=None):
    """Validate the YAML text of a description; return it normalized."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise InvalidDescription(source, None,
                                 f"invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        raise InvalidDescription(source, None, "empty description")
    return normalize(data, source, base_dir)


def load_file(path):
    """Read and validate a description file; relative file locations are relative to it."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise InvalidDescription(str(path), None, f"not a text (UTF-8) YAML description: byte "
                                                  f"{exc.start} is {exc.object[exc.start]:#04x}") \
            from None
    return parse_text(text, str(path), os.path.dirname(os.path.abspath(path)))


def normalize(data, source, base_dir=None):
    """The validated description with defaults filled in, fields in Kadeploy3's order."""
    top = Section(data, source, "", FIELD_ORDER, _invalid)
    name = top.get("name", str)
    if not NAME_PATTERN.match(name):
        raise top.error("name", f"invalid name {name!r}: use letters, digits and . _ + - "
                                "(starting with a letter or digit)")
    version = top.get("version", int, default=1)
    if version < 1:
        raise top.error("version", f"expected a positive integer, got {version}")
    desc = {"name": name, "version": version}
    for key in ("description", "author"):
        if top.has(key):
            desc[key] = top.get(key, str, None)
    desc["visibility"] = top.get("visibility", str, choices=VISIBILITIES, default="private")
    desc["destructive"] = top.get("destructive", bool, default=False)
    desc["os"] = top.get("os", str, choices=OS_KINDS, default="linux")
    desc["image"] = _image(top, base_dir)
    if top.has("preinstall"):
        desc["preinstall"] = _archive(top.get("preinstall", dict, None), source, "preinstall",
                                      base_dir)
    if top.has("postinstalls"):
        desc["postinstalls"] = [_archive(item, source, f"postinstalls[{i}]", base_dir)
                                for i, item in enumerate(top.get("postinstalls", list, None))]
    boot = _boot(top)
    if boot:
        desc["boot"] = boot
    if top.has("filesystem"):
        desc["filesystem"] = top.get("filesystem", str, None)
    if top.has("partition_type"):
        desc["partition_type"] = _partition_type(top)
    desc["multipart"] = top.get("multipart", bool, default=False)
    if top.has("options"):
        desc["options"] = _options(top)
    _check_consistency(desc, top)
    return desc


def _image(top, base_dir):
    sec = Section(top.get("image", dict), top.file, "image.", ("file", "kind", "compression"),
                  _invalid)
    kind = sec.get("kind", str, choices=KINDS)
    if kind == "fsa":
        compression = sec.get("compression", int, choices=FSA_LEVELS)
    else:
        compression = sec.get("compression", str, choices=COMPRESSIONS)
    return {"file": _location(sec, "file", base_dir), "kind": kind, "compression": compression}


def _archive(data, source, prefix, base_dir):
    sec = Section(data, source, f"{prefix}.", ("archive", "compression", "script"), _invalid)
    archive = {"archive": _location(sec, "archive", base_dir),
               "compression": sec.get("compression", str, choices=COMPRESSIONS)}
    if sec.has("script"):
        archive["script"] = sec.get("script", str, None)
    return archive


def _boot(top):
    if not top.has("boot"):
        return {}
    sec = Section(top.get("boot", dict, None), top.file, "boot.", BOOT_FIELDS, _invalid)
    boot = {}
    for key in BOOT_FIELDS:
        if sec.has(key):
            boot[key] = sec.get(key, int if key == "partition" else str, None)
    return boot


def _partition_type(top):
    """An MBR partition type: 131, "131" or "0x83" (Kadeploy3 wrote all three)."""
    value = top.data["partition_type"]
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        try:
            number = int(value, 0)
        except ValueError:
            pass
    if number is None or not 0 <= number <= 255:
        raise top.error("partition_type", f"expected a partition type number 0-255 such as "
                                          f"131 or 0x83, got {value!r}")
    return number


def _options(top):
    sec = Section(top.get("options", dict, None), top.file, "options.", ("partitions",), _invalid)
    partitions = []
    for i, item in enumerate(sec.get("partitions", list, default=[])):
        part = Section(item, top.file, f"options.partitions[{i}].", ("id", "device"), _invalid)
        partitions.append({"id": part.get("id", int), "device": part.get("device", str)})
    return {"partitions": partitions}


def _location(sec, name, base_dir):
    """A local path (made absolute), an http(s) URL, or Kadeploy3's server:// or local://."""
    value = sec.get(name, str)
    scheme = urlparse(value).scheme
    if scheme in ("http", "https"):
        return value
    if scheme in LOCAL_SCHEMES:
        if not os.path.isabs(value[len(scheme) + 3:]):
            raise sec.error(name, f"expected {scheme}:// followed by an absolute path, "
                                  f"got {value!r}")
        return value
    if scheme:
        raise sec.error(name, f"unsupported location {value!r}: use a local path, an "
                              "http(s) URL, or server:///PATH")
    if not os.path.isabs(value):
        if base_dir is None:
            raise sec.error(name, f"expected an absolute path or an http(s) URL, got {value!r}")
        value = os.path.join(base_dir, value)
    return os.path.normpath(value)


def _check_consistency(desc, top):
    kind, boot = desc["image"]["kind"], desc.get("boot", {})
    if kind == "tar":
        if "kernel" not in boot:
            raise top.error("boot.kernel", "is required for a tar image (the kernel path "
                                           "inside the image)")
        if "filesystem" not in desc:
            raise top.error("filesystem", "is required for a tar image (the file system to "
                                          "create, e.g. ext4)")
    if desc["os"] == "xen" and "hypervisor" not in boot:
        raise top.error("boot.hypervisor", "is required when os is xen")
    if desc["multipart"] and not desc.get("options", {}).get("partitions"):
        raise top.error("options.partitions", "is required when multipart is true")


def local_path(location):
    """The path of a local location (``/x``, ``server:///x``), None for an http(s) URL."""
    scheme = urlparse(location).scheme
    if scheme in LOCAL_SCHEMES:
        return location[len(scheme) + 3:]
    return None if scheme else location


def file_locations(desc):
    """``[(role, location)]`` of every file the description names (checksummed on add)."""
    files = [("image", desc["image"]["file"])]
    if "preinstall" in desc:
        files.append(("preinstall", desc["preinstall"]["archive"]))
    for i, post in enumerate(desc.get("postinstalls", ())):
        files.append((f"postinstalls[{i}]", post["archive"]))
    return files


def with_locations(desc, mapping):
    """A copy of ``desc`` whose file locations are replaced by ``mapping[role]``."""
    out = {**desc, "image": {**desc["image"]}}
    if "image" in mapping:
        out["image"]["file"] = mapping["image"]
    if "preinstall" in desc:
        out["preinstall"] = {**desc["preinstall"]}
        out["preinstall"]["archive"] = mapping.get("preinstall", desc["preinstall"]["archive"])
    if "postinstalls" in desc:
        out["postinstalls"] = [
            {**post, "archive": mapping.get(f"postinstalls[{i}]", post["archive"])}
            for i, post in enumerate(desc["postinstalls"])]
    return out


def dump(desc):
    """The description as YAML, in Kadeploy3's field order; ``parse_text`` reads it back."""
    ordered = {key: desc[key] for key in FIELD_ORDER if key in desc}
    return yaml.safe_dump(ordered, sort_keys=False, default_flow_style=False, allow_unicode=True)
