"""The micro-steps of a deployment, each a ``MicroStep`` over a stream of records.

Remote work on the nodes (partition, format, mount, post-installs, checks, keys,
bootloader, umount) runs over one SSH pool per deployment, with the KADEPLOY_*
variables exported. PXE, reboot and broadcast steps call the libraries of
ka-pxe, ka-reboot and ka-chaincast.
"""

import shlex
import time

from .. import chaincast, envs, pxe, records
from .. import exec as exec_mod
from .. import reboot as reboot_mod
from ..partitioning import partition_device
from ..parallel import Executor
from ..ssh import SshError
from .automata import MicroStep


class Plan:
    """Everything a micro-step needs: config, cluster, environment, options, SSH pool."""

    def __init__(self, config, cluster, env, image, options, pool):
        self.config, self.cluster, self.env, self.image = config, cluster, env, image
        self.options, self.pool = options, pool
        parts = cluster.partitioning
        self.block_device = options.block_device or parts.block_device
        self.deploy_part_num = options.partition or parts.partitions["deploy"]
        self.deploy_part = partition_device(self.block_device, self.deploy_part_num)
        self.dest = config.server.extraction_dir

    def part(self, role):
        number = self.cluster.partitioning.partitions.get(role)
        return partition_device(self.block_device, number) if number else None

    def variables(self, record):
        """The KADEPLOY_* variables exported to every command run on a node."""
        described = dict(record, env=dict(self.env.description), block_device=self.block_device,
                         deploy_partition=self.deploy_part_num)
        return exec_mod.kadeploy_env(self.config, described)

    # ------------------------------------------------------------ remote steps

    def remote(self, name, command_of, timeout=120, stdin_of=None, shell=None):
        """A micro-step running ``command_of(record)`` on each node (None: nothing to do).

        ``shell``: the equivalent ka-exec line; by default built from the command.
        """
        if shell is None and command_of({}) is not None and stdin_of is None:
            shell = f"ka-exec --env -t {timeout:g} -- {shlex.quote(command_of({}))}"

        def work(record, ctx):
            command = command_of(record)
            if command is None:
                return records.ok(record, name, 0.0)
            stdin = stdin_of(record) if stdin_of else None
            limit = max(1.0, min(timeout, ctx.deadline.remaining()))
            start = time.monotonic()
            try:
                result = self.pool.run(record["node"], command, limit, stdin=stdin,
                                       env=self.variables(record))
            except SshError as exc:
                return records.ko(record, name, str(exc), time.monotonic() - start)
            debug = ({"debug": record.get("debug", []) + [{
                "step": name, "command": command, "rc": result.rc,
                "stdout": result.stdout, "stderr": result.stderr}]}
                if self.options.debug else {})
            if result.ok:
                return records.ok(record, name, result.time, **debug)
            return records.ko(record, name, f"{name}: {result.error()}", result.time, **debug)

        def run(stream, ctx):
            executor = Executor(self.config.server.fanout, ctx.stop)
            yield from executor.map_records(stream, lambda r: work(r, ctx), name)

        return MicroStep(name, run, shell)

    def run_script(self, name, script, timeout=300):
        """Pipe a local script to ``sh -s`` on the nodes."""
        data = script.read_bytes()
        return self.remote(name, lambda r: "sh -s", timeout, stdin_of=lambda r: data,
                           shell=f"ka-exec --env -t {timeout:g} --script {shlex.quote(str(script))}")

    def create_partition_table(self):
        script = self.cluster.partitioning.script
        if script is None or self.options.disable_partitioning:
            return self.remote("create_partition_table", lambda r: None)
        return self.run_script("create_partition_table", script)

    def format_deploy_part(self):
        fs = self.env.filesystem or "ext4"
        if self.env.image_kind == "dd":  # the image brings its own filesystem
            return self.remote("format_deploy_part", lambda r: None)
        return self.remote("format_deploy_part",
                           lambda r: f"mkfs -t {shlex.quote(fs)} -q {_force(fs)} "
                                     f"{shlex.quote(self.deploy_part)}")

    def format_tmp_part(self):
        fs, part = self.options.reformat_tmp, self.part("tmp")
        if not fs or not part:
            return self.remote("format_tmp_part", lambda r: None)
        return self.remote("format_tmp_part",
                           lambda r: f"mkfs -t {shlex.quote(fs)} -q {_force(fs)} {shlex.quote(part)}")

    def format_swap_part(self):
        part = self.part("swap")
        if not part or self.cluster.partitioning.disable_swap:
            return self.remote("format_swap_part", lambda r: None)
        return self.remote("format_swap_part", lambda r: f"mkswap {shlex.quote(part)} >/dev/null")

    def mount_deploy_part(self):
        dest, part = shlex.quote(self.dest), shlex.quote(self.deploy_part)
        return self.remote("mount_deploy_part",
                           lambda r: f"mkdir -p {dest} && (umount {dest} 2>/dev/null; "
                                     f"mount {part} {dest})")

    def check_kernel_files(self):
        files = [f for f in (self.env.kernel, self.env.initrd) if f]
        if not files:
            return self.remote("check_kernel_files", lambda r: None)
        tests = " && ".join(f"test -e {shlex.quote(self.dest + '/' + f.lstrip('/'))}" for f in files)
        return self.remote("check_kernel_files",
                           lambda r: f"{tests} || {{ echo 'kernel files missing' >&2; exit 1; }}")

    def send_key(self):
        keys = self.options.ssh_keys
        if not keys:
            return self.remote("send_key", lambda r: None)
        ssh_dir = shlex.quote(self.dest + "/root/.ssh")
        command = (f"mkdir -p {ssh_dir} && chmod 700 {ssh_dir} && "
                   f"cat >> {ssh_dir}/authorized_keys && chmod 600 {ssh_dir}/authorized_keys")
        return self.remote("send_key", lambda r: command, stdin_of=lambda r: keys)

    def install_bootloader(self):
        script = self.cluster.boot.install_bootloader
        if script is None or self.options.disable_bootloader:
            return self.remote("install_bootloader", lambda r: None)
        return self.run_script("install_bootloader", script)

    def umount_deploy_part(self):
        dest = shlex.quote(self.dest)
        return self.remote("umount_deploy_part",
                           lambda r: f"sync; if mountpoint -q {dest}; then umount {dest}; fi")


    # ------------------------------------------------------------ library steps

    def switch_pxe(self, profile, partition=None):
        request = pxe.Request(profile, partition=partition)
        shell = f"ka-pxe set {profile}" + (f" --partition {partition}" if partition else "")
        return MicroStep("switch_pxe", lambda stream, ctx: _renamed(
            pxe.set_profiles(self.config, request, stream), pxe.STEP, "switch_pxe"), shell)

    def reboot(self, levels, wait, kexec=None, name="reboot"):
        """Reboot (with escalation through ``levels``) and wait for ``wait``."""

        def run(stream, ctx):
            options = reboot_mod.Options(levels=levels, wait=wait, kexec=kexec,
                                         deadline=max(1.0, ctx.deadline.remaining()),
                                         ssh_target="deploy" if wait == "system" else "system")
            yield from _renamed(reboot_mod.reboot(self.config, stream, options, ctx.stop),
                                reboot_mod.STEP, name)
        shell = "ka-reboot" + (f" --level {','.join(levels)}" if levels else "")
        if kexec:
            shell += f" --kexec {shlex.quote(kexec.kernel)}" + (
                f" --initrd {shlex.quote(kexec.initrd)}" if kexec.initrd else "") + (
                f" --append {shlex.quote(kexec.append)}" if kexec.append else "")
        return MicroStep(name, run, f"{shell} --wait {wait}")

    def kexec_env(self):
        """BootNewEnv Kexec: kexec into the environment's kernel from the deploy partition."""
        dest = self.dest.rstrip("/")
        params = " ".join(p for p in (f"root={self.deploy_part}", self.env.kernel_params,
                                      self.cluster.boot.user_params) if p)
        kexec = reboot_mod.Kexec(f"{dest}/{self.env.kernel.lstrip('/')}",
                                 f"{dest}/{self.env.initrd.lstrip('/')}" if self.env.initrd else None,
                                 params)
        return self.reboot((), "system", kexec=kexec, name="kexec")

    def send_environment(self, method):
        """Broadcast the image to the batch (chain or tree): it needs the whole batch."""

        def run(stream, ctx):
            options = chaincast.Options(method=method, stall_timeout=30.0,
                                        timeout=max(1.0, ctx.deadline.remaining()))
            dest = self.dest if self.image.kind == "tar" else self.deploy_part
            yield from _renamed(chaincast.broadcast(stream, self.image, self.config, dest=dest,
                                                    options=options, stop=ctx.stop),
                                chaincast.STEP, "send_environment")
        dest = self.dest if self.image.kind == "tar" else self.deploy_part
        return MicroStep("send_environment", run,
                         f"ka-chaincast --env {shlex.quote(self.env.spec)} --method {method} "
                         f"--to {shlex.quote(dest)}")

    def post_installs(self, name, archives):
        """Each archive is unpacked in the prepost dir, then its script runs there."""
        steps = []
        for item in archives:
            with envs.open_file(item["archive"]) as stream:
                data = stream.read()
            unpack = {"gzip": "-z", "bzip2": "-j", "xz": "-J", "zstd": "--zstd"}.get(
                item.get("compression"), "")
            command = (f'd="$KADEPLOY_PREPOST_EXTRACTION_DIR" && rm -rf "$d" && mkdir -p "$d" && '
                       f'tar {unpack} -x -f - -C "$d" && cd "$d" && '
                       f'{item.get("script") or "true"}')
            steps.append(self.remote(name, lambda r, c=command: c,
                                     stdin_of=lambda r, d=data: d, timeout=600))
        return steps


def _renamed(stream, old, new):
    """Records of a library step under the name of the micro-step that ran it."""
    for record in stream:
        history = record.get("history") or []
        if record.get("step") == old and history and history[-1].get("step") == old:
            record = dict(record, step=new, history=history[:-1] + [dict(history[-1], step=new)])
        yield record


def _force(fs):
    """mkfs option that formats without asking (ext* want -F, xfs and btrfs -f)."""
    return "-F" if fs.startswith("ext") else "-f" if fs in ("xfs", "btrfs") else ""


ALL_LEVELS = None  # every configured reboot level, in order: soft, hard, very_hard


def _deploy_env_setup(plan):
    """Partition, format, mount: common to the SetDeploymentEnv variants."""
    mount = [] if plan.image.kind == "dd" else [plan.mount_deploy_part()]
    return [plan.create_partition_table(), plan.format_deploy_part(), *mount,
            plan.format_tmp_part(), plan.format_swap_part()]


def _deploy_kernel_kexec(plan):
    boot = plan.cluster.boot
    root = plan.config.server.pxe_root
    kernel = reboot_mod.Kexec(f"{plan.config.server.tmp_dir}/kabin-deploy-vmlinuz",
                              f"{plan.config.server.tmp_dir}/kabin-deploy-initrd",
                              boot.deploy_params)
    send = plan.remote(
        "send_deploy_kernel", lambda r: (f"cat > {kernel.kernel}.tar && tar -xf {kernel.kernel}.tar "
                                         f"-C {plan.config.server.tmp_dir} && rm {kernel.kernel}.tar"),
        stdin_of=lambda r: _kernel_tar(root / boot.deploy_kernel, root / boot.deploy_initrd))
    return [send, plan.reboot((), "deploy", kexec=kernel, name="kexec")]


def _kernel_tar(kernel, initrd):
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(kernel, "kabin-deploy-vmlinuz")
        tar.add(initrd, "kabin-deploy-initrd")
    return buffer.getvalue()


def _after_broadcast(plan):
    env = plan.env.description
    mount = [plan.mount_deploy_part()] if plan.image.kind == "dd" else []
    return [*mount,
            *plan.post_installs("manage_admin_post_install", plan.cluster.admin_postinstalls),
            *plan.post_installs("manage_user_post_install", env.get("postinstalls", [])),
            plan.check_kernel_files(), plan.send_key(), plan.install_bootloader(),
            plan.umount_deploy_part()]


def build_steps(macro, variant, plan):
    """The micro-steps of one variant of a macro-step."""
    # iPXE boots no partition: the disk's MBR, where install-bootloader.sh put GRUB
    local = pxe.DISK if plan.cluster.pxe.local_method == "ipxe" else plan.deploy_part_num
    builders = {
        ("SetDeploymentEnv", "Untrusted"): lambda: [
            plan.switch_pxe("deploy"), plan.reboot(ALL_LEVELS, "deploy"), *_deploy_env_setup(plan)],
        ("SetDeploymentEnv", "Kexec"): lambda: [
            plan.switch_pxe("deploy"), *_deploy_kernel_kexec(plan), *_deploy_env_setup(plan)],
        ("SetDeploymentEnv", "Prod"): lambda: _deploy_env_setup(plan),
        ("BroadcastEnv", "Chain"): lambda: [plan.send_environment("chain"), *_after_broadcast(plan)],
        ("BroadcastEnv", "Tree"): lambda: [plan.send_environment("tree"), *_after_broadcast(plan)],
        ("BroadcastEnv", "Custom"): lambda: [plan.remote("send_environment", lambda r: None),
                                             *_after_broadcast(plan)],
        ("BootNewEnv", "Kexec"): lambda: [plan.switch_pxe("local", local), plan.mount_deploy_part(),
                                          plan.kexec_env()],
        ("BootNewEnv", "Classical"): lambda: [plan.switch_pxe("local", local),
                                              plan.reboot(("soft",), "system")],
        ("BootNewEnv", "HardReboot"): lambda: [plan.switch_pxe("local", local),
                                               plan.reboot(("hard", "very_hard"), "system")],
    }
    return builders[macro, variant]()
