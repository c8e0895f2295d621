"""The VM tier's faults in the fault matrix: each at each macro-step, on real firmware.

Three machines (node-1 SeaBIOS, node-2 OVMF, node-3 SeaBIOS), each with its fault:
the firmware finds no boot device, the NIC loses its carrier, the disk is pulled.
One kadeploy run of realenv-tzst per macro-step; the faults go in the moment it
starts (deploy_support.kadeploy_faulted_at: kadeploy is stopped meanwhile) and stay
to the end of the run. Whatever the fault, the run ends within the sum of its
variants' timeouts, every node OK or KO with a reason, no node held, no kabin
process left. (The netns tier's faults: tests/test_fault_matrix.py.)
"""

import pytest
from deploy_support import assert_ok_or_ko_with_a_reason, kadeploy_faulted_at, leftovers
from vm_support import bring_up

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]

FAULTS = {"node-1": "firmware-hang", "node-2": "link-down", "node-3": "disk-removed"}
MACROS = ("SetDeploymentEnv", "BroadcastEnv", "BootNewEnv")
VARIANT = {"SetDeploymentEnv": "Untrusted", "BroadcastEnv": "Chain", "BootNewEnv": "Kexec"}
HEALTHY, FAULTED = 200, 60     # a step's timeout: healthy machines under TCG / faulted ones

# (macro-step, node) -> the outcome that follows from the fault (the others: OK or KO)
EXPECTED = {
    # nothing works on a machine that cannot reach the network or its disk
    **{(macro, node): "ko" for macro in MACROS for node in ("node-2", "node-3")},
    # the firmware hangs at the deployment environment's boot; BootNewEnv kexecs, so
    # a machine that passed SetDeploymentEnv never runs its firmware again
    ("SetDeploymentEnv", "node-1"): "ko", ("BroadcastEnv", "node-1"): "ok",
}


def force_steps(faulted):
    """Every macro-step one variant, no retry; the faulted one short (its hung machines
    wait it out), the others long enough for healthy machines under TCG."""
    return "&".join(f"{macro}|{VARIANT[macro]}:{FAULTED if macro == faulted else HEALTHY}:0"
                    for macro in MACROS)


def deadline(faulted):
    """What kadeploy may take at most: every step to its timeout, plus its start and end."""
    return FAULTED + HEALTHY * (len(MACROS) - 1) + 60


@pytest.fixture(scope="module")
def vms():
    bed = bring_up("vm-faults", len(FAULTS), real_envs=True, firmware="mixed")
    yield bed
    bed.down()


@pytest.mark.parametrize("macro", MACROS)
def test_every_vm_fault_at_every_macro_step_ends_ok_or_ko_with_a_reason(vms, macro):
    nodes = sorted(FAULTS)
    try:
        code, out, stderr = kadeploy_faulted_at(
            vms, ["-e", "realenv-tzst", "-m", ",".join(nodes), "--force-steps",
                  force_steps(macro)], macro, FAULTS, deadline(macro))
    finally:
        vms.clear()
        for node in nodes:          # out of a hung firmware: the next run starts from a boot
            vms.power(node, "cycle")
    assert_ok_or_ko_with_a_reason(out, nodes, stderr)
    outcomes = {node: out[node]["status"] for node in nodes}
    expected = {node: EXPECTED.get((macro, node), outcomes[node]) for node in nodes}
    assert outcomes == expected, stderr
    assert code == (1 if "ko" in outcomes.values() else 0)
    assert leftovers(vms) == ([], {}), stderr
