"""Golden files: every method x profile, every chainload and the dispatchers, byte for byte.

Regenerate after an intended change with ``KABIN_REGEN_GOLDEN=1 pytest tests/test_pxe_golden.py``
and review the diff: these are the files real firmware reads (tests/test_pxe_qemu.py
boots them).
"""

import os
from pathlib import Path

import pytest
from qemu.cluster import make_config

from kabin import pxe

GOLDEN = Path(__file__).parent / "golden" / "pxe"
METHODS = ("pxelinux", "ipxe", "grub")
HEADERS = {"pxelinux": "SERIAL 0 115200\nPROMPT 0\n", "ipxe": "console --x 1024 --y 768\n",
           "grub": "serial --unit=0 --speed=115200\nterminal_output serial console\n"}
NODE = ("node-1.site.example", "127.0.1.1", "02:00:7F:00:01:01")
CUSTOM = """{{ header }}
# node={{ node }} short={{ short }} cluster={{ cluster }} name={{ name }}
# ip={{ ip }} ip_hex={{ ip_hex }} mac={{ mac }}
# kernel={{ kernel }} initrd={{ initrd }} params={{ params }}
# user_params={{ user_params }} deploy_partition={{ deploy_partition }}
"""
NETBOOT = {"kernel": "kabin-cache/0123456789abcdef01234567-vmlinuz-6.1",
           "initrd": "kabin-cache/89abcdef0123456789abcdef-initrd.img-6.1",
           "params": "root=/dev/sda3 ro", "stamp": {"env": "debian12@2"}}


def _cases():
    cases = {}
    for method in METHODS:
        pxe_conf = {"method": method, "naming": "ip_hex"}
        cases[f"{method}-deploy"] = (pxe_conf, ("deploy", {}))
        cases[f"{method}-netboot"] = (pxe_conf, ("netboot", NETBOOT))
        cases[f"{method}-custom"] = (pxe_conf, ("custom", {}))
        cases[f"{method}-local-disk"] = (pxe_conf, ("local", {"partition": pxe.DISK}))
        if method != "ipxe":  # iPXE boots no partition by itself (see test_pxe.py)
            cases[f"{method}-local"] = (pxe_conf, ("local", {}))
        for local in METHODS:
            if local != method:
                partition = pxe.DISK if local == "ipxe" else 2
                cases[f"chain-{method}-{local}"] = (
                    {"method": method, "local_method": local, "naming": "mac"},
                    ("local", {"partition": partition}))
    for method, naming in (("grub", "ip"), ("grub", "hostname_short"), ("ipxe", "hostname"),
                           ("ipxe", "mac"), ("pxelinux", "hostname")):
        cases[f"{method}-{naming}-deploy"] = ({"method": method, "naming": naming},
                                              ("deploy", {}))
    return cases


CASES = _cases()


def _render(tmp_path, pxe_conf, profile, args):
    config = make_config(tmp_path, {"c": {"pxe": {**pxe_conf, "headers": HEADERS},
                                          "nodes": [NODE], "user_params": "console=ttyS0"}})
    if profile == "custom":
        shebang = "#!ipxe\n" if pxe_conf["method"] == "ipxe" else ""
        (tmp_path / "custom.tmpl").write_text(shebang + CUSTOM)
        request = pxe.custom_request(tmp_path / "custom.tmpl")
    else:
        request = pxe.Request(profile, **args)
    [record] = pxe.set_profiles(config, request, [{"node": NODE[0], "status": "ok"}])
    assert record["status"] == "ok", record
    root = config.server.pxe_root
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return "".join(f"==> {p.relative_to(root)} <==\n{p.read_text()}" for p in files)


@pytest.mark.parametrize("case", sorted(CASES))
def test_profile_matches_golden(tmp_path, case):
    pxe_conf, (profile, args) = CASES[case]
    text = _render(tmp_path, pxe_conf, profile, args)
    golden = GOLDEN / case
    if os.environ.get("KABIN_REGEN_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text(), f"{case}: see {golden} (KABIN_REGEN_GOLDEN=1 to update)"


def test_every_golden_file_is_a_case():
    assert sorted(p.name for p in GOLDEN.iterdir()) == sorted(CASES)
