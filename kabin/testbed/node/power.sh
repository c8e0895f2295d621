#!/bin/sh
# reboot, poweroff, halt, shutdown and systemctl on a testbed node: the
# supervisor acts on what the node's first process exits with, so these only
# signal it (as busybox's do), a moment later so that an SSH session running
# them ends cleanly. Never the real commands: they would act on the host.
set -u
signal() {
    (sleep 0.2; kill "-$1" 1) >/dev/null 2>&1 &
    exit 0
}
request=$(basename "$0")
if [ "$request" = systemctl ]; then
    request=${1:-}
fi
case $request in
reboot|kexec) signal TERM ;;
poweroff) signal USR2 ;;
halt) signal USR1 ;;
shutdown)
    case " $* " in
    *" -r "*|*" --reboot "*) signal TERM ;;
    *" -H "*|*" --halt "*) signal USR1 ;;
    *) signal USR2 ;;
    esac ;;
*)
    echo "$(basename "$0"): this testbed node only knows reboot, poweroff, halt and shutdown" >&2
    exit 1 ;;
esac
