"""Where the shipped data lives: in a source checkout, or under ``sys.prefix/share/kabin``."""

import sys
from pathlib import Path

_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def _find(source_relative, installed_relative):
    candidate = _SOURCE_ROOT / source_relative
    if candidate.exists():
        return candidate
    return Path(sys.prefix) / "share" / "kabin" / installed_relative


def sample_config_dir():
    """The shipped sample configuration (it describes the built-in local test cluster)."""
    return _find("etc/kadeploy", "etc/kadeploy")


def pxe_templates_dir():
    return _find("share/pxe-templates", "pxe-templates")
