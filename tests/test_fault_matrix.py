"""The fault matrix: every fault the netns testbed can inject, at each macro-step.

One kadeploy run per macro-step on the eight nodes, each node given another fault
the moment the macro-step starts (kadeploy's stderr says "MACRO-Variant: N node(s)
in"; kadeploy is stopped with SIGSTOP while the faults go in, so that none misses
the step). Whatever the fault, the run must end within the sum of its variants'
timeouts, every node OK or KO with a reason, no node left held, no relay or
command left running. (The VM tier's own faults: tests/test_vm_faults.py.)
"""

import os
import subprocess

import pytest
from deploy_support import (
    assert_ok_or_ko_with_a_reason,
    kadeploy_faulted_at,
    leftovers,
    padded_env,
    reset,
)

from kabin.testbed.instance import Testbed

pytestmark = pytest.mark.testbed

FAULTS = {   # one node each; the padded image lasts long enough for die-after-bytes to act
    "node-1": "never-returns",
    "node-2": "returns-on-boot=2",
    "node-3": "ssh-dead",
    "node-4": "bmc-dead",
    "node-5": "bmc-lies",
    "node-6": "die-after-bytes=4M",
    "node-7": "disk-full",
    "node-8": "slow-link=40mbit",
}
VARIANTS = {"SetDeploymentEnv": [("Untrusted", 30, 0)],
            "BroadcastEnv": [("Chain", 60, 0)],
            "BootNewEnv": [("Classical", 30, 0), ("HardReboot", 30, 0)]}
FORCE_STEPS = "&".join(f"{macro}|" + ",".join(f"{kind}:{timeout}:{retries}"
                                              for kind, timeout, retries in variants)
                       for macro, variants in VARIANTS.items())
# what kadeploy may take at most: every variant to its timeout, plus its own start and end
DEADLINE = sum(timeout * (retries + 1) for variants in VARIANTS.values()
               for _, timeout, retries in variants) + 60

# (macro-step, node) -> the outcome that follows from the fault (the others: OK or KO)
EXPECTED = {
    # a node that does not come back cannot pass any step
    **{(macro, "node-1"): "ko" for macro in VARIANTS},
    # a frozen sshd: no step can run on the node; but the last boot is checked, as
    # Kadeploy does, by port 22 accepting, which a frozen sshd still does
    ("SetDeploymentEnv", "node-3"): "ko", ("BroadcastEnv", "node-3"): "ko",
    ("BootNewEnv", "node-3"): "ok",
    # the first boot after the fault hangs: KO where it is the step's last chance, OK
    # where BootNewEnv falls from Classical to HardReboot (that boot is the second)
    ("SetDeploymentEnv", "node-2"): "ko", ("BroadcastEnv", "node-2"): "ok",
    ("BootNewEnv", "node-2"): "ok",
    # SSH reboots first: the BMC's fault shows only where IPMI is needed
    **{(macro, node): "ok" for macro in VARIANTS for node in ("node-4", "node-5")},
    # it dies in the broadcast, whenever the fault came before it
    ("SetDeploymentEnv", "node-6"): "ko", ("BroadcastEnv", "node-6"): "ko",
    # the broadcast's writes fail once the disk is full; later, the system is written already
    ("SetDeploymentEnv", "node-7"): "ko", ("BroadcastEnv", "node-7"): "ko",
    # a slow link is slow, not broken
    **{(macro, "node-8"): "ok" for macro in VARIANTS},
}


@pytest.fixture(scope="module")
def bed():
    """Eight nodes of the netns tier (slow-link needs it), their environments built."""
    if os.geteuid() != 0:
        pytest.skip("the testbed needs root")
    name = os.environ.get("KABIN_TESTBED_INSTANCE", "pytest") + "-matrix"
    bed = Testbed(name).up(8, netns=True, link_rate="100mbit", boot_delay=1.0)
    subprocess.run(["ka-testbed", "mkenv", "--instance", bed.instance, "-q"],
                   env=bed.env, check=True, capture_output=True, timeout=300)
    reset(bed)
    yield bed
    if os.environ.get("KABIN_TESTBED_KEEP") != "1":
        bed.down()


@pytest.fixture(scope="module")
def image(bed, tmp_path_factory):
    return padded_env(bed, tmp_path_factory.mktemp("matrix"), 24)


@pytest.mark.parametrize("macro", list(VARIANTS))
def test_every_fault_at_every_macro_step_ends_ok_or_ko_with_a_reason(bed, image, macro):
    try:
        code, out, stderr = kadeploy_faulted_at(
            bed, ["-a", str(image), "-m", "node-[1-8]", "--force-steps", FORCE_STEPS],
            macro, FAULTS, DEADLINE)
        assert_ok_or_ko_with_a_reason(out, bed.nodes, stderr)
        outcomes = {node: out[node]["status"] for node in FAULTS}
        expected = {node: EXPECTED.get((macro, node), outcomes[node]) for node in FAULTS}
        assert outcomes == expected, stderr
        assert code == (1 if "ko" in outcomes.values() else 0)
        assert leftovers(bed) == ([], {}), stderr
    finally:
        reset(bed)
