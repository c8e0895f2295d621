"""Shared fixtures: the testbed (a real local cluster) for tests marked ``testbed``."""

import os

import pytest

INSTANCE = os.environ.get("KABIN_TESTBED_INSTANCE", "pytest")
KEEP = os.environ.get("KABIN_TESTBED_KEEP") == "1"
SIZE = 8
BOOT_DELAY = 1.0


@pytest.fixture(scope="session")
def testbed():
    """A testbed instance of 8 nodes, up for the whole session (use with @pytest.mark.testbed).

    The instance is $KABIN_TESTBED_INSTANCE (default ``pytest``): reused if it is
    up already, brought down at the end of the session unless KABIN_TESTBED_KEEP=1.
    Its nodes boot in 1 s. Skipped (with the reason) when not root.

    The object (kabin.testbed.instance.Testbed) offers, as a stable API:

    - ``.instance`` (name), ``.config_dir``, ``.config`` (kabin Config), ``.nodes``
      (node-1 .. node-8), ``.env`` (os.environ plus KABIN_CONFIG and
      KABIN_TESTBED_INSTANCE: pass it to subprocesses running ka-* commands),
      ``.layout`` (addresses, paths: ``.layout.pxe_root``...), ``.address(node)``;
    - ``.status()`` -> {node: record} with power, booted (booting, deploy,
      system, hung, off), partition, detail, faults;
    - ``.fault(node, kind)``, ``.clear(node=None)`` (None: every node);
    - ``.power(node, action)`` (on, off, reset, cycle: without IPMI);
    - ``.wait_booted(nodes, what="up", timeout=60)``: deploy, system, system:P,
      hung, off or up (deploy or system); AssertionError naming the laggards;
    - ``.ssh(node, command)`` -> CompletedProcess (real OpenSSH), ``.ssh_argv``.

    Faults are cleared after every test that uses the fixture (see
    ``_testbed_faults_cleared``). A test that changes what nodes boot (PXE
    profiles, partitions) should put them back (e.g. remove its profile files
    and power-cycle them to the deployment environment).
    """
    if os.geteuid() != 0:
        pytest.skip("the testbed needs root (namespaces, loop devices, mounts)")
    from kabin.testbed.instance import Testbed

    bed = Testbed(INSTANCE).up(SIZE, boot_delay=BOOT_DELAY)
    yield bed
    if not KEEP:
        bed.down()


@pytest.fixture(autouse=True)
def _testbed_faults_cleared(request):
    """After a test that used the testbed, no node keeps a fault."""
    yield
    if "testbed" in request.fixturenames:
        request.getfixturevalue("testbed").clear()


@pytest.fixture
def config_dir(tmp_path):
    """The shipped sample configuration, its state (and database) moved into tmp_path."""
    import shutil

    from kabin import paths

    shutil.copytree(paths.sample_config_dir(), tmp_path / "cfg")
    server = tmp_path / "cfg" / "server.yml"
    server.write_text(server.read_text().replace("state_dir: /var/lib/kabin",
                                                 f"state_dir: {tmp_path / 'state'}"))
    return tmp_path / "cfg"
