#!/bin/sh
# The first process of a testbed node (pid 1 of its pid namespace). The
# supervisor starts it, inside fresh mount, pid and UTS namespaces, as
#     init.sh NODE_DIR deploy            the deployment environment
#     init.sh NODE_DIR system PARTITION  the system installed on /dev/sdaPARTITION
# It mounts the node's own files (NODE_DIR/fstab: /dev, /run, /root, /tmp, ...),
# starts the node's sshd and waits. Its exit code tells the supervisor why it
# ended (see kabin/testbed/node.py): 11 reboot, 12 power off, 13 halt,
# 14 sshd ended, 20 the node's files could not be mounted, 21 no system to boot.
set -u
node_dir=$1 mode=$2 part=${3:-}
. "$node_dir/node.env"
PATH=$KABIN_PATH
export PATH
/usr/bin/mount --all --fstab "$node_dir/fstab" || exit 20
echo "$KABIN_NODE" > /proc/sys/kernel/hostname
# busybox's reboot, poweroff and halt signal pid 1; so do the testbed's own
trap 'exit 11' TERM
trap 'exit 12' USR2
trap 'exit 13' USR1
case $mode in
deploy)
    set -- -o "ListenAddress=$KABIN_ADDRESS:$KABIN_MARKER_PORT" \
           -o "HostKey=$KABIN_INSTANCE_DIR/hostkeys/deploy" ;;
system)
    # sshd's ChrootDirectory makes the partition the root of every session;
    # a partition that holds no system (no shell, no os-release) does not boot
    root=/run/kabin/root
    mount "/dev/sda$part" "$root" 2>/dev/null || exit 21
    chroot "$root" /bin/sh -c 'test -f /etc/os-release' 2>/dev/null || exit 21
    # what the system's own init would mount (busybox's reboot needs /proc)
    [ -d "$root/proc" ] && mount -t proc kabin-proc "$root/proc"
    [ -d "$root/dev" ] && mount --rbind /dev "$root/dev"
    set -- -o "ChrootDirectory=$root" -o "HostKey=$KABIN_INSTANCE_DIR/hostkeys/system" ;;
*)
    exit 2 ;;
esac
/usr/sbin/sshd -D -e -r -f "$KABIN_INSTANCE_DIR/sshd_config" \
    -o "ListenAddress=$KABIN_ADDRESS:22" \
    -o "SetEnv=PATH=$KABIN_PATH KABIN_NODE=$KABIN_NODE KABIN_NODE_ADDRESS=$KABIN_ADDRESS" "$@" &
# wait returns when sshd ends, or runs a trap (which exits) when a signal comes
wait
exit 14
