"""Tree launch, the node's side: agents start agents, and all report to the frontend.

Standard library only (3.7+): sent to the nodes ahead of ``agent.py`` (see
``launch.agent_source``). With a tree launch (``treelaunch.TreeStart``) the frontend
starts a few agents itself; each starts the agents of its launch children with
OpenSSH's client, authenticated by the agent its own session forwards (the
frontend's key, lent, never copied), and passes on the program it was started
with. Every agent then connects back to the frontend (``links.connect_control``): its
commands and events go over that connection, not its SSH session, so an agent
lives on when the node that started it dies. An ssh that ends, for whatever
reason, is reported (``launch-ended``): the frontend starts that child itself if
it has not connected back.
"""

import os
import threading


def launch_children(job, program, emit):
    """Start the agent of each of ``job``'s launch children (each in a thread)."""
    import tempfile  # here, not at the top: only a tree launch needs it

    children = job.get("launch") or []
    if not children:
        return
    ssh = job["ssh"]
    options = list(ssh["options"])
    if ssh.get("known_hosts"):
        fd, path = tempfile.mkstemp(prefix="kabin-known-hosts-")
        with os.fdopen(fd, "w") as known:
            known.write(ssh["known_hosts"])
        options += ["-o", f"UserKnownHostsFile={path}"]
    for child in children:
        threading.Thread(target=_launch, args=(child, ssh, options, program, emit),
                         daemon=True).start()


def _launch(child, ssh, options, program, emit):
    """One child: ssh to it, send it the program and its job, report when ssh ends."""
    import marshal
    import shlex
    import subprocess

    code, source = program
    packed = marshal.dumps(child["job"])
    bootstrap = ssh["bootstrap"] % (len(code), len(source), len(packed))
    remote = " ".join(shlex.quote(a) for a in (ssh["python"], "-c", bootstrap,
                                                "kabin-chaincast-agent"))
    argv = ["ssh"] + options + ["-p", str(child["port"]), child["address"], "exec " + remote]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
    except OSError as exc:
        emit("launch-ended", node=child["name"], reason=f"cannot run ssh: {exc.strerror}")
        return
    try:
        proc.stdin.write(code + source + packed)
        proc.stdin.close()
    except OSError:
        pass  # ssh failed: its status says why
    said = proc.stderr.read().decode("utf-8", "replace").strip().splitlines()
    status = proc.wait()
    emit("launch-ended", node=child["name"],
         reason=f"ssh exit code {status}" + (f": {said[-1][:200]}" if said else ""))
