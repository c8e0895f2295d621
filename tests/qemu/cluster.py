"""Test configurations for ka-pxe: the shipped sample, moved to a temporary state dir,
with clusters made to measure (their pxe section, nodes, deploy kernel)."""

import copy
import shutil
from pathlib import Path

import yaml

from kabin import config, paths


def make_config(tmp_path, clusters=None, cache_mb=None):
    """A configuration directory under ``tmp_path`` (state in ``tmp_path/state``).

    ``clusters``: {name: {"pxe": {...}, "nodes": [(name, address, mac)], "deploy": {...},
    "user_params": str}}; None keeps the sample's cluster "local" (node-[1-8]).
    Returns the loaded Config (uncached: each test gets its own).
    """
    confdir = Path(tmp_path) / "etc"
    shutil.copytree(paths.sample_config_dir(), confdir)
    server = yaml.safe_load((confdir / "server.yml").read_text())
    server["paths"]["state_dir"] = str(Path(tmp_path) / "state")
    if cache_mb is not None:
        server["paths"]["pxe_cache_size_mb"] = cache_mb
    (confdir / "server.yml").write_text(yaml.safe_dump(server))
    if clusters is not None:
        _write_clusters(confdir, clusters)
    return config.Config(confdir)


def _write_clusters(confdir, clusters):
    sample = yaml.safe_load((confdir / "cluster-local.yml").read_text())
    sample.pop("topology", None)
    entries = []
    for name, spec in clusters.items():
        data = copy.deepcopy(sample)
        data["pxe"] = spec["pxe"]
        data["boot"]["kernels"]["deploy"].update(spec.get("deploy", {}))
        if "user_params" in spec:
            data["boot"]["kernels"]["user"]["params"] = spec["user_params"]
        (confdir / f"cluster-{name}.yml").write_text(yaml.safe_dump(data))
        nodes = [{"names": n, "address": a, **({"mac": m} if m else {})}
                 for n, a, m in spec["nodes"]]
        entries.append({"name": name, "file": f"cluster-{name}.yml", "nodes": nodes})
    (confdir / "clusters.yml").write_text(yaml.safe_dump({"clusters": entries}))
