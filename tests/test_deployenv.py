"""The deployment environment's parts: module order, the cpio archive, what the initramfs holds.

Booting it is the VM tier's test (test_vm_tier.py, test_vm_deploy.py).
"""

import gzip
import shutil
import subprocess
from pathlib import Path

import pytest

from kabin import deployenv
from kabin.deployenv import kernel
from kabin.deployenv.initramfs import Archive


def _module(path, depends):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF...\0license=GPL\0depends=" + depends.encode() + b"\0name=x\0")


def test_modules_load_after_what_they_need(tmp_path):
    _module(tmp_path / "kernel/net/virtio_net.ko", "net_failover,virtio")
    _module(tmp_path / "kernel/net/net_failover.ko", "failover")
    _module(tmp_path / "kernel/net/failover.ko", "")
    _module(tmp_path / "kernel/virtio/virtio.ko", "")
    _module(tmp_path / "kernel/fs/ext4.ko", "jbd2,crc16")
    _module(tmp_path / "kernel/fs/jbd2.ko", "")
    _module(tmp_path / "kernel/lib/crc16.ko", "")
    order = kernel.module_files(tmp_path, ("virtio_net", "ext4", "built_in_one"))
    names = [Path(p).stem for p in order]
    assert names == ["failover", "net_failover", "virtio", "virtio_net", "jbd2", "crc16", "ext4"]


@pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="busybox-static is not installed")
def test_the_archive_is_a_newc_cpio_the_tools_read(tmp_path):
    archive = Archive()
    archive.file("etc/passwd", "root:x:0:0::/root:/bin/sh\n")
    archive.file("init", "#!/bin/sh\n", 0o755)
    archive.dir("root/.ssh", 0o700)
    archive.link("bin/sh", "/bin/busybox")
    archive.device("dev/null", 1, 3, 0o666)
    data = archive.bytes()
    assert data == archive.bytes()                         # reproducible
    listing = subprocess.run(["/bin/busybox", "cpio", "-tv"], input=data, capture_output=True,
                             check=True).stdout.decode()
    assert "bin/sh -> /bin/busybox" in listing
    lines = {line.split()[-1] if "->" not in line else "bin/sh": line.split()[0]
             for line in listing.splitlines()}
    assert lines["init"] == "-rwxr-xr-x" and lines["root/.ssh"] == "drwx------"
    assert lines["dev/null"].startswith("c")
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["/bin/busybox", "cpio", "-id"], input=data, cwd=out, check=True,
                   capture_output=True)
    assert (out / "etc" / "passwd").read_text() == "root:x:0:0::/root:/bin/sh\n"


def test_a_missing_program_names_its_package(monkeypatch):
    monkeypatch.setitem(deployenv.PROGRAMS, "/usr/sbin/absent-tool", "absent-package")
    with pytest.raises(Exception) as caught:
        deployenv.check_host()
    assert "absent-tool" in str(caught.value) and "apt-get install" in str(caught.value)
    assert "absent-package" in str(caught.value)


needs_host = pytest.mark.skipif(bool(deployenv.missing_programs()) or not shutil.which("ldd"),
                                reason="the host lacks the environment's packages (.ci/setup)")


@needs_host
def test_the_initramfs_holds_what_the_steps_run(tmp_path):
    modules = tmp_path / "modules"
    _module(modules / "kernel/drivers/net/e1000.ko", "")
    size = deployenv.build_initrd(tmp_path / "initrd.img", modules, "ssh-ed25519 AAAA test\n",
                                  25300)
    data = gzip.decompress((tmp_path / "initrd.img").read_bytes())
    assert size == (tmp_path / "initrd.img").stat().st_size
    listing = subprocess.run(["/bin/busybox", "cpio", "-t"], input=data, capture_output=True,
                             check=True).stdout.decode().split()
    for needed in ("init", "usr/sbin/sshd", "usr/bin/ssh", "usr/sbin/sfdisk", "usr/sbin/mkfs.ext4",
                   "usr/sbin/mkfs.xfs", "usr/sbin/mkfs.vfat", "usr/sbin/mkswap", "usr/bin/tar",
                   "usr/bin/zstd", "usr/sbin/kexec", "usr/sbin/grub-install",
                   "usr/bin/efibootmgr", "usr/bin/python3", "usr/lib/grub/i386-pc/boot.img",
                   "usr/lib/grub/x86_64-efi/kernel.img", "lib/modules/e1000.ko",
                   "root/.ssh/authorized_keys", "etc/ssh/ssh_host_ed25519_key"):
        assert needed in listing, needed
    assert any(p.startswith("usr/lib/python3/dist-packages/zstandard/") for p in listing)
    assert any(p.endswith("/tarfile.py") for p in listing)
    assert not any("/monolithic/" in p for p in listing)
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["/bin/busybox", "cpio", "-id"], input=data, cwd=out, check=True,
                   capture_output=True)
    init = (out / "init").read_text()
    assert "nc -ll -p 25300" in init and "/usr/sbin/sshd" in init
    assert (out / "root/.ssh/authorized_keys").read_text() == "ssh-ed25519 AAAA test\n"


SCRIPTS = Path(__file__).resolve().parents[1] / "etc" / "kadeploy" / "scripts"


@pytest.mark.skipif(shutil.which("sfdisk") is None, reason="sfdisk is not installed")
@pytest.mark.parametrize("label, types", [
    ("gpt", ["C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",
             "0FC63DAF-8483-4772-8E79-3D69D8477DE4", "0FC63DAF-8483-4772-8E79-3D69D8477DE4"]),
    ("dos", ["ef", "82", "83", "83"])])
def test_partition_sh_builds_the_configured_table(tmp_path, label, types):
    import json
    import os
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as handle:
        handle.truncate(512 * 2**20)
    env = dict(os.environ, KADEPLOY_BLOCK_DEVICE=str(disk), KADEPLOY_PART_LABEL=label,
               KADEPLOY_PARTITIONS="1:esp:32MiB 2:swap:64MiB 3:deploy:256MiB 4:tmp:")
    done = subprocess.run(["sh", str(SCRIPTS / "partition.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    table = json.loads(subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True,
                                      text=True, check=True).stdout)["partitiontable"]
    assert table["label"] == label
    parts = table["partitions"]
    assert [p["type"].upper() if label == "gpt" else p["type"] for p in parts] == types
    sizes = [p["size"] * 512 // 2**20 for p in parts]
    assert sizes[:3] == [32, 64, 256] and sizes[3] > 150      # the last takes the rest


@needs_host
def test_the_initramfs_python_has_every_module_the_agent_imports():
    """The chaincast agent (sent as one script) imports nothing the deployment
    environment's python lacks: a module missing there fails every broadcast."""
    import ast
    import sys

    from kabin.chaincast.launch import agent_source

    imported = set()
    for node in ast.walk(ast.parse(agent_source())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    script = (f"import sys, {deployenv.PYTHON_IMPORTS}\n"
              "print(' '.join(sorted(set(m.split('.')[0] for m in sys.modules))))")
    present = set(subprocess.run([str(deployenv.PYTHON), "-c", script], capture_output=True,
                                 text=True, check=True).stdout.split())
    assert imported - present - set(sys.builtin_module_names) == set()
