"""Profile templates: ``share/pxe-templates/<method>-<kind>.tmpl``, overridable by a file
of the same name in ``<config dir>/pxe-templates/``.

A placeholder is written ``{{ name }}``. A line holding a placeholder whose value is
absent (no header configured for the method, no initrd) is left out, so one template
serves both cases; a line whose value is a list (a dispatcher's names) is repeated. An unknown placeholder or an unclosed ``{{`` is an error naming the
file and the line, raised when the template is loaded, before any profile is written.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from .. import paths
from ..errors import ConfigError, UsageError

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")

# What a placeholder holds (the names of every template, built-in or custom).
NODE_VALUES = {
    "node": "the node's name",
    "short": "the node's name up to its first dot",
    "cluster": "the node's cluster",
    "name": "the NAME of the node's profile files (from pxe.naming)",
    "ip": "the node's IPv4 address (dotted)",
    "ip_hex": "the node's IPv4 address in uppercase hex (0A000001)",
    "mac": "the node's MAC address (aa:bb:cc:dd:ee:ff)",
    "header": "the cluster's pxe.headers text for this method (line left out when none)",
    "kernel": "the kernel, relative to pxe_root (custom: the deploy kernel)",
    "initrd": "the initrd, relative to pxe_root (line left out when none)",
    "params": "the kernel command line (custom: the deploy kernel's)",
    "user_params": "the cluster's boot.kernels.user.params",
    "deploy_partition": "the cluster's deploy partition number",
}
BUILTIN_VALUES = {
    "profile": "the profile: deploy, local, netboot, custom",
    "local_target": "what the loader boots locally: hd0 3, (hd0,msdos3), 0x80",
    "target_file": "the chained loader's profile file, relative to pxe_root",
    "naming": "the cluster's pxe.naming",
    "node_file": "a dispatcher's expressions of NAME in the firmware's variables (a list)",
}


@dataclass(frozen=True)
class Template:
    """A parsed template: per line, the literal pieces and the placeholders between them."""

    source: str
    lines: tuple  # of (pieces, names): pieces has one more element than names

    @property
    def placeholders(self):
        return {name for _, names in self.lines for name in names}

    def render(self, values):
        """The text with every placeholder replaced; a line with an absent value (None) is
        left out, a line with a tuple value is repeated for each of its items."""
        out = []
        for pieces, names in self.lines:
            if any(values[n] is None for n in names):
                continue
            repeats = {len(values[n]) for n in names if isinstance(values[n], tuple)}
            for index in range(max(repeats, default=1)):
                text = pieces[0]
                for name, piece in zip(names, pieces[1:]):
                    value = values[name]
                    text += str(value[index] if isinstance(value, tuple) else value) + piece
                out.append(text)
        return "".join(out)


def parse(text, source, allowed):
    """Parse ``text``; every placeholder must be one of ``allowed``."""
    lines = []
    for lineno, line in enumerate(text.splitlines(keepends=True), 1):
        pieces, names, pos = [], [], 0
        for match in _PLACEHOLDER.finditer(line):
            if "{{" in line[pos:match.start()]:
                raise _unclosed(source, lineno)
            name = match.group(1)
            if name not in allowed:
                raise UsageError(f"{source}:{lineno}: unknown placeholder {{{{ {name} }}}} "
                                 f"(known: {', '.join(sorted(allowed))})")
            pieces.append(line[pos:match.start()])
            names.append(name)
            pos = match.end()
        if "{{" in line[pos:]:
            raise _unclosed(source, lineno)
        pieces.append(line[pos:])
        lines.append((tuple(pieces), tuple(names)))
    return Template(source, tuple(lines))


def _unclosed(source, lineno):
    return UsageError(f"{source}:{lineno}: '{{{{' without a placeholder name and '}}}}' "
                      "(write placeholders as {{ name }})")


def load_file(path, allowed):
    """A template read from ``path`` (a custom template given on the command line)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read the template {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"the template {path} is not UTF-8 text") from None
    return parse(text, str(path), allowed)


class Library:
    """The built-in templates, each overridable from ``<config dir>/pxe-templates/``."""

    def __init__(self, config_dir):
        self.override_dir = Path(config_dir) / "pxe-templates"
        self.shipped_dir = paths.pxe_templates_dir()
        self._loaded = {}

    def get(self, name):
        """The template ``name`` (e.g. ``pxelinux-local``), parsed once."""
        if name not in self._loaded:
            path = self.override_dir / f"{name}.tmpl"
            if not path.exists():
                path = self.shipped_dir / f"{name}.tmpl"
            if not path.exists():
                raise ConfigError(f"PXE template {name}.tmpl not found (looked in "
                                  f"{self.override_dir} and {self.shipped_dir})")
            try:
                self._loaded[name] = load_file(path, {**NODE_VALUES, **BUILTIN_VALUES})
            except UsageError as exc:  # a broken shipped or admin template: configuration
                raise ConfigError(str(exc)) from None
        return self._loaded[name]
