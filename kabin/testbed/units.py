"""Sizes (``512M``, ``16MiB``) and link rates (``100mbit``) given on the command line."""

import re

from ..errors import UsageError

_SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9,
               "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9}


def parse_size(text):
    """``"512M"``, ``"16MiB"``, ``"1G"`` or a number of bytes -> bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise UsageError(f"invalid size {text!r}: expected e.g. 512M, 16MiB, 1G or bytes")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]


def parse_rate(text):
    """``"100mbit"``, ``"1gbit"``, ``"500kbit"`` (or tc's ``bps`` units, bytes/s) -> bits/s."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*", str(text), re.IGNORECASE)
    unit = match.group(2).lower() if match else None
    if unit not in _RATE_UNITS:
        raise UsageError(f"invalid rate {text!r}: expected e.g. 100mbit, 1gbit, 500kbit")
    bits = int(float(match.group(1)) * _RATE_UNITS[unit])
    if bits < 8000:
        raise UsageError(f"rate {text!r} is too low: at least 8kbit")
    return bits
