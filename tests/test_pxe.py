"""ka-pxe: naming, the record stream, bad input, atomic writes, show/clear, templates, CLI."""

import json
import os
import subprocess
import sys
import threading

import pytest
from qemu.cluster import make_config

from kabin import pxe
from kabin.config import NodeConfig
from kabin.errors import ConfigError, UsageError
from kabin.pxe import naming, templates

NODES = [("node-1", "127.0.1.1", "02:00:7f:00:01:01"), ("node-2", "10.0.0.1", None),
         ("node-3.site.example", "192.168.1.254", "02-00-7F-00-01-03")]


def _config(tmp_path, **pxe_conf):
    return make_config(tmp_path, {"c": {"pxe": {"method": "pxelinux", **pxe_conf},
                                        "nodes": NODES}})


def _set(config, request, *nodes):
    return list(pxe.set_profiles(config, request, [{"node": n, "status": "ok"} for n in nodes]))


def _tree(config):
    root = config.server.pxe_root
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) \
        if root.exists() else []


# ---------------------------------------------------------------- naming

def _node(address="10.0.0.1", mac=None, name="node-1.site.example"):
    return NodeConfig(name, "c", address, mac, None, 22, {})


@pytest.mark.parametrize("address, expected", [
    ("10.0.0.1", "0A000001"), ("127.0.1.1", "7F000101"), ("192.168.1.254", "C0A801FE"),
    ("255.255.255.255", "FFFFFFFF"), ("0.0.0.0", "00000000")])
def test_ip_hex_is_eight_uppercase_hex_digits(address, expected):
    assert naming.profile_name(_node(address), "ip_hex") == expected


def test_ip_naming_is_the_dotted_address():
    assert naming.profile_name(_node("192.168.1.254"), "ip") == "192.168.1.254"


@pytest.mark.parametrize("mac", ["02:00:7f:00:01:01", "02:00:7F:00:01:01", "02-00-7f-00-01-01"])
def test_mac_naming_is_01_then_lowercase_dashed(mac):
    assert naming.profile_name(_node(mac=mac), "mac") == "01-02-00-7f-00-01-01"


def test_hostname_namings():
    assert naming.profile_name(_node(), "hostname") == "node-1.site.example"
    assert naming.profile_name(_node(), "hostname_short") == "node-1"
    assert naming.profile_name(_node(name="node-9"), "hostname_short") == "node-9"


def test_layout_of_each_method():
    assert naming.profile_path("pxelinux", "7F000101") == "pxelinux.cfg/7F000101"
    assert naming.profile_path("ipxe", "7F000101") == "ipxe/7F000101"
    assert naming.profile_path("grub", "01-02-00-7f-00-01-01") == "grub/grub.cfg-01-02-00-7f-00-01-01"


@pytest.mark.parametrize("naming_, node, message", [
    ("ip_hex", _node("node-1.example"), "is not an IPv4 address"),
    ("ip", _node("fe80::1"), "is not an IPv4 address"),
    ("mac", _node(mac=None), "no MAC address known"),
    ("mac", _node(mac="02:00:7f:00:01"), "invalid MAC address"),
])
def test_naming_errors_are_clear(naming_, node, message):
    with pytest.raises(UsageError, match=message):
        naming.profile_name(node, naming_)


def test_written_files_follow_the_cluster_naming(tmp_path):
    config = _config(tmp_path, naming="mac")
    records = _set(config, pxe.Request("deploy"), "node-1", "node-3.site.example")
    assert [r["pxe_files"] for r in records] == [["pxelinux.cfg/01-02-00-7f-00-01-01"],
                                                 ["pxelinux.cfg/01-02-00-7f-00-01-03"]]


# ---------------------------------------------------------------- the record stream

def test_ko_records_pass_through_unchanged_and_at_once(tmp_path):
    config = _config(tmp_path)
    ko = {"node": "node-2", "status": "ko", "error": "earlier", "extra": 1,
          "history": [{"step": "x", "status": "ko", "error": "earlier"}]}
    read = []

    def items():
        for record in (ko, {"node": "node-1", "status": "ok", "keep": "me"}):
            read.append(record["node"])
            yield dict(record)

    out = pxe.set_profiles(config, pxe.Request("deploy"), items())
    assert next(out) == ko and read == ["node-2"]  # emitted before the next is read
    [ok] = list(out)
    assert ok["status"] == "ok" and ok["keep"] == "me" and ok["profile"] == "deploy"
    assert ok["history"][-1]["step"] == "pxe" and ok["history"][-1]["status"] == "ok"
    assert _tree(config) == ["pxelinux.cfg/7F000101"]


def test_history_is_appended_not_replaced(tmp_path):
    config = _config(tmp_path)
    record = {"node": "node-1", "status": "ok", "history": [{"step": "reboot", "status": "ok"}]}
    [out] = pxe.set_profiles(config, pxe.Request("local"), [record])
    assert [h["step"] for h in out["history"]] == ["reboot", "pxe"]


# ---------------------------------------------------------------- bad input: no file written

def test_unknown_node_is_ko_and_writes_nothing(tmp_path):
    config = _config(tmp_path)
    [record] = _set(config, pxe.Request("deploy"), "ghost-1")
    assert record["status"] == "ko" and "unknown node 'ghost-1'" in record["error"]
    assert _tree(config) == []


def test_no_mac_known_with_mac_naming_is_ko_and_writes_nothing(tmp_path):
    config = _config(tmp_path, naming="mac", method="grub")
    records = _set(config, pxe.Request("deploy"), "node-2", "node-1")
    assert records[0]["status"] == "ko" and "no MAC address known" in records[0]["error"]
    assert records[1]["status"] == "ok"
    assert _tree(config) == ["grub/grub.cfg-01-02-00-7f-00-01-01"]


def test_unknown_placeholder_fails_before_any_record_is_read(tmp_path):
    config = _config(tmp_path)
    template = tmp_path / "bad.tmpl"
    template.write_text("DEFAULT x\nLABEL x\n  KERNEL {{ kernel }}\n  APPEND {{ colour }}\n")
    with pytest.raises(UsageError, match=r"bad.tmpl:4: unknown placeholder \{\{ colour \}\}"):
        pxe.custom_request(template)
    assert _tree(config) == []


@pytest.mark.parametrize("text", ["KERNEL {{ kernel }\n", "KERNEL {{ }}\n", "{{ node }} {{\n"])
def test_unclosed_placeholder_is_an_error(text):
    with pytest.raises(UsageError, match="without a placeholder name"):
        templates.parse(text, "t.tmpl", templates.NODE_VALUES)


def test_builtin_only_placeholders_are_refused_in_custom_templates(tmp_path):
    template = tmp_path / "t.tmpl"
    template.write_text("APPEND {{ target_file }}\n")
    with pytest.raises(UsageError, match="unknown placeholder"):
        pxe.custom_request(template)


def test_custom_template_needing_a_missing_mac_is_ko_for_that_node_only(tmp_path):
    config = _config(tmp_path)
    template = tmp_path / "t.tmpl"
    template.write_text("# {{ node }} {{ mac }}\n")
    records = _set(config, pxe.custom_request(template), "node-1", "node-2")
    assert [r["status"] for r in records] == ["ok", "ko"]
    assert "no MAC address known" in records[1]["error"]
    assert _tree(config) == ["pxelinux.cfg/7F000101"]


def test_ipxe_alone_cannot_boot_a_partition(tmp_path):
    config = _config(tmp_path, method="ipxe")
    [record] = _set(config, pxe.Request("local", partition=3), "node-1")
    assert record["status"] == "ko" and "iPXE cannot boot partition 3" in record["error"]
    assert _tree(config) == []
    [record] = _set(config, pxe.Request("local", partition=pxe.DISK), "node-1")
    assert record["status"] == "ok"


def test_broken_override_template_is_a_config_error_before_writing(tmp_path):
    config = _config(tmp_path)
    (config.dir / "pxe-templates").mkdir()
    (config.dir / "pxe-templates" / "pxelinux-boot.tmpl").write_text("KERNEL {{ kernal }}\n")
    with pytest.raises(ConfigError, match="unknown placeholder"):
        pxe.set_profiles(config, pxe.Request("deploy"), iter(()))
    assert _tree(config) == []


def test_params_with_a_line_break_are_refused(tmp_path):
    config = _config(tmp_path)
    request = pxe.Request("netboot", kernel="k", params="quiet\nKERNEL evil")
    [record] = _set(config, request, "node-1")
    assert record["status"] == "ko" and "line break" in record["error"]
    assert _tree(config) == []


# ---------------------------------------------------------------- templates and files

def test_override_template_from_the_config_directory(tmp_path):
    config = _config(tmp_path)
    (config.dir / "pxe-templates").mkdir()
    (config.dir / "pxe-templates" / "pxelinux-local.tmpl").write_text(
        "DEFAULT site\nLABEL site\n  LOCALBOOT 0\n# {{ node }} {{ local_target }}\n")
    _set(config, pxe.Request("local"), "node-1")
    text = (config.server.pxe_root / "pxelinux.cfg" / "7F000101").read_text()
    assert "LOCALBOOT 0" in text and "# node-1 hd0 3" in text


def test_absent_values_drop_their_line(tmp_path):
    config = _config(tmp_path)  # no header configured for pxelinux in this cluster
    _set(config, pxe.Request("netboot", kernel="kabin-cache/k"), "node-1")
    text = (config.server.pxe_root / "pxelinux.cfg" / "7F000101").read_text()
    assert "INITRD" not in text and "KERNEL kabin-cache/k" in text
    assert text.splitlines()[1] == "DEFAULT kabin"  # no empty header line


def test_files_are_readable_by_the_tftp_server_and_no_temporary_is_left(tmp_path):
    config = _config(tmp_path, method="ipxe", local_method="pxelinux")
    _set(config, pxe.Request("local"), "node-1", "node-3.site.example")
    root = config.server.pxe_root
    for path in _tree(config):
        assert (root / path).stat().st_mode & 0o777 == 0o644
        assert not path.rsplit("/", 1)[-1].startswith(".")


def test_a_reader_sees_the_old_or_the_new_profile_never_a_mix(tmp_path):
    """A node reading its file while it is rewritten gets one whole version."""
    config = _config(tmp_path)
    writer_local = pxe.ProfileWriter(config, pxe.Request("local"))
    writer_deploy = pxe.ProfileWriter(config, pxe.Request("deploy"))
    writer_local.apply("node-1")
    path = config.server.pxe_root / "pxelinux.cfg" / "7F000101"
    versions = {path.read_text()}
    writer_deploy.apply("node-1")
    versions.add(path.read_text())
    seen, stop = set(), threading.Event()

    def read():
        while not stop.is_set():
            seen.add(path.read_text())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(300):
            writer_local.apply("node-1")
            writer_deploy.apply("node-1")
    finally:
        stop.set()
        reader.join(timeout=30)
    assert seen and seen <= versions


def test_changing_profile_removes_what_the_old_one_left_for_other_loaders(tmp_path):
    config = _config(tmp_path, method="ipxe", local_method="grub", naming="mac")
    _set(config, pxe.Request("local"), "node-1")
    assert _tree(config) == ["grub/grub.cfg-01-02-00-7f-00-01-01", "ipxe/01-02-00-7f-00-01-01",
                             "ipxe/boot.ipxe"]
    _set(config, pxe.Request("deploy"), "node-1")
    assert _tree(config) == ["ipxe/01-02-00-7f-00-01-01", "ipxe/boot.ipxe"]


def test_chain_writes_the_local_loader_file_before_the_entry(tmp_path):
    config = _config(tmp_path, method="grub", local_method="pxelinux")
    writer = pxe.ProfileWriter(config, pxe.Request("local", partition=2))
    _, files = writer.plan("node-1")
    assert [path for path, _ in files] == ["pxelinux.cfg/7F000101", "grub/grub.cfg-7F000101"]
    assert "set 209:string pxelinux.cfg/7F000101" in files[1][1]


def test_one_dispatcher_serves_every_naming_in_use(tmp_path):
    config = make_config(tmp_path, {
        "a": {"pxe": {"method": "grub", "naming": "ip"}, "nodes": [NODES[0]]},
        "b": {"pxe": {"method": "grub", "naming": "hostname"}, "nodes": [NODES[1]]},
        "c": {"pxe": {"method": "grub", "naming": "mac"}, "nodes": [NODES[2]]}})
    _set(config, pxe.Request("deploy"), "node-1")
    dispatcher = (config.server.pxe_root / "grub" / "grub.cfg").read_text()
    assert "configfile $prefix/grub.cfg-${net_default_ip}\n" in dispatcher
    assert "configfile $prefix/grub.cfg-${net_pxe_hostname}\n" in dispatcher
    assert "naming=ip,hostname" in dispatcher  # mac: GRUB finds grub.cfg-01-<mac> itself


def test_deploy_kernel_outside_the_pxe_tree_is_a_config_error(tmp_path):
    config = make_config(tmp_path, {"c": {"pxe": {"method": "grub"}, "nodes": NODES,
                                          "deploy": {"vmlinuz": "/boot/vmlinuz"}}})
    with pytest.raises(ConfigError, match="outside pxe_root"):
        pxe.set_profiles(config, pxe.Request("deploy"), iter(()))


# ---------------------------------------------------------------- show and clear

def test_show_reports_the_profile_and_clear_removes_every_file(tmp_path):
    config = _config(tmp_path, method="ipxe", local_method="pxelinux")
    _set(config, pxe.Request("local", partition=2), "node-1")
    items = [{"node": "node-1", "status": "ok"}, {"node": "node-2", "status": "ok"}]
    shown = list(pxe.show_profiles(config, items, content=True))
    assert shown[0]["profile"] == "local"
    assert shown[0]["pxe"] == {"profile": "local", "partition": "2", "chain": "pxelinux"}
    assert sorted(shown[0]["pxe_content"]) == ["ipxe/7F000101", "pxelinux.cfg/7F000101"]
    assert shown[1]["profile"] is None and shown[1]["pxe_files"] == []
    cleared = list(pxe.clear_profiles(config, items))
    assert sorted(cleared[0]["pxe_files"]) == ["ipxe/7F000101", "pxelinux.cfg/7F000101"]
    assert _tree(config) == []


def test_show_of_a_file_not_written_by_ka_pxe(tmp_path):
    config = _config(tmp_path)
    path = config.server.pxe_root / "pxelinux.cfg" / "7F000101"
    path.parent.mkdir(parents=True)
    path.write_text("DEFAULT local\n")
    [record] = pxe.show_profiles(config, [{"node": "node-1", "status": "ok"}])
    assert record["profile"] == "unknown" and record["pxe_files"] == ["pxelinux.cfg/7F000101"]


# ---------------------------------------------------------------- the command

def ka_pxe(config, *args, stdin=""):
    return subprocess.run([sys.executable, "-c", "from kabin.cli.pxe import main; main()", *args,
                           "--config", str(config.dir)], input=stdin, capture_output=True,
                          text=True, timeout=60, check=False)


def test_cli_set_reads_records_and_passes_ko_on(tmp_path):
    config = _config(tmp_path)
    stdin = ('{"node": "node-2", "status": "ko", "error": "down"}\n'
             "node-1\n"
             '{"node": "ghost", "status": "ok"}\n')
    done = ka_pxe(config, "set", "deploy", "-q", stdin=stdin)
    out = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 1, done.stderr
    assert [(r["node"], r["status"]) for r in out] == [("node-2", "ko"), ("node-1", "ok"),
                                                       ("ghost", "ko")]
    assert out[0] == {"node": "node-2", "status": "ko", "error": "down"}
    assert _tree(config) == ["pxelinux.cfg/7F000101"]


def test_cli_template_error_exits_2_and_writes_nothing(tmp_path):
    config = _config(tmp_path)
    template = tmp_path / "bad.tmpl"
    template.write_text("KERNEL {{ kernel }} {{ nope }}\n")
    done = ka_pxe(config, "set", "custom", "--template", str(template), "-m", "node-1")
    assert done.returncode == 2 and done.stdout == ""
    assert "ka-pxe: error:" in done.stderr and "unknown placeholder {{ nope }}" in done.stderr
    assert _tree(config) == []


def test_cli_local_partition_option(tmp_path):
    config = _config(tmp_path)
    done = ka_pxe(config, "set", "local", "--partition", "disk", "-m", "node-1", "-q")
    assert done.returncode == 0, done.stderr
    assert (config.server.pxe_root / "pxelinux.cfg" / "7F000101").read_text().endswith(
        "APPEND hd0\n")
    done = ka_pxe(config, "set", "local", "--partition", "0", "-m", "node-1")
    assert done.returncode == 2 and "expected a partition number" in done.stderr


def test_cli_show_and_clear(tmp_path):
    config = _config(tmp_path)
    assert ka_pxe(config, "set", "deploy", "-m", "node-1", "-q").returncode == 0
    shown = json.loads(ka_pxe(config, "show", "-m", "node-1").stdout)
    assert shown["profile"] == "deploy" and shown["pxe_files"] == ["pxelinux.cfg/7F000101"]
    cleared = json.loads(ka_pxe(config, "clear", "-m", "node-1").stdout)
    assert cleared["pxe_files"] == ["pxelinux.cfg/7F000101"] and _tree(config) == []


def test_cli_netboot_needs_env_or_kernel(tmp_path):
    config = _config(tmp_path)
    done = ka_pxe(config, "set", "netboot", "-m", "node-1")
    assert done.returncode == 2 and "either --env NAME or --kernel FILE" in done.stderr


def test_help_does_not_import_the_heavy_modules():
    code = ("import sys; from kabin.cli.pxe import main\n"
            "try:\n    main(['set', 'netboot', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('paramiko', 'pyghmi', 'tabulate', 'kabin.envs', 'sqlite3')"
            " if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False, env={**os.environ, "KABIN_CONFIG": "/nonexistent"})
    assert done.stdout.strip().splitlines()[-1] == "[]"
