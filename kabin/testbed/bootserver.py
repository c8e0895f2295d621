"""The VM tier's boot server, on the frontend's side of the bridge: dnsmasq and HTTP.

dnsmasq (Debian's dnsmasq-base) serves DHCP and TFTP on the frontend's
interface. Its host entries and boot files are what ``ka-pxe dhcp-config``
prints for the instance's configuration (``kabin.pxe.dhcp``): this module only
adds the site's part, the interface, a static range (no lease but the
configured hosts) and the TFTP root, as a sysadmin's dnsmasq.conf would. The
HTTP server serves the same tree (iPXE and GRUB fetch kernels over HTTP faster
than over TFTP).
"""

import functools
import http.server
import logging
import shutil
import subprocess
import threading

from ..errors import SystemRequirementError
from ..pxe import dhcp
from .vm import die_with_parent

log = logging.getLogger(__name__)

DNSMASQ = "dnsmasq"
HTTP_PORT = 80


def dnsmasq_conf(lay, config, hosts_file):
    """The site part of dnsmasq's configuration; the hosts come from ``hosts_file``."""
    return "\n".join([
        "# Written by ka-testbed up --vm: the boot server of the VM tier.",
        "port=0",                                   # no DNS
        "interface=eth0", "bind-interfaces",
        f"dhcp-range={lay.frontend_address.rpartition('.')[0]}.0,static,255.255.0.0,1h",
        "dhcp-authoritative", "dhcp-no-override",
        # router advertisements: iPXE stops waiting for IPv6 autoconfiguration at once
        "enable-ra", "dhcp-range=::,constructor:eth0,ra-only",
        f"dhcp-leasefile={lay.dir / 'boot' / 'dnsmasq.leases'}",
        "enable-tftp", f"tftp-root={config.server.pxe_root}",
        "log-dhcp",
        f"conf-file={hosts_file}", ""])


def write_config(lay, config):
    """dnsmasq's files for the instance, under lay.dir/boot; the main file's path."""
    directory = lay.dir / "boot"
    directory.mkdir(exist_ok=True)
    hosts = directory / "hosts.conf"
    hosts.write_text(dhcp.render(config, "dnsmasq"), encoding="utf-8")
    main = directory / "dnsmasq.conf"
    main.write_text(dnsmasq_conf(lay, config, hosts), encoding="utf-8")
    return main


def start_dnsmasq(conf, log_path):
    """dnsmasq in the foreground (it dies with us: see the supervisor), logging to a file."""
    if shutil.which(DNSMASQ, path="/usr/sbin:/usr/bin:/sbin:/bin") is None:
        raise SystemRequirementError("dnsmasq is missing (apt-get install dnsmasq-base)")
    argv = [DNSMASQ, "--keep-in-foreground", f"--conf-file={conf}", "--log-facility=-",
            "--pid-file", "--user=root", "--group=root"]
    with open(log_path, "ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                preexec_fn=die_with_parent)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, fmt, *args):
        log.debug("http: %s " + fmt, self.address_string(), *args)


class HttpServer:
    """The PXE tree over HTTP, served by threads of this process."""

    def __init__(self, address, root, port=HTTP_PORT):
        handler = functools.partial(_QuietHandler, directory=str(root))
        try:
            self.server = http.server.ThreadingHTTPServer((address, port), handler)
        except OSError as exc:
            raise SystemRequirementError(f"cannot serve HTTP on {address}:{port}: "
                                         f"{exc.strerror}") from None
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="kabin-http",
                                       daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
