"""A deployment: options, the automata of each cluster, node states and the log.

``Deployment(config, options).run(records)`` yields each node's final record.
Nodes of several clusters run each through their own cluster's automata, at the
same time. Nodes another live run holds are refused (KO) unless ``force``; every
node ends ``deployed``, ``deploy_failed`` or ``aborted`` in the node states, and
every run is stored in the deployment log.
"""

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from .. import chaincast, db, envs, records, stats
from ..config import MACRO_STEPS, Variant as VariantConfig, eval_timeout
from ..errors import Interrupted, UsageError
from ..ssh import SshPool
from .automata import ABORTED, Engine, Variant
from . import custom as custom_mod
from .steps import Plan, build_steps

log = logging.getLogger(__name__)
progress = logging.getLogger("kabin.progress")

OPERATION = "deploy"
ABORT_GRACE = 30.0  # seconds the engines get to settle after Ctrl-C


@dataclass
class Options:
    env: str | None = None                 # NAME[@VERSION]
    owner: str | None = None
    env_version: int | None = None
    description: str | None = None         # -a DESC.yml (anonymous environment)
    partition: int | None = None           # -p
    block_device: str | None = None        # -b
    ssh_key_file: str | None = None        # -k: keys for root's authorized_keys on the system
    reformat_tmp: str | None = None        # -r FS
    custom_steps: dict = field(default_factory=dict)
    breakpoint: tuple | None = None        # (macro, micro or None)
    force_steps: dict | None = None        # macro -> [VariantConfig]
    no_kexec: bool = False
    disable_partitioning: bool = False
    disable_bootloader: bool = False
    force: bool = False
    debug: bool = False


def parse_breakpoint(text):
    """``BroadcastEnv`` or ``SetDeploymentEnv:format_deploy_part`` -> (macro, micro)."""
    macro, _, micro = text.partition(":")
    if macro not in MACRO_STEPS:
        raise UsageError(f"--breakpoint {text!r}: the macro-step is one of {', '.join(MACRO_STEPS)}")
    return macro, micro or None


def parse_force_steps(text):
    """``SetDeploymentEnv|Untrusted:200:1&BootNewEnv|Classical:150:0,HardReboot:120:1``."""
    automata = {}
    for part in filter(None, text.split("&")):
        macro, _, variants = part.partition("|")
        if macro not in MACRO_STEPS:
            raise UsageError(f"--force-steps: unknown macro-step {macro!r}")
        chosen = []
        for spec in variants.split(","):
            try:
                kind, timeout, retries = spec.split(":")
                eval_timeout(timeout, 1)
                chosen.append(VariantConfig(kind, timeout, int(retries)))
            except ValueError:
                raise UsageError(f"--force-steps: {spec!r} is not TYPE:TIMEOUT:RETRIES") from None
            if kind not in MACRO_STEPS[macro]:
                raise UsageError(f"--force-steps: {macro} has no variant {kind!r}")
        automata[macro] = chosen
    return automata


class Deployment:
    """One run of kadeploy over a set of nodes."""

    def __init__(self, config, options, stop=None, user=None):
        self.config, self.options = config, options
        self.stop = stop or threading.Event()
        self.user = user or envs.current_user()
        self.id = stats.new_deployment_id()
        self.started = time.time()
        self.env = self._environment()
        self.image = self._image()
        self._engines = []

    # ------------------------------------------------------------ setup

    def _environment(self):
        opts = self.options
        if opts.description:
            return envs.from_file(opts.description, self.user)
        if not opts.env:
            raise UsageError("give an environment: -e NAME[@VERSION] or -a DESC.yml")
        with db.open_database(self.config) as database:
            env = envs.resolve(database, opts.env, self.user, owner=opts.owner,
                               version=opts.env_version)
        envs.verify(env)
        return env

    def _image(self):
        env = self.env
        recorded = next((f.sha256 for f in env.files if f.role == "image"), None)
        return chaincast.open_image(env.image_file, env.image_kind,
                                    env.image_compression or "auto", sha256=recorded)

    def macros(self, cluster, plan, count):
        """The variants of each macro-step for ``cluster``, with their micro-steps."""
        automata = dict(cluster.automata)
        automata.update(self.options.force_steps or {})
        macros = []
        for macro in MACRO_STEPS:
            variants = [v for v in automata[macro]
                        if not (self.options.no_kexec and v.type == "Kexec")]
            if not variants:
                raise UsageError(f"{macro}: no variant left (--no-kexec removed them all)")
            macros.append([Variant(macro, v.type, eval_timeout(v.timeout, count), v.retries,
                                   self._customized(macro, v.type,
                                                    build_steps(macro, v.type, plan), plan))
                           for v in variants])
        return macros

    def _customized(self, macro, variant, steps, plan):
        """Apply --custom-steps: operations before, after or instead of micro-steps."""
        custom = self.options.custom_steps
        if variant == "Custom" and not (custom.get((macro, "send_environment")) or
                                        custom_mod.CustomOps()).substitute:
            raise UsageError("the BroadcastEnv Custom variant needs a substitute for "
                             "send_environment in --custom-steps")
        return custom_mod.apply(macro, steps, custom, plan)

    # ------------------------------------------------------------ running

    def run(self, items):
        """Deploy the OK records of ``items``; yield each node's final record once.

        KO input passes through at once. On KeyboardInterrupt the run stops
        cleanly: nodes in progress come out KO "Aborted" and their state becomes
        ``aborted``; then Interrupted is raised.
        """
        batch = yield from records.pass_ko(items)
        with db.open_database(self.config) as database:
            ready, refused = self._admit(database, batch)
            finals = list(refused)
            yield from refused
            for record in self._deploy(ready):
                finals.append(record)
                yield record
            aborted = [r for r in finals if r.get("error") == ABORTED]
            self._log(database, finals, aborted if self.stop.is_set() else [])
            self._summary(finals)
        if self.stop.is_set():
            raise Interrupted("interrupted: unfinished nodes are marked aborted")

    def _annotate(self, record):
        """The fields the deployment log keeps (ka-stats record reads the same)."""
        return dict(record, deployment=self.id, operation=OPERATION, env=self.env.spec,
                    user=self.user, start=round(self.started, 3),
                    duration=round(time.time() - self.started, 3))

    def _admit(self, database, batch):
        """Nodes known to the config and not held by another live run; the others KO."""
        ready, refused = [], []
        for record in batch:
            try:
                self.config.node(record["node"])
                ready.append(record)
            except UsageError as exc:
                refused.append(self._annotate(records.ko(record, "admit", str(exc))))
        held = stats.hold_nodes(database, [r["node"] for r in ready], OPERATION, self.id,
                                self.user, env=self.env.spec, force=self.options.force)
        refused += [self._annotate(records.ko(r, "admit", held[r["node"]]))
                    for r in ready if r["node"] in held]
        return [r for r in ready if r["node"] not in held], refused

    def _deploy(self, batch):
        """Run each cluster's engine at once; yield final records as they come."""
        if not batch:
            return
        by_cluster = {}
        for record in batch:
            by_cluster.setdefault(self.config.node(record["node"]).cluster, []).append(record)
        out = queue.Queue()
        with SshPool(self.config, target="deploy", stop=self.stop) as pool:
            for name, group in by_cluster.items():
                cluster = self.config.clusters[name]
                plan = Plan(self.config, cluster, self.env, self.image, self.options, pool)
                engine = Engine(self.macros(cluster, plan, len(group)), self.stop,
                                self.options.breakpoint)
                self._engines.append(engine)
                threading.Thread(target=lambda e=engine, g=group: [out.put(r) for r in e.run(g)],
                                 daemon=True, name=f"kabin-deploy-{name}").start()
            yield from self._drain(out, len(batch))

    def _drain(self, out, count):
        """Final records from the engines; Ctrl-C aborts them and drains what is left."""
        while count:
            try:
                record = out.get(timeout=None if not self.stop.is_set() else ABORT_GRACE)
            except KeyboardInterrupt:
                progress.info("interrupted: stopping %d node(s) in progress", count)
                self.stop.set()
                for engine in self._engines:
                    engine.abort()
                continue
            except queue.Empty:  # an engine did not settle in time: say so, do not hang
                log.error("%d node(s) did not stop within %s s", count, ABORT_GRACE)
                return
            count -= 1
            yield self._annotate(record)

    def _summary(self, finals):
        ko = [r for r in finals if not records.is_ok(r)]
        progress.info("deployment %s: %d/%d node(s) deployed in %.1f s", self.id,
                      len(finals) - len(ko), len(finals), time.time() - self.started)
        for record in ko:
            progress.info("  KO %s: %s (%s)", record["node"], record.get("error"),
                          record.get("step"))

    def _log(self, database, finals, aborted):
        """The deployment log and the final node states (deployed, deploy_failed, aborted)."""
        stats.store(database, finals)
        if aborted:
            stats.mark_aborted(database, sorted(r["node"] for r in aborted), self.id)

    # ------------------------------------------------------------ what would run

    def plans(self, nodes):
        """cluster name -> (node names, macros) without touching any node."""
        by_cluster = {}
        for node in nodes:
            by_cluster.setdefault(self.config.node(node).cluster, []).append(node)
        result = {}
        for name, members in by_cluster.items():
            cluster = self.config.clusters[name]
            plan = Plan(self.config, cluster, self.env, self.image, self.options, None)
            result[name] = (members, self.macros(cluster, plan, len(members)))
        return result

    def pipeline(self, nodes, config_dir):
        """The deployment as a shell script of ka-* commands (see ``script``)."""
        from . import script

        clusters = [(name, members, macros)
                    for name, (members, macros) in self.plans(nodes).items()]
        return script.render(config_dir, clusters, self.env.spec)

    def dry_run(self, items):
        """Each node's record with the variants it would go through; nothing is touched."""
        items = list(items)
        ready = [r for r in items if records.is_ok(r)]
        plans = self.plans([r["node"] for r in ready])
        for record in items:
            if not records.is_ok(record):
                yield record
                continue
            _, macros = plans[self.config.node(record["node"]).cluster]
            yield records.ok(record, "dry-run", 0.0, env=self.env.spec, plan={
                variants[0].macro: [f"{v.type} ({v.timeout:g} s, {v.retries} retries): "
                                    + ", ".join(s.name for s in v.steps) for v in variants]
                for variants in macros})
