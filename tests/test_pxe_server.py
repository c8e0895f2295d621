"""ka-pxe install-loaders and dhcp-config: the boot server's files, made by kabin.

The loaders are Debian's real files, copied into a real tree; the DHCP fragment is
checked by dnsmasq itself (``dnsmasq --test``). Booting from them is the VM tier's
test (test_vm_tier.py).
"""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from qemu.cluster import make_config

from kabin.pxe import dhcp, loaders

CLUSTERS = {
    "pxl": {"pxe": {"method": "pxelinux", "naming": "ip_hex"},
            "nodes": [("pxl-1", "10.9.0.1", "52:54:00:00:09:01")]},
    "grub": {"pxe": {"method": "grub", "naming": "mac"},
             "nodes": [("grub-1", "10.9.0.2", "52:54:00:00:09:02"),
                       ("grub-2", "10.9.0.3", "52:54:00:00:09:03")]},
    "ipxe": {"pxe": {"method": "ipxe", "local_method": "grub", "naming": "hostname"},
             "nodes": [("ipxe-1", "10.9.0.4", "52:54:00:00:09:04")]},
}


def ka_pxe(config, *args):
    cmd = [sys.executable, "-c", "from kabin.cli.pxe import main; main()", *args,
           "--config", str(config.dir)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


def _tree_digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture
def config(tmp_path):
    return make_config(tmp_path, CLUSTERS)


needs_loaders = pytest.mark.skipif(
    not (Path("/usr/lib/PXELINUX/pxelinux.0").exists() and shutil.which("grub-mknetdir")
         and Path("/usr/lib/grub/x86_64-efi").is_dir() and Path("/usr/lib/ipxe/ipxe.efi")
         .exists()), reason="the loaders' Debian packages are not installed (.ci/setup)")


@needs_loaders
def test_install_loaders_copies_every_method_and_is_idempotent(config):
    root = config.server.pxe_root
    done = ka_pxe(config, "install-loaders", "--format", "json")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    installed = {(r["method"], r["firmware"]) for r in rows}
    assert ("pxelinux", "uefi") not in installed            # BIOS only
    assert {r["file"] for r in rows if r["method"] == "pxelinux"} == \
        {"pxelinux.0", "ldlinux.c32", "chain.c32", "libcom32.c32", "libutil.c32"}
    for (method, firmware) in [("grub", "bios"), ("grub", "uefi"), ("ipxe", "bios"),
                               ("ipxe", "uefi")]:
        assert (root / loaders.boot_file(method, firmware)).is_file()
    assert (root / "chain.c32").is_file() and (root / "ipxe.lkrn").is_file()
    assert (root / "grub" / "x86_64-efi" / "efinet.mod").is_file()
    assert (root / "pxelinux.0").read_bytes() == Path("/usr/lib/PXELINUX/pxelinux.0").read_bytes()
    assert {r["action"] for r in rows} == {"installed"}
    before = _tree_digest(root)
    again = ka_pxe(config, "install-loaders", "--format", "json")
    assert again.returncode == 0, again.stderr
    assert {json.loads(line)["action"] for line in again.stdout.splitlines()} == {"unchanged"}
    assert _tree_digest(root) == before


@needs_loaders
def test_install_loaders_replaces_a_damaged_file_and_only_it(config):
    root = config.server.pxe_root
    assert ka_pxe(config, "install-loaders", "--method", "ipxe").returncode == 0
    (root / "ipxe.efi").write_bytes(b"truncated")
    done = ka_pxe(config, "install-loaders", "--method", "ipxe", "--format", "json")
    actions = {json.loads(line)["file"]: json.loads(line)["action"]
               for line in done.stdout.splitlines()}
    assert actions == {"undionly.kpxe": "unchanged", "ipxe.lkrn": "unchanged",
                       "ipxe.efi": "installed"}
    assert (root / "ipxe.efi").read_bytes() == Path("/usr/lib/ipxe/ipxe.efi").read_bytes()


def test_install_loaders_names_what_is_missing_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(loaders._COPIES, ("ipxe", "uefi"),
                        [("ipxe.efi", str(tmp_path / "absent.efi"), "ipxe")])
    with pytest.raises(Exception) as caught:
        loaders.install(tmp_path / "tree", ["ipxe"])
    assert "absent.efi" in str(caught.value) and "apt-get install ipxe" in str(caught.value)
    assert not (tmp_path / "tree").exists()


def test_dhcp_config_gives_each_client_its_method_and_firmware_loader(config):
    text = dhcp.render(config, "dnsmasq")
    hosts = [line for line in text.splitlines() if line.startswith("dhcp-host=")]
    assert len(hosts) == 4
    assert "dhcp-host=52:54:00:00:09:02,set:kabin-boot2,10.9.0.2,grub-1" in hosts
    boots = [line for line in text.splitlines() if line.startswith("dhcp-boot=")]
    assert boots == [
        "dhcp-boot=tag:kabin-boot1,tag:!kabin-efi,pxelinux.0",
        "dhcp-boot=tag:kabin-boot2,tag:!kabin-efi,grub/i386-pc/core.0",
        "dhcp-boot=tag:kabin-boot2,tag:kabin-efi,grub/x86_64-efi/core.efi",
        "dhcp-boot=tag:kabin-boot3,tag:kabin-ipxe,ipxe/ipxe-1",
        "dhcp-boot=tag:kabin-boot3,tag:!kabin-ipxe,tag:!kabin-efi,undionly.kpxe",
        "dhcp-boot=tag:kabin-boot3,tag:!kabin-ipxe,tag:kabin-efi,ipxe.efi",
    ]
    assert "dhcp-match=set:kabin-efi,option:client-arch,7" in text
    assert "dhcp-match=set:kabin-ipxe,175" in text


@pytest.mark.skipif(shutil.which("dnsmasq", path="/usr/sbin:/usr/bin") is None,
                    reason="dnsmasq is not installed (.ci/setup)")
def test_dnsmasq_accepts_the_fragment(config, tmp_path):
    out = tmp_path / "hosts.conf"
    done = ka_pxe(config, "dhcp-config", "-o", str(out), "--server", "10.9.0.254")
    assert done.returncode == 0 and done.stdout == "", done.stderr
    assert "dhcp-boot=tag:kabin-boot1,tag:!kabin-efi,pxelinux.0,,10.9.0.254" in out.read_text()
    main = tmp_path / "dnsmasq.conf"
    main.write_text(f"port=0\ndhcp-range=10.9.0.0,static\nconf-file={out}\n")
    check = subprocess.run(["dnsmasq", "--test", f"--conf-file={main}"], capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    assert "syntax check OK" in check.stderr


def test_isc_fragment_has_one_host_block_per_node(config):
    done = ka_pxe(config, "dhcp-config", "--format", "isc", "-m", "grub-1,ipxe-1")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert text.count("host ") == 2
    assert "option kabin-client-arch code 93 = unsigned integer 16;" in text
    assert ('  if exists user-class and option user-class = "iPXE" { filename "ipxe/ipxe-1"; }'
            in text)
    assert '  else { filename "grub/i386-pc/core.0"; }' in text
    assert "fixed-address 10.9.0.4;" in text


def test_dhcp_config_refuses_a_node_without_mac(tmp_path):
    clusters = {"c": {"pxe": {"method": "grub"}, "nodes": [("a-1", "10.9.0.9", None)]}}
    cfg = make_config(tmp_path, clusters)
    done = ka_pxe(cfg, "dhcp-config")
    assert done.returncode == 2
    assert done.stderr.strip() == ("ka-pxe: error: no MAC address in clusters.yml for a-1: "
                                   "a fixed DHCP entry needs one")
    assert done.stdout == ""
