"""One contract for every job: ``<job>.Options`` render as the ka-* command line
(``to_argv``) that the command parses back into the same options."""

import dataclasses

import pytest

from kabin import chaincast, pxe, stats
from kabin import exec as exec_mod
from kabin import reboot
from kabin.cli import chaincast as chaincast_cli
from kabin.cli import exec as exec_cli
from kabin.cli import reboot as reboot_cli


def parsed(command, argv):
    """The parameters ``command`` (a click command) reads from ``argv``."""
    return command.make_context(argv[0], list(argv[1:])).params


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "setup.sh"
    path.write_bytes(b"#!/bin/sh\necho ok\n")
    return path


def _exec_options(argv):
    params = parsed(exec_cli.cli, argv)
    keep = ("command", "script", "sends", "kadeploy_env", "env_spec", "owner", "block_device",
            "partition", "running", "fanout", "timeout", "step")
    return exec_cli.options_of(**{k: params[k] for k in keep})


@pytest.mark.parametrize("fields", [
    {"command": "uname -r"},
    {"command": "mkfs -t ext4 -q -F /dev/sda3", "timeout": 120, "kadeploy_env": True,
     "env": "debian12@3", "owner": "alice", "block_device": "/dev/vda", "partition": 3,
     "step": "format_deploy_part", "running": "system", "fanout": 7},
    {"command": "echo 'it''s' \"$HOME\" | wc -c", "step": "a step with spaces"},
])
def test_exec_options_round_trip(fields):
    options = exec_mod.Options(**fields)
    assert _exec_options(options.to_argv()) == options


def test_exec_script_and_sends_round_trip(script):
    options = exec_mod.Options.for_script(
        str(script), script_args=("--verbose", "a b"),
        sends=(exec_mod.Send.parse(f"{script}:/tmp/x"),))
    assert _exec_options(options.to_argv()) == options


def test_bytes_have_no_command_line():
    with pytest.raises(exec_mod.UsageError):
        exec_mod.Options(command="cat", stdin=b"data").to_argv()


@pytest.mark.parametrize("fields", [
    {},
    {"levels": ("soft", "hard"), "wait": "deploy", "boot_timeout": 90.0, "deadline": 300.0,
     "command_timeout": 12.0, "fanout": 5, "step": "reboot"},
    {"kexec": reboot.Kexec("/mnt/dest/vmlinuz", "/mnt/dest/initrd.img", "root=/dev/sda3 ro"),
     "levels": (), "wait": "system", "running": "deploy", "step": "kexec"},
])
def test_reboot_options_round_trip(fields):
    options = reboot.Options(**fields)
    argv = options.to_argv()
    params = parsed(reboot_cli.reboot_command, argv)
    timing = {k: params[k] for k in ("boot_timeout", "deadline", "command_timeout", "running",
                                     "fanout", "step")}
    back = reboot_cli.reboot_options(params["levels"], params["wait"], params["kernel"],
                                     params["initrd"], params["append"], **timing)
    assert _same_reboot(back, options)


@pytest.mark.parametrize("action", ["on", "off", "status"])
def test_power_options_round_trip(action):
    options = reboot.power_options(action, reboot.Options(wait="none", fanout=3))
    argv = options.to_argv()
    assert argv[:3] == ["ka-reboot", "power", action]
    params = parsed(reboot_cli.power_command, ["power", *argv[2:]])
    timing = {k: params[k] for k in ("boot_timeout", "deadline", "command_timeout", "running",
                                     "fanout", "step")}
    back = reboot_cli.power_options(params["action"], params["levels"], params["wait"], **timing)
    assert _same_reboot(back, options)


def _same_reboot(a, b):
    """Equal options (no --level and an empty list of levels are the same with --kexec)."""
    def norm(o):
        return dataclasses.replace(o, step=o.step_name, levels=o.levels or None)
    return norm(a) == norm(b)


@pytest.mark.parametrize("fields", [
    {"env": "debian12@2", "method": "chain"},
    {"image": "/srv/img.tar.zst", "kind": "tar", "compression": "zstd", "dest": "/mnt/dest",
     "method": "tree", "fanout": 3, "order": "name", "stall_timeout": 12.0, "timeout": 600.0,
     "max_rate": 8.0 * (1 << 20), "ring": 32 << 20, "verify": "stream",
     "step": "send_environment"},
    {"image": "/srv/tools.tgz", "store": True, "dest": "/tmp/tools.tgz", "method": "auto"},
    {"env": "debian12", "method": "multicast", "min_receivers": 6, "fec": "8x8/128"},
    {"env": "debian12", "method": "bittorrent", "spool": "/var/tmp"},
    {"env": "debian12", "method": "chain", "launch": "tree", "launch_fanout": 3},
    {"env": "debian12", "method": "chain", "launch": "direct"},
])
def test_chaincast_options_round_trip(fields):
    options = chaincast.Options(**fields)
    params = parsed(chaincast_cli.cli, options.to_argv())
    keep = ("env_spec", "owner", "image_file", "kind", "compression", "dest", "store", "method",
            "tree_fanout", "order", "stall_timeout", "timeout", "max_rate", "ring_size", "verify",
            "step", "min_receivers", "fec", "spool", "launch", "launch_fanout")
    assert chaincast_cli.options_of(**{k: params[k] for k in keep}) == options


def test_chaincast_offers_every_method_and_auto():
    """The command lists its methods itself (importing the library would slow its start)."""
    method = next(p for p in chaincast_cli.cli.params if p.name == "method")
    assert sorted(method.type.choices) == sorted(["auto", *chaincast.order.METHODS])


@pytest.mark.parametrize("options, argv", [
    (pxe.Options("deploy"), ["ka-pxe", "set", "deploy"]),
    (pxe.Options("local", partition=pxe.DISK, step="switch_pxe"),
     ["ka-pxe", "set", "local", "--step=switch_pxe", "--partition=disk"]),
    (pxe.Options("netboot", env="debian12", params="quiet"),
     ["ka-pxe", "set", "netboot", "--env=debian12", "--params=quiet"]),
    (stats.Options(env="debian12@1"), ["ka-stats", "record", "--env=debian12@1"]),
])
def test_pxe_and_stats_render_their_command_line(options, argv):
    assert options.to_argv() == argv
