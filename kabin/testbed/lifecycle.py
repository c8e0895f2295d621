"""Bring a testbed instance up and down, and find what it left after a crash.

``up`` writes the instance's state file first, then makes its parts (the kabin
configuration, the nodes' disks on loop devices, their files, the network
namespaces of the netns tier) and starts its supervisor, which boots the nodes.
``down`` asks the supervisor to stop, then removes everything it can find that
belongs to the instance, whether or not the state file says so: processes whose
command line names the instance's directory, loop devices backed by its files,
namespaces with its prefix, mounts under its directory, the files it made.
"""

import contextlib
import fcntl
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from .. import config as config_mod
from ..errors import SystemRequirementError, UsageError
from . import configgen, control, disks, faults, firmware, netns, units, vmtier
from ..parallel import Executor
from . import layout as layout_mod
from . import node as node_mod
from .layout import Layout

log = logging.getLogger(__name__)
progress = logging.getLogger("kabin.progress")

DEFAULT_DISK = "512M"
DEFAULT_BOOT_DELAY = 2.0
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
SHARED_MOUNTPOINT = Path("/rambin")      # a node's /rambin needs a directory to mount on
# command -> Debian package, for the error that says what is missing
COMMANDS = {"sshd": "openssh-server", "ssh-keygen": "openssh-client", "unshare": "util-linux",
            "nsenter": "util-linux", "setpriv": "util-linux", "partx": "util-linux",
            "delpart": "util-linux", "blkid": "util-linux", "losetup": "mount",
            "mount": "mount", "fallocate": "util-linux", "sfdisk": "fdisk", "ss": "iproute2",
            "chroot": "coreutils"}
NETNS_COMMANDS = {"ip": "iproute2", "tc": "iproute2"}
SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# ---------------------------------------------------------------- what the machine must have

def check_system(netns=False):
    """Root, the commands, the namespaces and loop devices: one error saying what lacks."""
    if os.geteuid() != 0:
        raise SystemRequirementError("ka-testbed needs root: it makes namespaces, loop devices "
                                     "and mounts")
    needed = dict(COMMANDS, **(NETNS_COMMANDS if netns else {}))
    search = SEARCH_PATH + ":" + os.environ.get("PATH", "")
    missing = {cmd: pkg for cmd, pkg in needed.items() if shutil.which(cmd, path=search) is None}
    if missing:
        raise SystemRequirementError(f"missing commands: {', '.join(missing)} (apt-get install "
                                     f"{' '.join(sorted(set(missing.values())))})")
    kinds = ["pid", "mnt", "uts"] + (["net"] if netns else [])
    lacking = [k for k in kinds if not Path(f"/proc/self/ns/{k}").exists()]
    if lacking:
        raise SystemRequirementError(f"the kernel lacks {', '.join(lacking)} namespaces")
    if not Path("/dev/loop-control").exists():
        raise SystemRequirementError("no loop devices (/dev/loop-control is missing)")
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount", "--uts", "true"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        raise SystemRequirementError(f"cannot create namespaces: {probe.stderr.strip()}")


# ---------------------------------------------------------------- state and locks

@contextlib.contextmanager
def testbed_lock():
    """Serializes ups and downs on this machine (slots, instance directories)."""
    layout_mod.TESTBED_ROOT.mkdir(parents=True, exist_ok=True)
    with open(layout_mod.TESTBED_ROOT / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress.info("waiting for another ka-testbed up or down to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def read_state(name):
    try:
        return json.loads((layout_mod.instance_dir(name) / layout_mod.STATE_FILE)
                          .read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("unreadable state of instance %s: %s", name, exc)
        return {}


def write_state(lay, state):
    tmp = lay.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1), encoding="utf-8")
    os.replace(tmp, lay.state_file)


def layout_of(state):
    return Layout(state["name"], state["slot"], state["size"], state["netns"])


def _start_time(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def supervisor_alive(state):
    info = (state or {}).get("supervisor")
    return bool(info) and _start_time(info["pid"]) == info["start"]


def running_state(name):
    """The state of instance ``name`` if its supervisor runs; a clear error otherwise."""
    state = read_state(name)
    if not state:
        raise UsageError(f"testbed instance {name} is not up (ka-testbed up --instance {name})")
    if not supervisor_alive(state):
        raise SystemRequirementError(f"testbed instance {name} is not running (its supervisor "
                                     f"is gone): 'ka-testbed down --instance {name}' cleans up")
    return state


# ---------------------------------------------------------------- up

def up(name=layout_mod.DEFAULT, size=8, netns=False, switches=2, link_rate=None,
       uplink_rate=None, disk_size=None, boot_delay=DEFAULT_BOOT_DELAY,
       initial_faults=(), timeout=None, vm=None):
    """Bring instance ``name`` up (nothing to do if it is up alike); its Layout.

    ``vm``: a dict of VM settings (see ``vmtier.settings``) for the VM tier.
    ``disk_size`` None: DEFAULT_DISK, or vmtier.DEFAULT_DISK for the VM tier."""
    disk_size = disk_size or (vmtier.DEFAULT_DISK if vm else DEFAULT_DISK)
    params = _params(size, netns or bool(vm), switches, link_rate, uplink_rate, disk_size,
                     boot_delay, initial_faults)
    if vm:
        params["vm"] = vmtier.settings(size, **vm)
    layout_mod.check_instance_name(name)
    check_system(netns or bool(vm))
    if vm:
        vmtier.check_system(params["vm"])
    with testbed_lock():
        state = read_state(name)
        if state is not None and supervisor_alive(state):
            return _reuse(name, state, params)
        if state is not None or layout_mod.instance_dir(name).exists():
            log.warning("instance %s was not brought down cleanly: removing what is left", name)
            _teardown(name, state or {})
        lay = Layout(name, layout_mod.free_slot(name), size, params["netns"])
        lay.dir.mkdir(parents=True)
        state = dict(params, name=name, slot=lay.slot, loops={}, created=[], created_trees=[])
        write_state(lay, state)
        started = time.monotonic()
        if vm:
            vmtier.build(lay, state, params)
        else:
            _build(lay, state, params)
        _start_supervisor(lay, state, "vmsupervisor" if vm else "supervisor")
    if vm:
        vmtier.power_on_and_wait(lay, timeout or vmtier.boot_timeout(size))
    else:
        _wait_settled(lay, timeout or 60 + size * 0.2)
    progress.info("instance %s: %d nodes up in %.1f s", name, size, time.monotonic() - started)
    return lay


def _params(size, netns, switches, link_rate, uplink_rate, disk_size, boot_delay, initial):
    if not 1 <= size <= layout_mod.MAX_NODES:
        raise UsageError(f"number of nodes: 1 to {layout_mod.MAX_NODES}, not {size}")
    if switches < 1:
        raise UsageError("number of switches: at least 1")
    if (link_rate or uplink_rate) and not netns:
        raise UsageError("--link-rate and --uplink-rate shape links: they need --netns")
    if boot_delay < 0:
        raise UsageError("the boot delay cannot be negative")
    fault_map = {}
    for spec in initial:
        node, sep, text = spec.partition("=")
        if not sep:
            raise UsageError(f"invalid fault {spec!r}: expected NODE=KIND[=VALUE]")
        fault = faults.parse(text)
        if fault.kind == "slow-link" and not netns:
            raise UsageError("fault slow-link needs --netns")
        fault_map.setdefault(node, []).append(fault.text)
    return {"size": size, "netns": netns, "switches": min(switches, size),
            "link_rate": units.parse_rate(link_rate) if link_rate else None,
            "uplink_rate": units.parse_rate(uplink_rate) if uplink_rate else None,
            "disk_size": units.parse_size(disk_size), "boot_delay": float(boot_delay),
            "faults": fault_map}


def _reuse(name, state, params):
    differ = sorted(k for k, v in params.items() if state.get(k) != v)
    if differ:
        raise UsageError(f"testbed instance {name} is up with other settings ({', '.join(differ)}):"
                         f" 'ka-testbed down --instance {name}' first")
    log.info("instance %s is up already", name)
    return layout_of(state)


def _build(lay, state, params):
    groups = layout_mod.switch_groups(lay.size, params["switches"])
    _shared_files(state)
    progress.info("instance %s: configuration in %s", lay.name, lay.config_dir)
    configgen.write(lay, groups)
    cfg = config_mod.load(lay.config_dir)
    _boot_files(lay, cfg, state)
    node_mod.write_instance_files(lay, layout_mod.SHARED_KEY.with_suffix(".pub").read_text())
    write_state(lay, state)
    progress.info("instance %s: %d disks", lay.name, lay.size)
    disk_dir = lay.dir / "disks"
    disk_dir.mkdir()
    template = disk_dir / "template.img"
    disks.make_template(template, params["disk_size"], cfg.clusters["local"].partitioning.script)

    def make_node(index):
        image = disk_dir / f"{lay.node_name(index)}.img"
        disks.make_disk(image, template)
        loop = disks.attach(image)
        node_mod.prepare_node(lay, index, loop, cfg.server.deploy_marker_port)
        return loop

    loops = Executor(16).map(make_node, range(lay.size), timeout=300)
    state["loops"] = {lay.node_name(i): loop for i, loop in enumerate(loops)}
    write_state(lay, state)
    if lay.netns:
        progress.info("instance %s: network namespaces", lay.name)
        netns.create(lay, groups, params["link_rate"], params["uplink_rate"])


def _shared_files(state):
    """The SSH key and BMC password every instance uses, and the nodes' /rambin mount point."""
    key = layout_mod.SHARED_KEY
    if not key.exists():
        node_mod.keygen(key, "kabin-testbed")
    secret = layout_mod.SHARED_SECRET
    if not secret.exists():
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(os.urandom(8).hex() + "\n")   # IPMI passwords: at most 20 bytes
    if not SHARED_MOUNTPOINT.exists():
        SHARED_MOUNTPOINT.mkdir(mode=0o755)
        (layout_mod.TESTBED_ROOT / ".made-rambin").touch()


def _boot_files(lay, cfg, state):
    """The deployment kernel and initrd, and default profiles that boot them.

    A PXE or HTTP root made here is the instance's (down removes it whole, with what
    ka-pxe wrote there); in one that was there before, only the files made here go.
    """
    created = state["created"]
    for root in (lay.pxe_root, lay.http_root):
        if not root.exists():
            root.mkdir(parents=True)
            state["created_trees"].append(str(root))
    boot_cfg = cfg.clusters["local"].boot
    files = {}
    for root in (lay.pxe_root, lay.http_root):
        files[root / boot_cfg.deploy_kernel] = firmware.DEPLOY_MAGIC.decode() + \
            "\n(a testbed kernel: the boot emulator reads it, nothing executes it)\n"
        files[root / boot_cfg.deploy_initrd] = "kabin-testbed initrd: deployment environment\n"
    kernel, initrd, params = boot_cfg.deploy_kernel, boot_cfg.deploy_initrd, boot_cfg.deploy_params
    files[lay.pxe_root / "pxelinux.cfg" / "default"] = (
        f"DEFAULT deploy\nLABEL deploy\n  KERNEL {kernel}\n  APPEND initrd={initrd} {params}\n")
    files[lay.pxe_root / "ipxe" / "default"] = (
        f"#!ipxe\nkernel {kernel} {params}\ninitrd {initrd}\nboot\n")
    files[lay.pxe_root / "grub" / "default"] = (
        f"menuentry 'deploy' {{\n  linux /{kernel} {params}\n  initrd /{initrd}\n}}\n")
    for path, text in files.items():
        for parent in reversed(path.parents):
            if not parent.exists():
                parent.mkdir()
                created.append(str(parent))
        if not path.exists():
            path.write_text(text, encoding="utf-8")
            created.append(str(path))


def _start_supervisor(lay, state, module="supervisor"):
    read_end, write_end = os.pipe()
    argv = [sys.executable, "-m", f"kabin.testbed.{module}", str(lay.dir), str(write_end)]
    if lay.netns:
        argv = ["nsenter", f"--net=/run/netns/{lay.frontend_netns}"] + argv
    with open(lay.dir / "supervisor.out", "ab") as out:
        proc = subprocess.Popen(argv, pass_fds=(write_end,), start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    os.close(write_end)
    with os.fdopen(read_end) as ready:
        readable, _, _ = select.select([ready], [], [], START_TIMEOUT)
        answer = ready.readline().strip() if readable else "no answer in time"
    state["supervisor"] = {"pid": proc.pid, "start": _start_time(proc.pid)}
    write_state(lay, state)
    if answer != "ok":
        raise SystemRequirementError(f"the supervisor of instance {lay.name} did not start: "
                                     f"{answer or 'see ' + str(lay.dir / 'supervisor.out')}")


def _wait_settled(lay, timeout):
    """Wait until no node is booting; a node that hangs with no fault to explain it is an error."""
    answer = control.request(lay.control_socket, {"op": "wait", "nodes": lay.node_names,
                                                  "booted": "settled", "timeout": timeout},
                             timeout=timeout + 10)
    nodes = control.request(lay.control_socket, {"op": "status"})["nodes"]
    bad = [n for n in nodes if n["booted"] not in ("deploy", "system") and not n.get("faults")]
    if not answer["done"] or bad:
        first = bad[0] if bad else answer["pending"][0]
        raise SystemRequirementError(f"instance {lay.name}: {len(bad) or len(answer['pending'])} "
                                     f"nodes did not boot, e.g. {first['node']}: "
                                     f"{first['booted']} {first.get('detail', '')}".strip())


# ---------------------------------------------------------------- down

def down(name=layout_mod.DEFAULT):
    """Remove instance ``name`` and everything it made; False if there was nothing."""
    layout_mod.check_instance_name(name)
    if os.geteuid() != 0:
        raise SystemRequirementError("ka-testbed needs root")
    with testbed_lock():
        state = read_state(name)
        if state is None and not layout_mod.instance_dir(name).exists() \
                and not netns.existing(layout_mod.netns_prefix(name)):
            return False
        _teardown(name, state or {})
        return True


def _teardown(name, state):
    directory = layout_mod.instance_dir(name)
    if supervisor_alive(state):
        _stop_supervisor(directory, state["supervisor"]["pid"])
    _kill_processes(directory)
    for loop in disks.loops_under(directory):
        disks.detach(loop)
    netns.delete(layout_mod.netns_prefix(name))
    _unmount_under(directory)
    for path in reversed(state.get("created", [])):
        _remove(Path(path))
    for path in state.get("created_trees", []):
        shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(directory, ignore_errors=True)
    _remove_shared_mountpoint()


def _stop_supervisor(directory, pid):
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        control.request(directory / "control.sock", {"op": "shutdown"})
        if not select.select([pidfd], [], [], STOP_TIMEOUT)[0]:
            log.warning("the supervisor (pid %d) did not stop in %g s: killing it", pid,
                        STOP_TIMEOUT)
    except SystemRequirementError as exc:
        log.warning("%s", exc)
    finally:
        os.close(pidfd)


def _kill_processes(directory):
    """SIGKILL what is left of the instance: its supervisor, node launchers, inits, sshds."""
    mark = str(directory) + "/"
    pidfds = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [w.decode(errors="replace") for w in argv if w]
        if words and any(mark in w for w in words) and _ours(words):
            with contextlib.suppress(ProcessLookupError):
                pidfds.append(os.pidfd_open(int(entry.name)))
                signal.pidfd_send_signal(pidfds[-1], signal.SIGKILL)
    deadline = time.monotonic() + STOP_TIMEOUT
    while pidfds and time.monotonic() < deadline:
        for fd in select.select(pidfds, [], [], deadline - time.monotonic())[0]:
            pidfds.remove(fd)
            os.close(fd)
    for fd in pidfds:
        os.close(fd)


def _ours(words):
    """A process shape the testbed starts (an editor with one of its files open is not)."""
    program = Path(words[0].split()[0].rstrip(":")).name
    return program in ("unshare", "setpriv", "nsenter", "sshd", "sh", "qemu-system-x86_64",
                       "dnsmasq", "ip") \
        or "kabin.testbed.supervisor" in words or "kabin.testbed.vmsupervisor" in words


def _unmount_under(directory):
    mounts = []
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            point = line.split()[4].replace("\\040", " ")
            if point == str(directory) or point.startswith(str(directory) + "/"):
                mounts.append(point)
    for point in reversed(mounts):
        subprocess.run(["umount", "--lazy", point], capture_output=True, timeout=30)


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        with contextlib.suppress(OSError):
            path.rmdir()          # only if empty: others may have put files there
    else:
        path.unlink(missing_ok=True)


def _remove_shared_mountpoint():
    marker = layout_mod.TESTBED_ROOT / ".made-rambin"
    if marker.exists() and not layout_mod.used_slots():
        with contextlib.suppress(OSError):
            SHARED_MOUNTPOINT.rmdir()
            marker.unlink()


# ---------------------------------------------------------------- what runs

def instances():
    """One record per instance on this machine."""
    found = []
    for state_file in sorted(layout_mod.TESTBED_ROOT.glob(f"*/{layout_mod.STATE_FILE}")):
        state = read_state(state_file.parent.name) or {}
        tier = "vm" if state.get("vm") else "netns" if state.get("netns") else "loopback"
        found.append({"instance": state_file.parent.name, "size": state.get("size"),
                      "tier": tier,
                      "slot": state.get("slot"),
                      "running": supervisor_alive(state)})
    return found
