"""The kabin configuration of a testbed instance, written by ``ka-testbed up``.

It is the shipped sample (etc/kadeploy) with the instance's own values: for the
instance ``default`` with 8 nodes and 2 switches it says exactly what the sample
says, so ``KABIN_CONFIG`` may point at either.
"""

import shutil

import yaml

from .. import nodes as nodes_mod
from .. import paths
from . import layout as layout_mod

HEADER = ("# Written by 'ka-testbed up' for the testbed instance {name} ({size} nodes{tier}).\n"
          "# Rewritten at every 'up': copy the directory to keep changes.\n")


def _sample(name):
    with open(paths.sample_config_dir() / name, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def _dump(path, data, lay):
    tier = ", netns tier" if lay.netns else ""
    text = HEADER.format(name=lay.name, size=lay.size, tier=tier)
    text += yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)
    path.write_text(text, encoding="utf-8")


def server_data(lay):
    data = _sample("server.yml")
    data["paths"]["state_dir"] = str(lay.state_dir)
    data["ssh"]["key"] = str(layout_mod.SHARED_KEY)
    data["ssh"]["known_hosts"] = str(lay.state_dir / "known_hosts")
    data["ssh"]["known_hosts_deploy"] = str(lay.state_dir / "known_hosts.deploy")
    return data


def _blocks(lay):
    """Node index ranges that share their /24 (a node entry each, as patterns)."""
    per = layout_mod.NODES_PER_BLOCK
    return [range(start, min(start + per, lay.size)) for start in range(0, lay.size, per)]


def _pattern(address_of, block):
    first, last = address_of(block[0]), address_of(block[-1])
    net = first.rpartition(".")[0]
    lo, hi = first.rpartition(".")[2], last.rpartition(".")[2]
    return f"{net}.[{lo}-{hi}]" if lo != hi else first


def clusters_data(lay):
    sample = _sample("clusters.yml")["clusters"][0]
    entries = []
    for block in _blocks(lay):
        names = nodes_mod.fold([lay.node_name(i) for i in block])
        entries.append({"names": names, "address": _pattern(lay.node_address, block),
                        "bmc": _pattern(lay.bmc_address, block),
                        "mac": [lay.mac(i) for i in block]})
    bmc = {"user": layout_mod.BMC_USER, "password_file": str(layout_mod.SHARED_SECRET),
           "port": layout_mod.BMC_PORT}
    return {"clusters": [{"name": sample["name"], "file": sample["file"], "bmc": bmc,
                          "nodes": entries}]}


def cluster_data(lay, groups):
    data = _sample("cluster-local.yml")
    switches = []
    for k, members in enumerate(groups, 1):
        names = nodes_mod.fold([lay.node_name(i) for i in members])
        switches.append({"name": f"sw{k}", "nodes": names, "uplink": "core"})
    data["topology"] = {"switches": switches}
    return data


def write(lay, groups):
    """Write server.yml, clusters.yml, the cluster file and its scripts into lay.config_dir."""
    directory = lay.config_dir
    directory.mkdir(parents=True, exist_ok=True)
    cluster_file = _sample("clusters.yml")["clusters"][0]["file"]
    _dump(directory / "server.yml", server_data(lay), lay)
    _dump(directory / "clusters.yml", clusters_data(lay), lay)
    _dump(directory / cluster_file, cluster_data(lay, groups), lay)
    shutil.copytree(paths.sample_config_dir() / "scripts", directory / "scripts",
                    dirs_exist_ok=True)
    return directory
