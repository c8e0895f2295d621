"""The testbed's boot firmware, its layout and its configuration: pure logic, no root."""

from dataclasses import replace

import pytest

from kabin import config
from kabin.errors import UsageError
from kabin.testbed import configgen, faults, firmware, layout, units
from kabin.testbed.firmware import Kernel, LocalBoot, NoBoot


@pytest.fixture
def roots(tmp_path):
    pxe, http = tmp_path / "tftp", tmp_path / "http"
    for directory in ("pxelinux.cfg", "ipxe", "grub", "kernels"):
        (pxe / directory).mkdir(parents=True)
    (http / "envs").mkdir(parents=True)
    return pxe, http


def boot(roots, method, name, text, file=None):
    pxe, http = roots
    path = firmware.profile_candidates(pxe, method, name)[0] if file is None else pxe / file
    path.write_text(text)
    return firmware.network_boot(pxe, http, method, name)


@pytest.mark.parametrize("naming, expected", [
    ("ip_hex", "7F000103"), ("ip", "127.0.1.3"), ("mac", "01-02-00-7f-00-01-03"),
    ("hostname", "node-3.grid"), ("hostname_short", "node-3")])
def test_profile_names(naming, expected):
    assert firmware.profile_name(naming, "node-3.grid", "127.0.1.3", "02:00:7F:00:01:03") == expected


def test_pxelinux_kernel_with_initrd_in_append(roots):
    text = ("PROMPT 0\nDEFAULT deploy\nLABEL local\n  LOCALBOOT 0\nLABEL deploy\n"
            "  KERNEL kernels/vmlinuz\n  APPEND initrd=kernels/initrd.img console=ttyS0 rw\n")
    out = boot(roots, "pxelinux", "7F000101", text)
    assert out == Kernel(roots[0] / "kernels/vmlinuz", roots[0] / "kernels/initrd.img",
                         "console=ttyS0 rw", source="kernels/vmlinuz")


@pytest.mark.parametrize("text, expected", [
    ("DEFAULT l\nLABEL l\n  COM32 chain.c32\n  APPEND hd0 3\n", LocalBoot(3)),
    ("default l\nlabel l\n  kernel /syslinux/chain.c32\n  append hd0 2\n", LocalBoot(2)),
    ("DEFAULT l\nLABEL l\n  COM32 chain.c32\n  APPEND hd0\n", LocalBoot(None)),
    ("DEFAULT l\nLABEL l\n  LOCALBOOT 0\n", LocalBoot(None)),
    ("DEFAULT l\nLABEL l\n  COM32 chain.c32\n  APPEND hd1 1\n", NoBoot),
    ("DEFAULT menu.c32\nLABEL a\n  LOCALBOOT 0\nLABEL b\n  MENU DEFAULT\n  COM32 chain.c32\n"
     "  APPEND hd0 4\n", LocalBoot(4)),
    ("PROMPT 0\nTIMEOUT 10\n", NoBoot),
])
def test_pxelinux_local_boots(roots, text, expected):
    out = boot(roots, "pxelinux", "7F000101", text)
    assert out == expected if not isinstance(expected, type) else isinstance(out, expected)


def test_pxelinux_default_names_a_kernel_directly(roots):
    out = boot(roots, "pxelinux", "x", "DEFAULT kernels/k root=/dev/sda3\n")
    assert out.path == roots[0] / "kernels/k" and out.cmdline == "root=/dev/sda3"


def test_missing_profile_falls_back_to_default_then_to_the_disk(roots):
    pxe, http = roots
    assert firmware.network_boot(pxe, http, "pxelinux", "7F000101") == LocalBoot(None)
    (pxe / "pxelinux.cfg" / "default").write_text("DEFAULT l\nLABEL l\n  KERNEL kernels/d\n")
    assert firmware.network_boot(pxe, http, "pxelinux", "7F000101").path == pxe / "kernels/d"
    assert isinstance(firmware.network_boot(pxe, http, "grub", "7F000101"), NoBoot)


def test_ipxe_kernel_initrd_boot_over_http(roots):
    text = ("#!ipxe\ndhcp || goto fail\nkernel --name k http://10.0.0.1:8080/envs/vmlinuz "
            "root=/dev/sda3 quiet\ninitrd tftp://10.0.0.1/kernels/initrd\nboot\n:fail\nshell\n")
    out = boot(roots, "ipxe", "7F000101", text)
    assert out == Kernel(roots[1] / "envs/vmlinuz", roots[0] / "kernels/initrd",
                         "root=/dev/sda3 quiet", source="http://10.0.0.1:8080/envs/vmlinuz")


@pytest.mark.parametrize("text", ["#!ipxe\nsanboot --no-describe --drive 0x80\n", "#!ipxe\nexit\n",
                                  "#!ipxe\necho nothing to do\n"])
def test_ipxe_local_disk(roots, text):
    assert boot(roots, "ipxe", "7F000101", text) == LocalBoot(None)


def test_ipxe_chains_to_a_script_and_to_pxelinux(roots):
    pxe, _ = roots
    (pxe / "next.ipxe").write_text("#!ipxe\nkernel kernels/k\nboot\n")
    assert boot(roots, "ipxe", "n1", "#!ipxe\nchain next.ipxe\n").path == pxe / "kernels/k"
    (pxe / "pxelinux.cfg" / "n1").write_text("DEFAULT l\nLABEL l\n COM32 chain.c32\n APPEND hd0 3\n")
    assert boot(roots, "ipxe", "n1", "#!ipxe\nchain tftp://s/pxelinux.0\n") == LocalBoot(3)


def test_ipxe_needs_its_shebang_and_loops_end(roots):
    assert isinstance(boot(roots, "ipxe", "n1", "kernel k\nboot\n"), NoBoot)
    loop = boot(roots, "ipxe", "n1", "#!ipxe\nchain ipxe/n1\n")
    assert isinstance(loop, NoBoot) and "chained" in loop.reason


def test_loaders_chain_to_each_other(roots):
    pxe, _ = roots
    local = "DEFAULT l\nLABEL l\n  COM32 chain.c32\n  APPEND hd0 3\n"
    (pxe / "pxelinux.cfg" / "other").write_text(local)
    (pxe / "ipxe" / "n1").write_text("#!ipxe\nsanboot --no-describe --drive 0x80\n")
    (pxe / "grub" / "grub.cfg-n1").write_text("menuentry g {\n  set root=(hd0,msdos4)\n"
                                             "  chainloader +1\n}\n")
    # iPXE tells PXELINUX its file through DHCP option 209 (with 210, its prefix)
    chain = ("#!ipxe\nset 209:string pxelinux.cfg/other\nset 210:string tftp://${next-server}/\n"
             "chain tftp://${next-server}/pxelinux.0\n")
    assert boot(roots, "ipxe", "n2", chain) == LocalBoot(3)
    # PXELINUX and GRUB load iPXE as a kernel: its initrd or its command line is its script
    to_ipxe = "DEFAULT k\nLABEL k\n  KERNEL ipxe.lkrn\n  INITRD ipxe/n1\n"
    assert boot(roots, "pxelinux", "n1", to_ipxe) == LocalBoot(None)
    grub_to_pxelinux = ("menuentry c {\n  linux16 /ipxe.lkrn dhcp \\&\\& set 209:string "
                        "pxelinux.cfg/other \\&\\& chain tftp://\\$\\{next-server\\}/pxelinux.0\n}\n")
    assert boot(roots, "grub", "n3", grub_to_pxelinux) == LocalBoot(3)
    # PXELINUX runs GRUB as a PXE image; GRUB's dispatcher finds the node's file by $prefix
    assert boot(roots, "pxelinux", "n1", "DEFAULT g\nLABEL g\n  PXE grub/i386-pc/core.0\n") == \
        LocalBoot(4)
    assert boot(roots, "grub", "n9", "configfile $prefix/grub.cfg-n1\n",
                file="grub/grub.cfg") == LocalBoot(4)


def test_grub_default_entry_and_kernels(roots):
    text = ("set default=1\nset timeout=0\nmenuentry 'local' {\n  set root=(hd0,msdos3)\n"
            "  chainloader +1\n}\nmenuentry \"deploy\" --id dep {\n  linux /kernels/k console=ttyS0\n"
            "  initrd (tftp)/kernels/i\n}\n")
    out = boot(roots, "grub", "7F000101", text)
    assert out == Kernel(roots[0] / "kernels/k", roots[0] / "kernels/i", "console=ttyS0",
                         source="/kernels/k")
    assert boot(roots, "grub", "7F000101", text.replace("default=1", "default=0")) == LocalBoot(3)
    assert boot(roots, "grub", "7F000101", text.replace("default=1", "default=dep")).path


@pytest.mark.parametrize("body, expected", [
    ("set root='hd0,msdos2'\nlinux /boot/vmlinuz root=/dev/sda2", Kernel(None, None, "root=/dev/sda2",
                                                                     2, "/boot/vmlinuz")),
    ("linux (hd0,gpt4)/vmlinuz root=/dev/sda4", Kernel(None, None, "root=/dev/sda4", 4,
                                                       "(hd0,gpt4)/vmlinuz")),
    ("set root=(hd0)\nchainloader +1", LocalBoot(None)),
    ("exit", LocalBoot(None)),
])
def test_grub_local_disk(roots, body, expected):
    assert boot(roots, "grub", "n", "menuentry x {\n" + body + "\n}\n") == expected


@pytest.mark.parametrize("cmdline, root", [("console=ttyS0 root=/dev/sda3 rw", 3),
                                           ("root=UUID=1234-abcd", "UUID=1234-abcd"),
                                           ("root=/dev/nfs", None), ("quiet", None)])
def test_root_of(cmdline, root):
    assert firmware.root_of(cmdline) == root


def test_deploy_kernel_is_told_by_content(tmp_path):
    (tmp_path / "a").write_bytes(firmware.DEPLOY_MAGIC + b"\nanything")
    (tmp_path / "b").write_text("an environment's kernel")
    assert firmware.is_deploy_kernel(tmp_path / "a") and not firmware.is_deploy_kernel(tmp_path / "b")


def test_paths_stay_under_their_roots(roots):
    out = boot(roots, "pxelinux", "n", "DEFAULT l\nLABEL l\n KERNEL ../../etc/passwd\n")
    assert out.path == roots[0] / "etc/passwd"


# ---------------------------------------------------------------- layout, units, faults

def test_default_instance_addresses_match_the_sample():
    lay = layout.Layout("default", 0, 300)
    assert lay.node_address(0) == "127.0.1.1" and lay.bmc_address(7) == "127.0.2.8"
    assert lay.mac(4) == "02:00:7f:00:01:05"
    assert lay.node_address(254) == "127.0.3.1" and lay.bmc_address(299) == "127.0.4.46"
    assert str(lay.pxe_root) == "/var/lib/kabin/tftpboot"


def test_other_instances_have_their_own_ranges_and_dirs():
    lay = layout.Layout("alice", 3, 4, netns=True)
    assert lay.node_address(1) == "10.3.1.2" and lay.bmc_address(1) == "127.3.2.2"
    assert lay.pxe_root == layout.TESTBED_ROOT / "alice" / "tftpboot"
    assert lay.node_netns(0) == "kt-alice.node-1"
    assert not layout.Layout("alice-2", 4, 1).node_netns(0).startswith(lay.netns_prefix)
    with pytest.raises(UsageError):
        lay.index_of("node-5")
    with pytest.raises(UsageError):
        layout.check_instance_name("../x")


def test_switch_groups_are_contiguous_and_balanced():
    assert [list(g) for g in layout.switch_groups(5, 2)] == [[0, 1, 2], [3, 4]]
    assert len(layout.switch_groups(1, 4)) == 1


@pytest.mark.parametrize("text, value", [("16M", 16 << 20), ("1GiB", 1 << 30), ("512", 512)])
def test_sizes(text, value):
    assert units.parse_size(text) == value


@pytest.mark.parametrize("text, value", [("100mbit", 10**8), ("1gbit", 10**9), ("2.5mbit", 2500000),
                                         ("1mbps", 8 * 10**6)])
def test_rates(text, value):
    assert units.parse_rate(text) == value


@pytest.mark.parametrize("text", ["never-returns=1", "returns-on-boot", "returns-on-boot=0",
                                  "die-after-bytes=lots", "sometimes", "slow-link=fast"])
def test_bad_faults_are_refused(text):
    with pytest.raises(UsageError):
        faults.parse(text)


def test_faults_parse():
    assert faults.parse("die-after-bytes=16M").value == 16 << 20
    assert faults.parse("returns-on-boot=3") == faults.Fault("returns-on-boot", 3, "returns-on-boot=3")


# ---------------------------------------------------------------- the generated configuration

def write_config(tmp_path, lay, switches=2):
    directory = tmp_path / "config"
    directory.mkdir()
    groups = layout.switch_groups(lay.size, switches)
    configgen._dump(directory / "server.yml", configgen.server_data(lay), lay)
    configgen._dump(directory / "clusters.yml", configgen.clusters_data(lay), lay)
    configgen._dump(directory / "cluster-local.yml", configgen.cluster_data(lay, groups), lay)
    (directory / "scripts").symlink_to(config.paths.sample_config_dir() / "scripts")
    return config.Config(directory)


def test_default_instance_config_is_the_sample(tmp_path):
    made = write_config(tmp_path, layout.Layout("default", 0, 8))
    sample = config.Config(config.paths.sample_config_dir())
    assert made.nodes.keys() == sample.nodes.keys()
    for name, node in sample.nodes.items():
        assert made.nodes[name] == node
    assert made.server == sample.server
    made_cluster, sample_cluster = made.clusters["local"], sample.clusters["local"]
    for field in ("remoteops", "pxe", "timeouts", "automata", "switches"):
        assert getattr(made_cluster, field) == getattr(sample_cluster, field), field
    # the same scripts, in the instance's configuration directory
    for field, script in (("partitioning", "script"), ("boot", "install_bootloader")):
        mine, theirs = getattr(made_cluster, field), getattr(sample_cluster, field)
        assert getattr(mine, script).name == getattr(theirs, script).name
        assert replace(mine, **{script: None}) == replace(theirs, **{script: None})


def test_big_instance_config_has_a_node_entry_per_address_block(tmp_path):
    made = write_config(tmp_path, layout.Layout("big", 5, 300), switches=3)
    assert len(made.nodes) == 300
    assert made.node("node-255").address == "127.5.3.1"
    assert made.node("node-300").bmc.address == "127.5.4.46"
    assert made.server.pxe_root == layout.TESTBED_ROOT / "big" / "tftpboot"
    assert [len(s.nodes) for s in made.clusters["local"].switches] == [100, 100, 100]
