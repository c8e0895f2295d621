"""Custom operations on micro-steps (``kadeploy --custom-steps FILE``), Kadeploy3's format.

    SetDeploymentEnv:
      format_deploy_part:
        pre-ops:    [{action: exec, command: "echo before > /tmp/mark"}]
        post-ops:   [{action: send, file: /srv/extra.conf, destination: /mnt/dest/etc/}]
        substitute: [{action: run, file: /srv/my-format.sh, timeout: 120}]

``exec`` runs a command on the nodes, ``send`` copies a local file to a node
directory, ``run`` pipes a local script to ``sh`` on the nodes. The operations of a
micro-step run before it (``pre-ops``), after it (``post-ops``) or instead of it
(``substitute``).
"""

import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from .. import exec as exec_mod
from ..errors import ConfigError, UsageError
from ..schema import Section

MICRO_STEPS = {
    "SetDeploymentEnv": ("switch_pxe", "reboot", "wait_reboot", "send_key_in_deploy_env",
                         "create_partition_table", "format_deploy_part", "mount_deploy_part",
                         "format_tmp_part", "format_swap_part"),
    "BroadcastEnv": ("send_environment", "manage_admin_post_install",
                     "manage_user_post_install", "check_kernel_files", "send_key",
                     "install_bootloader", "umount_deploy_part"),
    "BootNewEnv": ("switch_pxe", "reboot", "kexec", "wait_reboot"),
}
KINDS = ("pre-ops", "post-ops", "substitute")
ACTIONS = ("exec", "send", "run")


@dataclass(frozen=True)
class Operation:
    name: str
    action: str
    command: str | None = None
    file: Path | None = None
    destination: str | None = None
    timeout: float = 60.0


@dataclass(frozen=True)
class CustomOps:
    pre: tuple = ()
    post: tuple = ()
    substitute: tuple | None = None


def _operation(sec, index):
    op = Operation(
        name=sec.get("name", str, f"custom-{index}"),
        action=sec.get("action", str, ..., ACTIONS),
        command=sec.get("command", str, None),
        file=Path(sec.get("file", str)) if "file" in sec.data else None,
        destination=sec.get("destination", str, None),
        timeout=sec.get("timeout", float, 60.0),
    )
    sec.used.add("file")
    sec.done()
    needs = {"exec": ("command",), "send": ("file", "destination"), "run": ("file",)}[op.action]
    for key in needs:
        if getattr(op, key) is None:
            raise sec.error(key, f"is required for action {op.action}")
    if op.file is not None and not op.file.is_file():
        raise sec.error("file", f"no such file: {op.file}")
    return op


def load(path):
    """Parse and check a custom-steps file: {(macro, micro): CustomOps}."""
    try:
        return _load(path)
    except ConfigError as exc:  # the user's file, not the configuration: a usage error
        raise UsageError(str(exc)) from None


def _load(path):
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a text (UTF-8) YAML file") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: invalid YAML: {exc}") from None
    top = Section(data, path)
    result = {}
    for macro, micros in MICRO_STEPS.items():
        steps = top.section(macro)
        for micro in micros:
            kinds = steps.section(micro)
            ops = {k: tuple(_operation(s, i) for i, s in enumerate(kinds.items(k))) for k in KINDS}
            kinds.done()
            if any(k in kinds.data for k in KINDS):
                result[macro, micro] = CustomOps(ops["pre-ops"], ops["post-ops"],
                                                 ops["substitute"] if "substitute" in kinds.data
                                                 else None)
        steps.done()
    top.done()
    return result


def _op_step(plan, macro, micro, kind, op):
    name = f"{micro}:{kind}:{op.name}"
    if op.action == "exec":
        return plan.remote(name, op.command, op.timeout)
    if op.action == "run":
        return plan.run_script(name, op.file, op.timeout)
    sent = f"{plan.config.server.tmp_dir.rstrip('/')}/kabin-send-{op.file.name}"
    dest = op.destination.rstrip("/") + "/" + op.file.name
    return plan.remote(name, f"mkdir -p {shlex.quote(op.destination)} && "
                             f"mv {shlex.quote(sent)} {shlex.quote(dest)}", op.timeout,
                       sends=[exec_mod.Send.parse(f"{op.file}:{sent}")])


def apply(macro, steps, custom, plan):
    """``steps`` with the custom operations of ``macro`` around or instead of its micro-steps."""
    out = []
    for step in steps:
        ops = custom.get((macro, step.name))
        if ops is None:
            out.append(step)
            continue
        out += [_op_step(plan, macro, step.name, "pre", op) for op in ops.pre]
        if ops.substitute is None:
            out.append(step)
        else:
            out += [_op_step(plan, macro, step.name, "substitute", op) for op in ops.substitute]
        out += [_op_step(plan, macro, step.name, "post", op) for op in ops.post]
    return out
