"""Bad input, as a new user would give it: each case ends with its exit code, one line on
stderr naming the problem, no traceback, and the database and PXE tree as they were.

The commands run as installed (subprocesses) against a configuration of their own whose
state (database, PXE tree) lives in the test's directory; nothing reaches a node.
"""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent / "qemu"))
from cluster import make_config  # noqa: E402

BINARY = bytes(range(255, -1, -1)) * 8  # not UTF-8 from its first byte
HUGE = "node-[1-100000000]"


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    """A configuration with a PXE profile and a logged run in its state."""
    tmp = tmp_path_factory.mktemp("bad-input")
    config = make_config(tmp)
    (tmp / "binary").write_bytes(BINARY)
    (tmp / "empty.yml").write_text("")
    (tmp / "list.yml").write_text("- a\n- b\n")
    (tmp / "typo.yml").write_text(yaml.safe_dump({"name": "x", "version": 1, "imagee": {}}))
    (tmp / "template").write_text("DEFAULT {{ no_such_value }}\n")
    bad_server = tmp / "bad-server"
    bad_server.mkdir()
    for name in os.listdir(config.dir):
        source = Path(config.dir) / name
        if source.is_file():
            (bad_server / name).write_bytes(source.read_bytes())
    (bad_server / "server.yml").write_bytes(BINARY)
    env = dict(os.environ, KABIN_CONFIG=str(config.dir))
    for argv in (["ka-pxe", "set", "deploy", "-m", "node-1"],
                 ["ka-stats", "record", "--operation", "reboot", "-m", "node-2"]):
        subprocess.run(argv, env=env, check=True, capture_output=True, timeout=60)
    return tmp, config, env


def snapshot(config):
    """Every file of the state directory (database, PXE tree) and its content's digest."""
    root = Path(config.server.pxe_root).parent
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith("-shm")}


CASES = [
    # (id, argv, stdin, exit code, what stderr says)
    ("env-add-binary", ["ka-env", "add", "{tmp}/binary"], None, 2, "not a text (UTF-8)"),
    ("env-add-empty", ["ka-env", "add", "{tmp}/empty.yml"], None, 2, "empty description"),
    ("env-add-list", ["ka-env", "add", "{tmp}/list.yml"], None, 2, "expected a mapping"),
    ("env-add-typo", ["ka-env", "add", "{tmp}/typo.yml"], None, 2, "unknown field"),
    ("env-add-missing", ["ka-env", "add", "{tmp}/nope.yml"], None, 2, "cannot read"),
    ("exec-huge-nodeset", ["ka-exec", "--", "true"], HUGE + "\n", 2, "more than the limit"),
    ("exec-huge-nodeset-m", ["ka-exec", "-m", HUGE, "--", "true"], None, 2, "KABIN_MAX_NODES"),
    ("exec-binary-stdin", ["ka-exec", "--", "true"], BINARY, 2, "not UTF-8 text"),
    ("exec-binary-file", ["ka-exec", "-f", "{tmp}/binary", "--", "true"], None, 2,
     "not UTF-8 text"),
    ("exec-bad-json", ["ka-exec", "--", "true"], '{"node": "node-1",\n', 2, "malformed JSON"),
    ("exec-record-not-object", ["ka-exec", "--", "true"], "[1, 2]\n", 2,
     "neither a node set nor a JSON record"),
    ("exec-record-without-node", ["ka-exec", "--", "true"], '{"status": "ok"}\n', 2, "node"),
    ("exec-long-name", ["ka-exec", "--", "true"], "n" * 300 + "\n", 2, "at most 253"),
    ("exec-nothing-to-do", ["ka-exec", "-m", "node-1"], None, 2, "nothing to do"),
    ("exec-zero-timeout", ["ka-exec", "-m", "node-1", "-t", "0", "--", "true"], None, 2,
     "--timeout"),
    ("exec-missing-script", ["ka-exec", "-m", "node-1", "--script", "{tmp}/nope.sh"], None, 2,
     "cannot read"),
    ("reboot-empty-level", ["ka-reboot", "--level", "", "-m", "node-1"], None, 2,
     "at least one level"),
    ("reboot-level-twice", ["ka-reboot", "--level", "soft,soft", "-m", "node-1"], None, 2,
     "named twice"),
    ("reboot-unknown-level", ["ka-reboot", "--level", "warp", "-m", "node-1"], None, 2,
     "unknown reboot level"),
    ("reboot-initrd-alone", ["ka-reboot", "--initrd", "/x", "-m", "node-1"], None, 2,
     "go with --kexec"),
    ("power-status-wait", ["ka-reboot", "power", "status", "--wait", "deploy", "-m", "node-1"],
     None, 2, "--wait goes with"),
    ("pxe-bad-partition", ["ka-pxe", "set", "local", "--partition", "0", "-m", "node-1"], None, 2,
     "partition number"),
    ("pxe-template-binary", ["ka-pxe", "set", "custom", "--template", "{tmp}/binary",
                             "-m", "node-1"], None, 2, "not UTF-8"),
    ("pxe-template-unknown-value", ["ka-pxe", "set", "custom", "--template", "{tmp}/template",
                                    "-m", "node-1"], None, 2, "no_such_value"),
    ("chaincast-no-image", ["ka-chaincast", "-m", "node-1"], None, 2, "exactly one of"),
    ("kadeploy-no-env", ["kadeploy", "-m", "node-1"], None, 2, "give an environment"),
    ("kadeploy-unknown-env", ["kadeploy", "-e", "nope", "-m", "node-1"], None, 3, "nope"),
    ("kadeploy-bad-force-steps", ["kadeploy", "-e", "x", "-m", "node-1", "--force-steps",
                                  "BootNewEnv|Warp:1:0"], None, 2, "no variant"),
    ("kadeploy-binary-custom-steps", ["kadeploy", "-e", "x", "-m", "node-1", "--custom-steps",
                                      "{tmp}/binary"], None, 2, "not a text (UTF-8)"),
    ("stats-bad-date", ["ka-stats", "list", "--from", "yesterday-ish"], None, 2, "yesterday-ish"),
    ("config-binary", ["ka-exec", "-m", "node-1", "--config", "{tmp}/bad-server", "--", "true"],
     None, 3, "not a text (UTF-8)"),
    ("config-missing", ["ka-exec", "-m", "node-1", "--config", "{tmp}/nowhere", "--", "true"],
     None, 3, "nowhere"),
]


@pytest.mark.parametrize("argv, stdin, code, said", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(state, argv, stdin, code, said):
    tmp, config, env = state
    before = snapshot(config)
    argv = [a.format(tmp=tmp) for a in argv]
    data = stdin.encode() if isinstance(stdin, str) else stdin
    done = subprocess.run(argv, input=data if data is not None else b"", env=env,
                          capture_output=True, timeout=60)
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == code, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{argv[0]}: error: "), err
    assert said in lines[0] and len(lines[0]) < 400, lines[0]
    assert "Traceback" not in err and done.stdout == b""
    assert snapshot(config) == before
