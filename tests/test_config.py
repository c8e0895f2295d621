"""Configuration: the shipped sample loads; every bad key gives its own message."""

import shutil

import pytest
import yaml

from kabin import config, paths
from kabin.errors import ConfigError


@pytest.fixture
def confdir(tmp_path):
    target = tmp_path / "etc"
    shutil.copytree(paths.sample_config_dir(), target)
    return target


def edit(confdir, name, change):
    path = confdir / name
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))


def test_sample_loads_as_shipped():
    cfg = config.Config(paths.sample_config_dir())
    assert sorted(cfg.nodes) == [f"node-{i}" for i in range(1, 9)]
    node = cfg.node("node-3")
    assert node.address == "127.0.1.3" and node.bmc.address == "127.0.2.3"
    assert node.mac == "02:00:7f:00:01:03"
    cluster = cfg.cluster_of("node-3")
    assert cluster.partitioning.partitions["deploy"] == 3
    assert [v.type for v in cluster.automata["BootNewEnv"]] == ["Kexec", "Classical", "HardReboot"]
    assert [op.name for op in cfg.remoteops("node-1", "reboot")] == ["soft", "hard", "very_hard"]
    assert cfg.switch_of("node-5") == "sw2"
    assert cfg.server.chaincast_ports == (25400, 25499)


def test_secret_is_never_in_repr(confdir, monkeypatch):
    edit(confdir, "clusters.yml",
         lambda d: d["clusters"][0]["bmc"].update(password_env="KABIN_T_PW", password_file=None))
    monkeypatch.setenv("KABIN_T_PW", "s3cr3t-value")
    cfg = config.Config(confdir)
    bmc = cfg.node("node-1").bmc
    assert bmc.password.read() == "s3cr3t-value"
    assert "s3cr3t" not in repr(bmc) and "s3cr3t" not in repr(cfg.nodes)


def test_missing_secret_env_is_a_config_error(confdir):
    edit(confdir, "clusters.yml",
         lambda d: d["clusters"][0]["bmc"].update(password_env="KABIN_T_UNSET", password_file=None))
    cfg = config.Config(confdir)
    with pytest.raises(ConfigError, match="KABIN_T_UNSET is not set"):
        cfg.node("node-1").bmc.password.read()


BAD_KEYS = [
    ("server.yml", lambda d: d["ssh"].update(port="twenty-two"), "key 'ssh.port': expected an integer"),
    ("server.yml", lambda d: d.update(colour="blue"), "key 'colour': unknown key"),
    ("server.yml", lambda d: d["windows"]["reboot"].update(size=0), "key 'windows.reboot.size'"),
    ("server.yml", lambda d: d["ports"].update(chaincast=[3, 1]), "key 'ports.chaincast'"),
    ("server.yml", lambda d: d["ssh"].update(host_key_policy="yolo"),
     "key 'ssh.host_key_policy': expected one of ignore, known_hosts"),
    ("clusters.yml", lambda d: d["clusters"][0]["nodes"][0].update(names="node-[1-"),
     "key 'clusters[0].nodes[0].names'"),
    ("clusters.yml", lambda d: d["clusters"][0]["nodes"][0].update(address="10.0.0.[1-3]"),
     "key 'clusters[0].nodes[0].address': address: 3 values for 8 nodes"),
    ("clusters.yml", lambda d: d["clusters"][0]["nodes"][0].update(bmc="$(reboot)"),
     "key 'clusters[0].nodes[0].bmc': invalid value '$(reboot)': expected a host name"),
    ("clusters.yml", lambda d: d["clusters"][0]["nodes"][0].update(address=["a;b"] * 8),
     "key 'clusters[0].nodes[0].address': invalid value 'a;b'"),
    ("clusters.yml", lambda d: d["clusters"][0]["nodes"][0].update(mac="02:00"),
     "key 'clusters[0].nodes[0].mac': invalid value '02:00'"),
    ("clusters.yml", lambda d: d["clusters"][0].pop("bmc"),
     "key 'clusters[0].nodes[0].bmc': BMC addresses need"),
    ("clusters.yml", lambda d: d["clusters"][0]["bmc"].pop("password_file"),
     "key 'clusters[0].bmc.password_file': a BMC password comes from"),
    ("cluster-local.yml", lambda d: d["partitioning"]["partitions"].pop("deploy"),
     "key 'partitioning.partitions.deploy': is required"),
    ("cluster-local.yml", lambda d: d["partitioning"].update(label="apm"),
     "key 'partitioning.label': expected one of dos, gpt"),
    ("cluster-local.yml", lambda d: d["partitioning"].update(sizes={"swap": "lots"}),
     "key 'partitioning.sizes.swap': expected a size such as 64MiB"),
    ("cluster-local.yml", lambda d: d["partitioning"].update(sizes={"esp": "64MiB"}),
     "key 'partitioning.sizes.esp': names no partition"),
    ("cluster-local.yml", lambda d: d["partitioning"].update(
        sizes={"swap": "1GiB", "prod": "rest", "deploy": "2GiB"}),
     "key 'partitioning.sizes': every partition but the last needs a size (prod"),
    ("cluster-local.yml", lambda d: d["partitioning"].update(
        partitions={"swap": 1, "deploy": 3}, sizes={"swap": "1GiB"}),
     "key 'partitioning.partitions': with sizes, the partitions are numbered 1, 2"),
    ("cluster-local.yml", lambda d: d["boot"].update(bootloader="lilo"),
     "key 'boot.bootloader': expected one of grub, activate"),
    ("cluster-local.yml", lambda d: d["pxe"].update(method="floppy"),
     "key 'pxe.method': expected one of pxelinux, ipxe, grub"),
    ("cluster-local.yml", lambda d: d["automata"]["BootNewEnv"][0].update(type="Teleport"),
     "key 'automata.BootNewEnv[0].type': expected one of Kexec, Classical, HardReboot"),
    ("cluster-local.yml", lambda d: d["automata"]["BroadcastEnv"][0].update(timeout="n +"),
     "key 'automata.BroadcastEnv[0].timeout': invalid timeout expression"),
    ("cluster-local.yml", lambda d: d["timeouts"].update(reboot="__import__('os')"),
     "key 'timeouts.reboot': invalid timeout expression"),
    ("cluster-local.yml", lambda d: d["remoteops"]["reboot"][1].pop("action"),
     "key 'remoteops.reboot[1].action': is required for a remote operation of type ipmi"),
    ("cluster-local.yml", lambda d: d["remoteops"]["reboot"][0].pop("cmd"),
     "key 'remoteops.reboot[0].cmd': is required for a remote operation of type ssh"),
    ("cluster-local.yml", lambda d: d["boot"]["kernels"].pop("deploy"),
     "key 'boot.kernels.deploy': is required"),
    ("cluster-local.yml", lambda d: d["automata"].pop("SetDeploymentEnv"),
     "key 'automata.SetDeploymentEnv': is required"),
    ("cluster-local.yml", lambda d: d.update(admin_postinstalls=[{"archive": "a.tgz",
                                                                  "compression": "rar"}]),
     "key 'admin_postinstalls[0].compression': expected one of none, gzip"),
    ("cluster-local.yml", lambda d: d["topology"]["switches"][0].update(nodes="x[1-"),
     "key 'topology.switches[0].nodes'"),
]


@pytest.mark.parametrize("name, change, message", BAD_KEYS,
                         ids=[m.split("'")[1] if "'" in m else m for _, _, m in BAD_KEYS])
def test_each_bad_key_has_its_own_message(confdir, name, change, message):
    edit(confdir, name, change)
    with pytest.raises(ConfigError) as info:
        config.Config(confdir)
    text = str(info.value)
    assert text.startswith(str(confdir / name) + ": "), text
    assert message in text


def test_invalid_yaml_names_the_line(confdir):
    (confdir / "server.yml").write_text("paths:\n  state_dir: [unclosed\n")
    with pytest.raises(ConfigError, match=r"server.yml: invalid YAML at line \d"):
        config.Config(confdir)


def test_missing_file(confdir):
    (confdir / "cluster-local.yml").unlink()
    with pytest.raises(ConfigError, match="cluster-local.yml: file not found"):
        config.Config(confdir)


def test_lookup_order(confdir, monkeypatch, tmp_path):
    monkeypatch.setenv("KABIN_CONFIG", str(confdir))
    assert config.find_config_dir() == confdir
    assert config.find_config_dir(tmp_path) == tmp_path
    monkeypatch.delenv("KABIN_CONFIG")
    expected = config.SYSTEM_DIR if (config.SYSTEM_DIR / "server.yml").exists() \
        else paths.sample_config_dir()
    assert config.find_config_dir() == expected


@pytest.mark.parametrize("expr, n, value", [("120", 5, 120), ("60 + n / 10", 100, 70),
                                            ("max(30, 2 * n)", 50, 100), ("ceil(log(n) * 10)", 8, 21)])
def test_timeout_expressions(expr, n, value):
    assert config.eval_timeout(expr, n) == value


@pytest.mark.parametrize("expr", ["n.__class__", "open('x')", "-5", "1/0", "n if n else 1"])
def test_timeout_expressions_refused(expr):
    with pytest.raises(ValueError):
        config.eval_timeout(expr, 3)


def test_admin_postinstalls(confdir):
    edit(confdir, "cluster-local.yml", lambda d: d.update(
        admin_postinstalls=[{"archive": "site/post.tgz", "script": "sh run.sh"}]))
    [item] = config.Config(confdir).clusters["local"].admin_postinstalls
    assert item == {"archive": str(confdir / "site/post.tgz"), "compression": "gzip",
                    "script": "sh run.sh"}


def test_partition_device_names():
    assert config.partition_device("/dev/sda", 3) == "/dev/sda3"
    assert config.partition_device("/dev/nvme0n1", 3) == "/dev/nvme0n1p3"
    assert config.partition_device("/dev/loop7", 1) == "/dev/loop7p1"


def test_partition_layout_for_partition_sh(confdir):
    edit(confdir, "cluster-local.yml", lambda d: d["partitioning"].update(
        label="gpt", partitions={"esp": 1, "swap": 2, "deploy": 3, "tmp": 4},
        sizes={"esp": "64MiB", "swap": "128MiB", "deploy": "2GiB"}))
    cluster = config.Config(confdir).clusters["local"]
    assert cluster.partitioning.label == "gpt"
    assert cluster.partitioning.layout() == "1:esp:64MiB 2:swap:128MiB 3:deploy:2GiB 4:tmp:"
