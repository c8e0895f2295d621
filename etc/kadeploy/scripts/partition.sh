#!/bin/sh
# Runs on the node in the deployment environment. Creates the partition table of
# the cluster (swap 1, prod 2, deploy 3, tmp 4) on $KADEPLOY_BLOCK_DEVICE:
# 16 + 64 + 256 MiB, tmp takes the rest (the testbed's disks: 512 MiB by default).
set -eu
dev=${KADEPLOY_BLOCK_DEVICE:-/dev/sda}
sfdisk --quiet --wipe always --wipe-partitions always "$dev" <<TABLE
label: dos
size=16MiB, type=82
size=64MiB, type=83
size=256MiB, type=83
type=83
TABLE
# Tell the kernel about the new table (loop devices, as the testbed's disks are,
# need partx: see testbed-notes).
partx -u "$dev" 2>/dev/null || partprobe "$dev" 2>/dev/null || true
