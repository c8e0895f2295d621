"""The micro-steps of a deployment, each a ``MicroStep`` over a stream of records.

Remote work on the nodes (partition, format, mount, post-installs, checks, keys,
bootloader, umount) runs over one SSH pool per deployment, with the KADEPLOY_*
variables exported. PXE, reboot and broadcast steps call the libraries of
ka-pxe, ka-reboot and ka-chaincast.
"""

import dataclasses
import shlex
from pathlib import Path

from .. import chaincast, envdesc, envs, pxe, records
from .. import exec as exec_mod
from .. import reboot as reboot_mod
from ..partitioning import partition_device
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

    # ------------------------------------------------------------ remote steps

    def remote(self, name, command=None, timeout=120, sends=(), stdin=None):
        """A micro-step running ``command`` on each node with ka-exec's library (sends
        first), the KADEPLOY_* variables exported, over the deployment's SSH pool."""
        options = exec_mod.Options(
            command=command, sends=tuple(sends), stdin=stdin, timeout=timeout,
            kadeploy_env=True, env=dict(self.env.description), owner=self.options.owner,
            block_device=self.block_device, partition=self.deploy_part_num, step=name)

        def run(stream, ctx):
            limited = dataclasses.replace(options, timeout=max(1.0, min(timeout,
                                                                        ctx.deadline.remaining())))
            yield from self._debugged(exec_mod.run(self.config, stream, limited, ctx.stop,
                                                   pool=self.pool), options)

        return MicroStep(name, run, options)

    def _debugged(self, stream, options):
        """The command's outputs go into the record's ``debug`` list (kadeploy -d) or away."""
        for record in stream:
            fields = {k: record.pop(k) for k in exec_mod.COMMAND_FIELDS if k in record}
            if fields and self.options.debug:
                command = options.remote_command(self.config.server.tmp_dir)
                record["debug"] = record.get("debug", []) + [
                    {"step": options.step, "command": command, **fields}]
            yield record

    def run_script(self, name, script, timeout=300):
        """Send a local script and run it with sh (as ``sh -s`` would: no #! needed)."""
        on_node = f"{self.config.server.tmp_dir.rstrip('/')}/kabin-{Path(script).name}"
        return self.remote(name, f"sh {shlex.quote(on_node)}", timeout,
                           sends=[exec_mod.Send.parse(f"{script}:{on_node}")])

    def create_partition_table(self):
        script = self.cluster.partitioning.script
        if script is None or self.options.disable_partitioning:
            return nothing("create_partition_table")
        return self.run_script("create_partition_table", script)

    def format_deploy_part(self):
        fs = self.env.filesystem or "ext4"
        if self.env.image_kind == "dd":  # the image brings its own filesystem
            return nothing("format_deploy_part")
        return self.remote("format_deploy_part",
                           f"mkfs -t {shlex.quote(fs)} -q {_force(fs)} {shlex.quote(self.deploy_part)}")

    def format_tmp_part(self):
        fs, part = self.options.reformat_tmp, self.part("tmp")
        if not fs or not part:
            return nothing("format_tmp_part")
        return self.remote("format_tmp_part", f"mkfs -t {shlex.quote(fs)} -q {_force(fs)} "
                                              f"{shlex.quote(part)}")

    def format_swap_part(self):
        part = self.part("swap")
        if not part or self.cluster.partitioning.disable_swap:
            return nothing("format_swap_part")
        return self.remote("format_swap_part", f"mkswap {shlex.quote(part)} >/dev/null")

    def mount_deploy_part(self):
        dest, part = shlex.quote(self.dest), shlex.quote(self.deploy_part)
        return self.remote("mount_deploy_part",
                           f"mkdir -p {dest} && (umount {dest} 2>/dev/null; mount {part} {dest})")

    def check_kernel_files(self):
        files = [f for f in (self.env.kernel, self.env.initrd) if f]
        if not files:
            return nothing("check_kernel_files")
        tests = " && ".join(f"test -e {shlex.quote(self.dest + '/' + f.lstrip('/'))}" for f in files)
        return self.remote("check_kernel_files",
                           f"{tests} || {{ echo 'kernel files missing' >&2; exit 1; }}")

    def send_key(self):
        keys = self.options.ssh_key_file
        if not keys:
            return nothing("send_key")
        ssh_dir = shlex.quote(self.dest + "/root/.ssh")
        sent = f"{self.config.server.tmp_dir.rstrip('/')}/kabin-authorized-keys"
        command = (f"mkdir -p {ssh_dir} && chmod 700 {ssh_dir} && cat {sent} >> "
                   f"{ssh_dir}/authorized_keys && chmod 600 {ssh_dir}/authorized_keys && rm {sent}")
        return self.remote("send_key", command, sends=[exec_mod.Send.parse(f"{keys}:{sent}")])

    def install_bootloader(self):
        script = self.cluster.boot.install_bootloader
        if script is None or self.options.disable_bootloader:
            return nothing("install_bootloader")
        return self.run_script("install_bootloader", script)

    def umount_deploy_part(self):
        dest = shlex.quote(self.dest)
        return self.remote("umount_deploy_part",
                           f"sync; if mountpoint -q {dest}; then umount {dest}; fi")


    # ------------------------------------------------------------ library steps

    def switch_pxe(self, profile, partition=None):
        options = pxe.Options(profile, partition=partition, step="switch_pxe")
        return MicroStep("switch_pxe", lambda stream, ctx: pxe.run(self.config, stream, options,
                                                                   ctx.stop), options)

    def reboot(self, levels, wait, kexec=None, name="reboot"):
        """Reboot (with escalation through ``levels``) and wait for ``wait``."""
        options = reboot_mod.Options(levels=levels, wait=wait, kexec=kexec, step=name,
                                     running="deploy" if wait == "system" else "system")

        def run(stream, ctx):
            limited = dataclasses.replace(options, deadline=max(1.0, ctx.deadline.remaining()))
            yield from reboot_mod.run(self.config, stream, limited, ctx.stop)
        return MicroStep(name, run, options)

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
        options = chaincast.Options(
            env=None if self.options.description else self.env.spec, owner=self.options.owner,
            image=str(self.image.path), kind=self.image.kind, sha256=self.image.sha256,
            compression=self.image.compression, method=method, stall_timeout=30.0,
            dest=self.dest if self.image.kind == "tar" else self.deploy_part,
            step="send_environment")

        def run(stream, ctx):
            limited = dataclasses.replace(options, timeout=max(1.0, ctx.deadline.remaining()))
            yield from chaincast.run(self.config, stream, limited, ctx.stop)
        return MicroStep("send_environment", run, options)

    def post_installs(self, name, archives):
        """Each archive is unpacked in the prepost dir, then its script runs there."""
        steps = []
        for number, item in enumerate(archives):
            unpack = {"gzip": "-z", "bzip2": "-j", "xz": "-J", "zstd": "--zstd"}.get(
                item.get("compression"), "")
            local = envdesc.local_path(item["archive"])
            sent = f"{self.config.server.tmp_dir.rstrip('/')}/kabin-{name}-{number}.tar"
            source = f"-f {sent}" if local else "-f -"
            command = (f'd="$KADEPLOY_PREPOST_EXTRACTION_DIR" && rm -rf "$d" && mkdir -p "$d" && '
                       f'tar {unpack} -x {source} -C "$d" && cd "$d" && '
                       f'{item.get("script") or "true"}')
            if local:
                steps.append(self.remote(name, command, 600,
                                         sends=[exec_mod.Send.parse(f"{local}:{sent}")]))
            else:   # fetched by the frontend now, sent on the command's stdin
                with envs.open_file(item["archive"]) as stream:
                    steps.append(self.remote(name, command, 600, stdin=stream.read()))
        return steps


def nothing(name):
    """A micro-step with nothing to do under these options: OK at once, not printed."""
    return MicroStep(name, lambda stream, ctx: (records.ok(r, name, 0.0) if records.is_ok(r)
                                                else r for r in stream))


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
    boot, tmp = plan.cluster.boot, plan.config.server.tmp_dir.rstrip("/")
    root = plan.config.server.pxe_root
    kernel = reboot_mod.Kexec(f"{tmp}/kabin-deploy-vmlinuz", f"{tmp}/kabin-deploy-initrd",
                              boot.deploy_params)
    send = plan.remote("send_deploy_kernel", "true", sends=[
        exec_mod.Send.parse(f"{root / boot.deploy_kernel}:{kernel.kernel}"),
        exec_mod.Send.parse(f"{root / boot.deploy_initrd}:{kernel.initrd}")])
    return [send, plan.reboot((), "deploy", kexec=kernel, name="kexec")]


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
        ("BroadcastEnv", "Multicast"): lambda: [plan.send_environment("multicast"),
                                                *_after_broadcast(plan)],
        ("BroadcastEnv", "Bittorrent"): lambda: [plan.send_environment("bittorrent"),
                                                 *_after_broadcast(plan)],
        ("BroadcastEnv", "Custom"): lambda: [nothing("send_environment"),
                                             *_after_broadcast(plan)],
        ("BootNewEnv", "Kexec"): lambda: [plan.switch_pxe("local", local), plan.mount_deploy_part(),
                                          plan.kexec_env()],
        ("BootNewEnv", "Classical"): lambda: [plan.switch_pxe("local", local),
                                              plan.reboot(("soft",), "system")],
        ("BootNewEnv", "HardReboot"): lambda: [plan.switch_pxe("local", local),
                                               plan.reboot(("hard", "very_hard"), "system")],
    }
    return builders[macro, variant]()
