"""What the VM tests share: kadeploy in the frontend's namespace, the real environments,
and what a running machine says of itself."""

import json
import os
import subprocess

import pytest

from kabin.testbed.instance import Testbed


def bring_up(name, size, real_envs=False, **vm):
    """A VM-tier instance of ``size`` machines (``vm``: ka-testbed up --vm's settings), with
    realenv-tzst and realenv-dd if ``real_envs``. A failed setup leaves nothing behind
    (a fixture's teardown never runs then)."""
    if os.geteuid() != 0:
        pytest.skip("the VM tier needs root (namespaces, taps)")
    bed = Testbed(name)
    bed.down()
    try:
        bed.up(size, vm=vm)
        if real_envs:
            make_real_envs(bed)
    except BaseException:
        bed.down()
        raise
    return bed


def make_real_envs(bed):
    """ka-testbed mkenv --real: realenv-tzst and realenv-dd in the instance's library."""
    made = subprocess.run(["ka-testbed", "mkenv", "--real", "--instance", bed.instance,
                           "--format", "json"], capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr


def kadeploy(bed, *args, timeout=900):
    """(rc, {node: record}, stderr) of a kadeploy run in the frontend's namespace."""
    done = subprocess.run(["ka-testbed", "exec", "--instance", bed.instance, "--", "kadeploy",
                           *args, "--format", "json"], capture_output=True, text=True,
                          timeout=timeout)
    return done.returncode, {r["node"]: r for r in map(json.loads, done.stdout.splitlines())}, \
        done.stderr


def facts(bed, node):
    """What the running system says of itself."""
    done = bed.ssh(node, "uname -r; findmnt -n -o SOURCE /; cat /sys/class/dmi/id/sys_vendor; "
                         "cat /etc/hostname; cat /proc/cmdline; "
                         "[ -d /sys/firmware/efi ] && echo uefi || echo bios; "
                         "[ -e /dev/vda ] && echo disk")
    assert done.returncode == 0, done.stderr
    keys = ("kernel", "root", "vendor", "hostname", "cmdline", "firmware", "disk")
    return dict(zip(keys, done.stdout.splitlines()))


def console(bed, node):
    return (bed.layout.node_dir(bed.layout.index_of(node)) / "console.log").read_text(
        errors="replace")


def deploy_and_boot_from_the_disk(bed, nodes):
    """realenv-dd by kadeploy --no-kexec: each node ends OK, rebooted by BootNewEnv Classical
    (its firmware, its PXE local profile, the GRUB install-bootloader.sh wrote), running it.
    Returns each node's console from the start of the deployment."""
    start = {node: len(console(bed, node)) for node in nodes}
    rc, out, err = kadeploy(bed, "-e", "realenv-dd", "-m", ",".join(nodes), "--no-kexec")
    assert rc == 0, err
    assert {n: (r["status"], r["variant"]["BootNewEnv"]) for n, r in out.items()} == \
        {n: ("ok", "Classical") for n in nodes}
    for node in nodes:
        seen = facts(bed, node)
        assert seen["hostname"] == "realenv-dd" and seen["cmdline"].startswith("BOOT_IMAGE="), seen
    return {node: console(bed, node)[start[node]:] for node in nodes}
