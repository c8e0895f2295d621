#!/bin/sh
# The disk-full fault of a testbed node (see kabin/testbed/faults.py):
#   diskfull.sh fill          fill every file system of the disk mounted read-write
#                             (/dev/sdaN in this mount namespace): a hidden file
#                             takes every free block, writes then fail (ENOSPC)
#   diskfull.sh unfill DEV..  remove that file again, the DEVs mounted or not
set -u
name=.kabin-disk-full
fill() {
    file=$1/$name
    size=$(($(stat -f -c '%f * %S' "$1")))
    while [ "$size" -ge 4096 ]; do
        have=$(stat -c %s "$file" 2>/dev/null || echo 0)
        fallocate -o "$have" -l "$size" "$file" 2>/dev/null || size=$((size / 2))
    done
}
mount_point() {
    while read -r dev point fstype options rest; do
        [ "$dev" = "$1" ] && { echo "$point"; return; }
    done < /proc/self/mounts
}
case ${1:-} in
fill)
    while read -r dev point fstype options rest; do
        case $dev,$options, in
        /dev/sda[0-9]*,rw,*) fill "$point" ;;
        esac
    done < /proc/self/mounts ;;
unfill)
    shift
    for dev; do
        point=$(mount_point "$dev")
        if [ -n "$point" ]; then
            rm -f "$point/$name"
        else
            unshare --mount sh -c 'mount "$1" /mnt 2>/dev/null && rm -f "/mnt/$2" && umount /mnt' \
                sh "$dev" "$name"
        fi
    done ;;
*)
    echo "usage: diskfull.sh fill | unfill DEVICE..." >&2
    exit 2 ;;
esac
exit 0
