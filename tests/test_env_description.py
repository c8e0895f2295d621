"""Kadeploy3 environment descriptions: loading unchanged, normalizing, one clear error each."""

from pathlib import Path

import pytest
import yaml

from kabin import envdesc
from kabin.envdesc import InvalidDescription

DATA = Path(__file__).parent / "data"

VALID = """
name: tiny
version: 2
os: linux
image: {file: /srv/tiny.tgz, kind: tar, compression: gzip}
boot: {kernel: /vmlinuz, initrd: /initrd.img}
filesystem: ext4
partition_type: 131
"""


def test_the_kadeploy3_sample_loads_unchanged():
    desc = envdesc.load_file(DATA / "wheezy-min.yml")
    original = yaml.safe_load((DATA / "wheezy-min.yml").read_text())
    assert desc == original  # every field kept as written, nothing added or lost


def test_a_grid5000_description_with_server_files_and_postinstalls():
    desc = envdesc.load_file(DATA / "debian10-x64-min.yml")
    assert desc["image"]["file"] == "server:///grid5000/images/debian10-x64-min-2021012715.tgz"
    assert desc["partition_type"] == 0x83
    assert desc["postinstalls"][0]["script"].startswith("g5k-postinstall")
    assert envdesc.local_path(desc["image"]["file"]) == \
        "/grid5000/images/debian10-x64-min-2021012715.tgz"
    assert envdesc.file_locations(desc) == [
        ("image", desc["image"]["file"]),
        ("postinstalls[0]", "server:///grid5000/postinstalls/g5k-postinstall.tgz")]


def test_defaults_are_filled_in():
    desc = envdesc.parse_text(VALID, "t.yml")
    assert (desc["visibility"], desc["destructive"], desc["multipart"]) == ("private", False,
                                                                            False)


@pytest.mark.parametrize("sample", ["wheezy-min", "debian10-x64-min", "dd-multipart"])
def test_dump_loads_back_identical(sample):
    desc = envdesc.load_file(DATA / f"{sample}.yml")
    assert envdesc.parse_text(envdesc.dump(desc), "again.yml") == desc


def test_zstd_is_accepted_for_tar_and_dd():
    for kind in ("tar", "dd"):
        text = VALID.replace("kind: tar, compression: gzip", f"kind: {kind}, compression: zstd")
        assert envdesc.parse_text(text, "t.yml")["image"]["compression"] == "zstd"


def test_relative_files_are_relative_to_the_description(tmp_path):
    (tmp_path / "d.yml").write_text(VALID.replace("/srv/tiny.tgz", "images/tiny.tgz"))
    assert envdesc.load_file(tmp_path / "d.yml")["image"]["file"] == \
        str(tmp_path / "images/tiny.tgz")


INVALID = {
    "missing name": (VALID.replace("name: tiny\n", ""), "field 'name': is required"),
    "bad kind": (VALID.replace("kind: tar", "kind: zip"),
                 "field 'image.kind': expected one of tar, dd, fsa, got 'zip'"),
    "bad compression": (VALID.replace("compression: gzip", "compression: lz4"),
                        "field 'image.compression': expected one of gzip, bzip2, xz, zstd, "
                        "got 'lz4'"),
    "tar without kernel": (VALID.replace("kernel: /vmlinuz, ", ""),
                           "field 'boot.kernel': is required for a tar image"),
    "tar without filesystem": (VALID.replace("filesystem: ext4\n", ""),
                               "field 'filesystem': is required for a tar image"),
    "bad partition_type": (VALID.replace("partition_type: 131", "partition_type: 0x1ff"),
                           "field 'partition_type': expected a partition type number 0-255"),
    "bad partition_type text": (VALID.replace("partition_type: 131", "partition_type: linux"),
                                "field 'partition_type': expected a partition type number"),
    "unknown field": (VALID + "kernel_parms: quiet\n", "field 'kernel_parms': unknown field"),
    "unknown nested field": (VALID.replace("initrd:", "initramfs:"),
                             "field 'boot.initramfs': unknown field"),
    "bad version": (VALID.replace("version: 2", "version: two"),
                    "field 'version': expected an integer, got 'two'"),
    "bad visibility": (VALID + "visibility: everyone\n",
                       "field 'visibility': expected one of private, shared, public"),
    "missing image": (VALID.replace("image: {file: /srv/tiny.tgz, kind: tar, compression: gzip}",
                                    ""), "field 'image': is required"),
    "ftp file": (VALID.replace("/srv/tiny.tgz", "ftp://host/tiny.tgz"),
                 "field 'image.file': unsupported location"),
    "fsa level": (VALID.replace("kind: tar, compression: gzip", "kind: fsa, compression: 12"),
                  "field 'image.compression': expected one of 0, 1, 2"),
    "multipart without partitions": (VALID + "multipart: true\n",
                                     "field 'options.partitions': is required when multipart"),
    "name with @": (VALID.replace("name: tiny", "name: ti@ny"), "field 'name': invalid name"),
    "not a mapping": ("- a\n- list\n", "expected a mapping"),
    "broken YAML": ("name: [tiny\n", "invalid YAML"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_each_invalid_description_has_its_own_clear_error(case):
    text, expected = INVALID[case]
    with pytest.raises(InvalidDescription) as info:
        envdesc.parse_text(text, "bad.yml")
    assert str(info.value).startswith("bad.yml: ")
    assert expected in str(info.value)
