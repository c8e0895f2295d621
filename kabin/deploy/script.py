"""``kadeploy --print-pipeline``: the deployment as a shell script of ka-* commands.

Each micro-step's command line is its job's own options rendered (``to_argv``),
so the script runs what kadeploy runs. The script keeps kadeploy's automaton:
each macro-step tries its variants in order, each one 1 + retries times, under
its timeout (``timeout``(1) stops the try; the nodes it had not finished are
tried again); the nodes a try leaves OK (its last command's ``--ok`` list) go
on to the next macro-step, the others end KO after the last variant. Nodes go
macro-step by macro-step in batches, where kadeploy streams them: the outcomes
are the same, the times longer. The final records go to stdout and to the
deployment log (``ka-stats record``), which is the script's last line.

Records are found by node in the commands' JSON lines, which start with the
node's name (``records.new``): ``{"node":"NAME","status":...``.
"""

import shlex

PROLOGUE = r"""#!/bin/sh
# kadeploy as ka-* commands (kadeploy --print-pipeline). Each macro-step tries its
# variants in order, each one 1 + RETRIES times within its timeout: the nodes a try
# leaves OK go on, the others try again, then the next variant, then end KO. The
# final records go to stdout (JSON lines) and to the deployment log.
set -u
work=$(mktemp -d "${TMPDIR:-/tmp}/kabin-pipeline.XXXXXX") || exit 70
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM
: > "$work/final"
export KABIN_PIPELINE_OK="$work/ok"

# macro_step: the nodes of $work/todo through the variants given as
# LABEL TIMEOUT RETRIES PIPELINE quadruples; OK nodes end in $work/todo, their
# records in $work/passed, the KO ones' final records in $work/final.
macro_step() {
    : > "$work/next"; : > "$work/passed"; : > "$work/out"; last=
    while [ $# -ge 4 ]; do
        label=$1 limit=$2 retries=$3 pipeline=$4 attempt=0; shift 4
        while [ -s "$work/todo" ] && [ "$attempt" -le "$retries" ]; do
            if [ "$attempt" -gt 0 ]; then echo "$label: retry $attempt/$retries" >&2
            else echo "$label: $(wc -l < "$work/todo") node(s)" >&2; fi
            : > "$work/ok"
            timeout -k 10 "$limit" sh -c "$pipeline" < "$work/todo" > "$work/out"
            grep -E '^\{"node":"[^"]*","status":"ok"' "$work/out" >> "$work/passed"
            cat "$work/ok" >> "$work/next"
            grep -vxF -f "$work/ok" "$work/todo" > "$work/left"
            mv "$work/left" "$work/todo"
            attempt=$((attempt + 1)); last=$label
        done
    done
    while read -r node; do
        grep -F "{\"node\":\"$node\"," "$work/out" | tail -n 1 > "$work/record"
        if [ -s "$work/record" ]; then cat "$work/record" >> "$work/final"
        else printf '{"node":"%s","status":"ko","step":"%s","error":"Timeout in the %s step"}\n' \
            "$node" "$last" "$last" >> "$work/final"
        fi
    done < "$work/todo"
    mv "$work/next" "$work/todo"
}
"""


def render(config_dir, clusters, env_spec):
    """The script; ``clusters``: [(name, nodes, macros)] as Deployment.plans gives them."""
    lines = [PROLOGUE, f"export KABIN_CONFIG={shlex.quote(str(config_dir))}"]
    for name, nodes, macros in clusters:
        lines.append(f"\n# cluster {name}: {len(nodes)} node(s)")
        lines.append("printf '%s\\n' " + " ".join(map(shlex.quote, nodes)) + ' > "$work/todo"')
        for variants in macros:
            lines += _macro_step(variants)
        lines.append('cat "$work/passed" >> "$work/final"')
    lines.append("ka-stats record --operation deploy --env "
                 f"{shlex.quote(env_spec)} < \"$work/final\"")
    return "\n".join(lines) + "\n"


def _macro_step(variants):
    out = [f"# {variants[0].macro}: " + ", ".join(
        f"{v.type} ({v.timeout:g} s, {v.retries} retries)" for v in variants)]
    call = ["macro_step \\"]
    for variant in variants:
        pipeline, skipped = _pipeline(variant)
        out += [f"# {variant.label}: step {s} has no command line (its data is not a file): "
                "left out" for s in skipped]
        call.append(f"  {variant.label} {variant.timeout:g} {variant.retries} "
                    f"{shlex.quote(pipeline)} \\")
    call[-1] = call[-1][:-2]
    return out + call


def _pipeline(variant):
    """One try of ``variant``: its micro-steps' command lines piped; the last one lists the
    nodes it leaves OK in $KABIN_PIPELINE_OK."""
    commands, skipped = [], []
    for step in variant.steps:
        argv = step.argv()
        if argv is not None:
            commands.append(argv)
        elif step.options is not None:
            skipped.append(step.name)
    if not commands:   # nothing to do: every node is OK
        return ('tee "$KABIN_PIPELINE_OK" | sed \'s/.*/{"node":"&","status":"ok"}/\'',
                skipped)
    last = commands.pop()
    end = last.index("--") if "--" in last else len(last)   # ka-exec's command comes last
    tail = (shlex.join(last[:end]) + ' --ok "$KABIN_PIPELINE_OK" --format json'
            + (" " + shlex.join(last[end:]) if last[end:] else ""))
    return " | ".join([*map(shlex.join, commands), tail]), skipped
