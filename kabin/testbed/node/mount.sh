#!/bin/sh
# mount on a testbed node: the real one; while the node has the disk-full fault
# (/run/kabin/disk-full), what it mounts is filled before it returns.
/usr/bin/mount "$@" || exit
if [ -e /run/kabin/disk-full ]; then
    . /run/kabin/node.env
    sh "$KABIN_INSTANCE_DIR/bin/diskfull.sh" fill
fi
exit 0
