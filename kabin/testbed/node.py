"""A testbed node on the host: its files, how it is started, what its end means.

A node is a process tree in its own mount, pid and UTS namespaces (and, in the
netns tier, its own network namespace): ``node/init.sh`` as pid 1 mounts the
node's own files over the host's (NODE_DIR/fstab) and runs an OpenSSH sshd.
What a node sees of its own:

    /dev       device nodes: null, zero, ..., and its disk as sda, sda1, ...
    /run       NODE_DIR/run, emptied at every boot (/run/kabin: the node's state)
    /root      NODE_DIR/root: authorized_keys, a plain .bashrc
    /proc      the proc of its pid namespace: only its own processes
    /tmp /rambin /mnt /mnt/dest /dev/shm   fresh tmpfs at every boot
    /etc/hosts /etc/passwd (root's shell /bin/sh, also inside a deployed system)
    reboot, poweroff, halt, shutdown, systemctl, kexec: the testbed's (node/*.sh),
        bound over the host's: the real ones would act on the host; partx and
        mount: wrappers (first in PATH) that make loop partitions and the
        disk-full fault work

The rest (/usr, /etc, /sys) is the host's, read as it is.
"""

import os
import shutil
import signal
import stat
import subprocess
from pathlib import Path

from ..errors import SystemRequirementError

SCRIPTS = Path(__file__).with_name("node")
NODE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# what the node's first process exits with (see node/init.sh)
EXIT_REBOOT, EXIT_POWEROFF, EXIT_HALT, EXIT_SSHD, EXIT_MOUNT, EXIT_NO_SYSTEM = 11, 12, 13, 14, 20, 21
# the host commands a node must never run: their real path -> the testbed's script
MASKED = {f"{d}/{c}": "power" for d in ("/usr/sbin", "/sbin")
          for c in ("reboot", "poweroff", "halt", "shutdown")}
MASKED.update({"/usr/bin/systemctl": "power", "/bin/systemctl": "power",
               "/usr/sbin/kexec": "kexec", "/sbin/kexec": "kexec"})
WRAPPERS = {"reboot": "power.sh", "poweroff": "power.sh", "halt": "power.sh",
            "shutdown": "power.sh", "kexec": "kexec.sh", "partx": "partx.sh", "mount": "mount.sh"}
CHAR_DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8),
                "urandom": (1, 9), "tty": (5, 0)}
DEV_LINKS = {"ptmx": "pts/ptmx", "fd": "/proc/self/fd", "stdin": "/proc/self/fd/0",
             "stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2"}

SSHD_CONFIG = """\
# sshd of the testbed's nodes: root, by key only. Per node, init.sh adds the
# listening addresses, the host key and, for a deployed system, ChrootDirectory.
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
PrintMotd no
PrintLastLog no
PidFile none
LogLevel INFO
MaxStartups 200:30:400
MaxSessions 200
X11Forwarding no
AcceptEnv LANG LC_* KADEPLOY_* KABIN_*
Subsystem sftp internal-sftp
"""


# ---------------------------------------------------------------- files of the instance

def write_instance_files(layout, authorized_key):
    """What every node of the instance shares: scripts, sshd config, host keys, passwd, hosts."""
    bin_dir = layout.dir / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("init.sh", "diskfull.sh") + tuple(set(WRAPPERS.values())):
        shutil.copyfile(SCRIPTS / name, bin_dir / name)
        (bin_dir / name).chmod(0o755)
    wrappers = layout.dir / "sbin"     # bound over /usr/local/sbin, first in root's PATH
    wrappers.mkdir(exist_ok=True)
    for command, script in WRAPPERS.items():
        link = wrappers / command
        if not link.is_symlink():
            link.symlink_to(bin_dir / script)
    (layout.dir / "sshd_config").write_text(SSHD_CONFIG, encoding="utf-8")
    keys = layout.dir / "hostkeys"
    keys.mkdir(mode=0o700, exist_ok=True)
    for kind in ("deploy", "system"):   # the deployment environment and the deployed systems
        if not (keys / kind).exists():
            keygen(keys / kind, f"kabin-testbed-{layout.name}-{kind}")
    (layout.dir / "passwd").write_text(_passwd_with_sh(), encoding="utf-8")
    hosts = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost"]
    hosts += [f"{layout.node_address(i)}\t{layout.node_name(i)}" for i in range(layout.size)]
    (layout.dir / "hosts").write_text("\n".join(hosts) + "\n", encoding="utf-8")
    (layout.dir / "authorized_keys").write_text(authorized_key, encoding="utf-8")


def keygen(path, comment):
    try:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f",
                        str(path)], check=True, capture_output=True, timeout=30)
    except FileNotFoundError:
        raise SystemRequirementError("ssh-keygen is missing: install openssh-client") from None
    except subprocess.CalledProcessError as exc:
        raise SystemRequirementError(f"ssh-keygen failed: {exc.stderr.decode().strip()}") \
            from None


def _passwd_with_sh():
    """The host's passwd with root's shell set to /bin/sh, which every system has."""
    lines = []
    for line in Path("/etc/passwd").read_text(encoding="utf-8").splitlines():
        fields = line.split(":")
        if fields[0] == "root" and len(fields) == 7:
            fields[6] = "/bin/sh"
        lines.append(":".join(fields))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- files of one node

def prepare_node(layout, index, loop, marker_port):
    """Create NODE_DIR: root, dev, run, fstab and node.env."""
    node_dir = layout.node_dir(index)
    ssh_dir = node_dir / "root" / ".ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (node_dir / "root").chmod(0o700)
    shutil.copyfile(layout.dir / "authorized_keys", ssh_dir / "authorized_keys")
    (node_dir / "root" / ".bashrc").write_text(
        "# a plain .bashrc: a testbed node does not read the host's\n", encoding="utf-8")
    _make_dev(node_dir / "dev")
    (node_dir / "run").mkdir(mode=0o755, exist_ok=True)
    (node_dir / "fstab").write_text(_fstab(layout, node_dir), encoding="utf-8")
    env = {"KABIN_NODE": layout.node_name(index), "KABIN_ADDRESS": layout.node_address(index),
           "KABIN_MARKER_PORT": marker_port, "KABIN_INSTANCE_DIR": layout.dir,
           "KABIN_LOOP": loop, "KABIN_PATH": NODE_PATH}
    (node_dir / "node.env").write_text("".join(f"{k}={v}\n" for k, v in env.items()),
                                       encoding="utf-8")


def _make_dev(dev):
    dev.mkdir(mode=0o755, exist_ok=True)
    for sub in ("pts", "shm"):
        (dev / sub).mkdir(exist_ok=True)
    for name, (major, minor) in CHAR_DEVICES.items():
        if not (dev / name).exists():
            os.mknod(dev / name, stat.S_IFCHR | 0o666, os.makedev(major, minor))
            os.chmod(dev / name, 0o666)
    for name, target in DEV_LINKS.items():
        if not (dev / name).is_symlink():
            (dev / name).symlink_to(target)


def _fstab(layout, node_dir):
    binds = [(node_dir / "run", "/run"), (node_dir / "dev", "/dev")]
    lines = [f"{src} {dst} none bind 0 0" for src, dst in binds]
    lines += [
        "kabin-devpts /dev/pts devpts newinstance,ptmxmode=0666,mode=0620 0 0",
        "kabin-shm /dev/shm tmpfs mode=1777 0 0",
        "kabin-proc /proc proc nosuid,nodev,noexec 0 0",
        "kabin-tmp /tmp tmpfs mode=1777 0 0",
        "kabin-rambin /rambin tmpfs mode=0755 0 0",
        "kabin-mnt /mnt tmpfs mode=0755 0 0",
        "kabin-dest /mnt/dest tmpfs mode=0755,X-mount.mkdir 0 0",
    ]
    binds = [(node_dir / "root", "/root"), (layout.dir / "hosts", "/etc/hosts"),
             (layout.dir / "passwd", "/etc/passwd")]
    if Path("/usr/local/sbin").is_dir():
        binds.append((layout.dir / "sbin", "/usr/local/sbin"))
    binds += [(layout.dir / "bin" / f"{script}.sh", target)
              for target, script in masked_targets().items()]
    lines += [f"{src} {dst} none bind 0 0" for src, dst in binds]
    return "\n".join(lines) + "\n"


def masked_targets():
    """{real path: script} of the host's power and kexec commands (reboot -> systemctl...)."""
    targets = {}
    for path, script in MASKED.items():
        if os.path.exists(path):
            targets[os.path.realpath(path)] = script
    return targets


def sync_disk_nodes(dev, loop, disk_number, partitions):
    """The node's /dev/sda and /dev/sdaK for /dev/``loop`` and its current partitions."""
    for entry in dev.glob("sda*"):
        entry.unlink()
    os.mknod(dev / "sda", stat.S_IFBLK | 0o660, os.makedev(*disk_number))
    for number, (major, minor) in partitions.items():
        os.mknod(dev / f"sda{number}", stat.S_IFBLK | 0o660, os.makedev(major, minor))


def reset_run(node_dir, disk_full=False):
    """An empty /run for a new boot: sshd's privilege separation directory, /run/kabin."""
    run = node_dir / "run"
    shutil.rmtree(run, ignore_errors=True)
    (run / "sshd").mkdir(mode=0o755, parents=True)
    (run / "kabin" / "root").mkdir(mode=0o755, parents=True)
    shutil.copyfile(node_dir / "node.env", run / "kabin" / "node.env")
    set_disk_full(node_dir, disk_full)


def set_disk_full(node_dir, on):
    """The flag the node's mount wrapper reads (node/mount.sh)."""
    flag = node_dir / "run" / "kabin" / "disk-full"
    if on:
        flag.touch()
    else:
        flag.unlink(missing_ok=True)


# ---------------------------------------------------------------- start and end

def launch_argv(layout, index, mode, partition=None):
    """The command that starts node ``index`` in ``mode`` (deploy, or system on a partition).

    setpriv's parent-death signal takes the node down if the supervisor dies;
    SIGKILL on this process (``--kill-child``) takes the node's whole pid
    namespace down: that is power off.
    """
    argv = ["setpriv", "--pdeathsig", "KILL"]
    if layout.netns:
        argv += ["nsenter", f"--net=/run/netns/{layout.node_netns(index)}"]
    argv += ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--uts",
             "--propagation", "private", "sh", str(layout.dir / "bin" / "init.sh"),
             str(layout.node_dir(index)), mode]
    if partition is not None:
        argv.append(str(partition))
    return argv


def ending(returncode):
    """What a node's end means: ("reboot" | "off" | "hung", human detail)."""
    if returncode in (EXIT_REBOOT, -signal.SIGHUP):      # -SIGHUP: reboot(2) in the namespace
        return "reboot", "rebooted"
    if returncode in (EXIT_POWEROFF, EXIT_HALT, -signal.SIGINT):
        return "off", "powered off from the node"
    details = {EXIT_SSHD: "its sshd ended",
               EXIT_MOUNT: "the node's files could not be mounted (see its console.log)",
               EXIT_NO_SYSTEM: "the partition holds no system (no /bin/sh or /etc/os-release)"}
    if returncode in details:
        return "hung", details[returncode]
    if returncode < 0:
        return "hung", f"killed by signal {signal.Signals(-returncode).name}"
    return "hung", f"its init ended with code {returncode}"
