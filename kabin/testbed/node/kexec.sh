#!/bin/sh
# kexec on a testbed node. 'kexec -l KERNEL [--initrd FILE] [--append PARAMS]'
# keeps a copy of the kernel and its parameters in /run/kabin; 'kexec -e' (or
# any reboot while a kernel is loaded) makes the supervisor boot that kernel
# without reading the PXE profile; 'kexec -u' forgets it. The real kexec would
# act on the host.
set -u
loaded=/run/kabin/kexec
action= kernel= initrd= append=
die() { echo "kexec: $*" >&2; exit 1; }
# like reboot: pid 1 ends the boot, a moment later so that an SSH session ends cleanly
boot_loaded() {
    (sleep 0.2; kill -TERM 1) >/dev/null 2>&1 &
    exit 0
}
while [ $# -gt 0 ]; do
    case $1 in
    -l|--load) action=${action:-load} ;;
    -e|--exec) action=exec ;;
    -u|--unload) action=unload ;;
    -f|--force) action=force ;;
    --initrd=*|--ramdisk=*) initrd=${1#*=} ;;
    --initrd|--ramdisk) shift; initrd=${1:-} ;;
    --append=*|--command-line=*) append=${1#*=} ;;
    --append|--command-line) shift; append=${1:-} ;;
    --type=*|-s|--kexec-file-syscall|-c|--kexec-syscall|-a|--kexec-syscall-auto|-x|--no-ifdown|--no-sync|--reuse-cmdline) ;;
    -t|--type) shift ;;
    -*) die "unsupported option $1 on a testbed node" ;;
    *) kernel=$1 ;;
    esac
    shift
done
[ -n "$kernel" ] && [ -z "$action" ] && action=force
case $action in
load|force)
    [ -n "$kernel" ] || die "no kernel given"
    [ -f "$kernel" ] || die "cannot open $kernel"
    [ -z "$initrd" ] || [ -f "$initrd" ] || die "cannot open $initrd"
    rm -rf "$loaded" && mkdir -p "$loaded" || exit 1
    cp "$kernel" "$loaded/kernel" || exit 1
    printf '%s\n' "$append" > "$loaded/cmdline"
    printf '%s\n' "$kernel" > "$loaded/source"
    [ -z "$initrd" ] || printf '%s\n' "$initrd" > "$loaded/initrd"
    [ "$action" = load ] && exit 0
    boot_loaded ;;
exec)
    [ -f "$loaded/kernel" ] || die "Nothing has been loaded!"
    boot_loaded ;;
unload)
    rm -rf "$loaded" ;;
*)
    die "nothing to do (use -l KERNEL, -e or -u)" ;;
esac
