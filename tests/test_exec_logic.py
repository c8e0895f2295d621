"""Pure logic of kabin.exec: jobs, sends, KADEPLOY_* variables, the gathered view.

The script wrapper is run by a real local shell (no SSH needed to check it).
"""

import subprocess

import pytest

from kabin import exec as exec_mod
from kabin import records
from kabin.errors import UsageError

from test_reboot_logic import write_config


@pytest.fixture
def cfg(tmp_path):
    return write_config(tmp_path / "etc")


def test_send_parse(tmp_path):
    src = tmp_path / "motd"
    src.write_text("hello\n")
    src.chmod(0o640)
    send = exec_mod.Send.parse(f"{src}:/etc/motd")
    assert (send.source, send.dest, send.mode) == (src, "/etc/motd", 0o640)
    assert exec_mod.Send.parse(f"{src}:/etc/").dest == "/etc/motd"
    for bad in ("nocolon", f"{src}:relative/path", f"{tmp_path}/missing:/x", f"{tmp_path}:/x"):
        with pytest.raises(UsageError):
            exec_mod.Send.parse(bad)


def test_job_needs_exactly_one_thing_to_do():
    with pytest.raises(UsageError, match="nothing to do"):
        exec_mod.Options()
    with pytest.raises(UsageError, match="not both"):
        exec_mod.Options(command="true", script=b"true")
    with pytest.raises(UsageError):
        exec_mod.Options(command="true", timeout=0)
    assert exec_mod.Options(command="uname -r").remote_command("/tmp") == "uname -r"


def test_script_wrapper_runs_the_script_with_its_arguments_and_cleans_up(tmp_path):
    job = exec_mod.Options(script=b"#!/bin/sh\necho \"$# [$1] [$2]\"\nexit 3\n",
                       script_args=("a b", "$(touch pwned)"))
    command = job.remote_command(str(tmp_path))
    done = subprocess.run(["sh", "-c", command], input=job.script, capture_output=True,
                          cwd=tmp_path, timeout=10)
    assert done.returncode == 3
    assert done.stdout == b"2 [a b] [$(touch pwned)]\n"
    assert list(tmp_path.iterdir()) == [], "the temporary script is removed, nothing injected"


def test_kadeploy_env_from_the_config(cfg):
    env = exec_mod.kadeploy_env(cfg, records.new("c-2"))
    assert env == {
        "KADEPLOY_CLUSTER": "c",
        "KADEPLOY_BLOCK_DEVICE": "/dev/sda",
        "KADEPLOY_DEPLOY_PART_NUM": 3,
        "KADEPLOY_DEPLOY_PART": "/dev/sda3",
        "KADEPLOY_ENV_EXTRACTION_DIR": "/mnt/dest",
        "KADEPLOY_TMP_DIR": "/tmp",
        "KADEPLOY_PREPOST_EXTRACTION_DIR": "/tmp/kabin-prepost",
        "KADEPLOY_PART_LABEL": "dos",
        "KADEPLOY_BOOTLOADER": "grub",
    }


def test_kadeploy_env_from_the_record(cfg):
    desc = {"name": "debian12", "version": 2, "os": "linux", "filesystem": "ext4",
            "partition_type": 0x83,
            "boot": {"kernel": "/vmlinuz", "initrd": "/initrd.img", "kernel_params": "quiet"}}
    record = dict(records.new("c-2"), env=desc, block_device="/dev/nvme0n1", deploy_partition=5)
    env = exec_mod.kadeploy_env(cfg, record)
    assert env["KADEPLOY_ENV"] == "debian12"
    assert env["KADEPLOY_DEPLOY_PART"] == "/dev/nvme0n1p5"
    assert env["KADEPLOY_ENV_KERNEL"] == "/vmlinuz"
    assert env["KADEPLOY_ENV_INITRD"] == "/initrd.img"
    assert env["KADEPLOY_ENV_KERNEL_PARAMS"] == "quiet"
    assert env["KADEPLOY_OS_KIND"] == "linux"
    assert env["KADEPLOY_FS_TYPE"] == "ext4"
    assert env["KADEPLOY_PART_TYPE"] == "83"
    named = exec_mod.kadeploy_env(cfg, dict(records.new("c-2"), env="debian12@2"))
    assert named["KADEPLOY_ENV"] == "debian12" and "KADEPLOY_ENV_KERNEL" not in named


def test_gather_folds_identical_results():
    def ran(node, rc, out, err=""):
        record = records.new(node)
        fields = {"rc": rc, "stdout": out, "stderr": err}
        if rc == 0:
            return records.ok(record, "exec", 0.1, **fields)
        return records.ko(record, "exec", f"exit code {rc}", 0.1, **fields)

    done = [ran("n1", 0, "a\n"), ran("n3", 0, "a\n"), ran("n2", 0, "a\n"), ran("n4", 0, "b\n"),
            ran("n5", 1, "", "boom\n"), ran("n6", 1, "", "boom\n"),
            records.ko(records.new("n7"), "exec", "ssh to 10.0.0.7:22 failed: connection refused")]
    groups = exec_mod.gather(done)
    assert [(g.nodeset, g.status, g.stdout) for g in groups] == [
        ("n[1-3]", "ok", "a\n"), ("n4", "ok", "b\n"), ("n[5-6]", "ko", ""), ("n7", "ko", "")]
    assert groups[2].error == "exit code 1" and groups[2].stderr == "boom\n"
    assert groups[3].error.startswith("ssh to") and groups[3].rc is None
