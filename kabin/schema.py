"""A strict reader of YAML mappings: typed values, one clear error per bad key.

Every key read is recorded, so ``done()`` can report the keys nobody asked for
(a typo in a configuration file is an error, never silently ignored); a section
given its ``known`` keys reports an unknown one at once, naming the known ones.
The configuration and the environment descriptions both read with it; each
gives its own ``error(message, file, key)`` (ConfigError, InvalidDescription).
"""

from .errors import ConfigError


class Section:
    """A mapping read from one file, tracking the keys used so unknown ones are reported."""

    def __init__(self, data, file, prefix="", known=None, error=ConfigError):
        self.file, self.prefix, self.make_error = file, prefix, error
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise error("expected a mapping", file, prefix.rstrip(".") or None)
        self.data, self.used = data, set()
        for name in data if known is not None else ():
            if name not in known:
                raise self.error(name, f"unknown field (known: {', '.join(known)})")

    def key(self, name):
        return f"{self.prefix}{name}"

    def error(self, name, message):
        return self.make_error(message, self.file, self.key(name))

    def has(self, name):
        return self.data.get(name) is not None

    def get(self, name, kind, default=..., choices=None):
        self.used.add(name)
        if name not in self.data or self.data[name] is None:
            if default is ...:
                raise self.error(name, f"is required ({_describe(kind)})")
            return default
        value = self.data[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(name, f"expected {_describe(kind)}, got {value!r}")
        if choices and value not in choices:
            raise self.error(name, f"expected one of {', '.join(map(str, choices))}, got {value!r}")
        return value

    def section(self, name, required=False, known=None):
        self.used.add(name)
        if required and name not in self.data:
            raise self.error(name, "is required (a mapping)")
        return Section(self.data.get(name), self.file, self.key(name) + ".", known,
                       self.make_error)

    def items(self, name, required=False, known=None):
        """Sub-sections of a list of mappings."""
        value = self.get(name, list, ... if required else [])
        return [Section(v, self.file, f"{self.key(name)}[{i}].", known, self.make_error)
                for i, v in enumerate(value)]

    def done(self):
        for name in self.data:
            if name not in self.used:
                raise self.error(name, "unknown key")


def _describe(kind):
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", dict: "a mapping"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)
