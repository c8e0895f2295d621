#!/bin/sh
# partx on a testbed node. Its disk is a loop device that the kernel does not
# scan, shown as /dev/sda: the real partx looks its partitions up under that
# name and finds none, and cannot move a partition over an old one. So '-u' and
# '-d' drop every partition of the disk (delpart), '-u' and '-a' add the ones of
# the table (partx -a reads the device itself); then the node's /dev/sdaN follow.
set -u
. /run/kabin/node.env
partitions() {
    for part in /sys/block/$KABIN_LOOP/${KABIN_LOOP}p*; do
        [ -r "$part/dev" ] && echo "${part##*p}"
    done
}
rc=0
for disk; do :; done
case " $* " in
*" -u "*|*" --update "*|*" -d "*|*" --delete "*)
    for n in $(partitions); do
        delpart "$disk" "$n" || rc=1
    done ;;
esac
case " $* " in
*" -u "*|*" --update "*|*" -a "*|*" --add "*)
    /usr/bin/partx -a "$disk" || rc=$? ;;
*" -d "*|*" --delete "*) ;;
*)
    /usr/bin/partx "$@" || rc=$? ;;
esac
for dev in /dev/sda[0-9]*; do
    [ -e "$dev" ] && rm -f "$dev"
done
for n in $(partitions); do
    IFS=: read -r major minor < "/sys/block/$KABIN_LOOP/${KABIN_LOOP}p$n/dev"
    mknod -m 660 "/dev/sda$n" b "$major" "$minor"
done
exit $rc
