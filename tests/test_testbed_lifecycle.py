"""ka-testbed up and down: idempotent, side by side with other instances, nothing left behind."""

import json
import os
import select
import signal
import subprocess
from pathlib import Path

import pytest

from kabin.errors import SystemRequirementError, UsageError
from kabin.testbed import disks, layout, lifecycle, netns
from kabin.testbed.instance import Testbed

pytestmark = pytest.mark.testbed

NAME = os.environ.get("KABIN_TESTBED_INSTANCE", "pytest") + "-life"


def leftovers(name, directory):
    """What is left of instance ``name``: processes, loop devices, namespaces, mounts, files."""
    mark = str(directory) + "/"
    processes = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and mark.encode() in (entry / "cmdline").read_bytes():
                processes.append(entry.name)
        except OSError:
            continue
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if line.split()[4].startswith(str(directory))]
    return {"processes": processes, "loops": list(disks.loops_under(directory)),
            "netns": netns.existing(layout.netns_prefix(name)), "mounts": mounts,
            "files": directory.exists()}


NOTHING = {"processes": [], "loops": [], "netns": [], "mounts": [], "files": False}


@pytest.fixture
def bed():
    if os.geteuid() != 0:
        pytest.skip("the testbed needs root")
    bed = Testbed(NAME)
    yield bed
    bed.down()


def ka_testbed(*args, **kwargs):
    return subprocess.run(["ka-testbed", *args, "--instance", NAME], capture_output=True,
                          text=True, timeout=300, **kwargs)


def test_up_is_idempotent_and_down_leaves_nothing(bed):
    bed.up(2, netns=True, boot_delay=0.5)
    state = lifecycle.read_state(NAME)
    assert bed.ssh("node-2", "hostname").stdout.strip() == "node-2"
    again = ka_testbed("up", "-n", "2", "--netns", "--boot-delay", "0.5")
    assert again.returncode == 0
    assert lifecycle.read_state(NAME)["supervisor"] == state["supervisor"]
    other = ka_testbed("up", "-n", "3")
    assert other.returncode == 2 and "down" in other.stderr
    assert leftovers(NAME, bed.layout.dir) != NOTHING
    assert ka_testbed("down").returncode == 0
    assert leftovers(NAME, bed.layout.dir) == NOTHING
    assert ka_testbed("down").returncode == 0        # nothing to do is fine


def kill_supervisor():
    pidfd = os.pidfd_open(lifecycle.read_state(NAME)["supervisor"]["pid"])
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        assert select.select([pidfd], [], [], 30)[0], "the supervisor did not die"
    finally:
        os.close(pidfd)


def test_down_cleans_up_after_a_crash(bed):
    bed.up(2, boot_delay=0.5)
    kill_supervisor()
    with pytest.raises(SystemRequirementError, match="not running"):
        bed.status()
    assert bed.ssh("node-1", "true").returncode != 0          # its nodes went with it
    # up again mends it (here with a fault from the start: node-2 never comes)
    bed.up(2, boot_delay=0.5, initial_faults=("node-2=never-returns",))
    assert bed.ssh("node-1", "true").returncode == 0
    assert bed.status()["node-2"]["booted"] == "hung"
    kill_supervisor()
    assert ka_testbed("down").returncode == 0
    assert leftovers(NAME, bed.layout.dir) == NOTHING


def test_instances_side_by_side(testbed, bed):
    bed.up(2, boot_delay=0.5)
    assert bed.layout.slot != testbed.layout.slot
    assert bed.address("node-1") != testbed.address("node-1")
    assert bed.config.node("node-1").bmc.address != testbed.config.node("node-1").bmc.address
    assert bed.config.server.pxe_root != testbed.config.server.pxe_root
    for each in (bed, testbed):
        assert each.ssh("node-1", "echo $KABIN_NODE_ADDRESS").stdout.strip() == \
            each.address("node-1")


def test_the_commands_talk_to_an_instance(testbed):
    env = dict(testbed.env)
    exported = subprocess.run(["ka-testbed", "env"], capture_output=True, text=True, env=env)
    assert f"export KABIN_CONFIG={testbed.config_dir}" in exported.stdout
    status = subprocess.run(["ka-testbed", "status", "--format", "json"], capture_output=True,
                            text=True, env=env)
    records = [json.loads(line) for line in status.stdout.splitlines()]
    assert [r["node"] for r in records] == testbed.nodes
    assert {"node", "address", "bmc", "power", "booted"} <= set(records[0])
    listed = subprocess.run(["ka-testbed", "list", "--format", "json"], capture_output=True,
                            text=True, env=env)
    assert any(json.loads(line)["instance"] == testbed.instance
               for line in listed.stdout.splitlines())


def test_without_root_one_clear_error():
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                       # a child that is not root any more
        os.close(read_end)
        try:
            os.setgid(65534)
            os.setuid(65534)
            lifecycle.check_system()
            message = "no error"
        except SystemRequirementError as exc:
            message = f"{exc.exit_code} {exc}"
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        message = pipe.read()
    os.waitpid(pid, 0)
    assert message.startswith("3 ") and "needs root" in message


def test_bad_settings_are_refused_before_anything_is_made():
    with pytest.raises(UsageError, match="netns"):
        lifecycle.up(NAME, 2, link_rate="10mbit")
    with pytest.raises(UsageError, match="instance name"):
        lifecycle.up("../etc", 2)
    assert not lifecycle.read_state(NAME)
