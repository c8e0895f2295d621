#!/bin/sh
# Runs on the node once the image is written: makes the deployed partition
# bootable. It becomes the active partition, the one the MBR's boot code starts
# (a local disk boot: PXELINUX's LOCALBOOT 0, iPXE's sanboot or exit, the BIOS
# booting the disk); the PXE profile may also name the partition itself
# (chain.c32 hd0 N). The partition is recorded in /boot/kabin-root too.
set -eu
dest=${KADEPLOY_ENV_EXTRACTION_DIR:-/mnt/dest}
mkdir -p "$dest/boot"
echo "${KADEPLOY_DEPLOY_PART:-unknown}" > "$dest/boot/kabin-root"
if [ -n "${KADEPLOY_BLOCK_DEVICE:-}" ] && [ -n "${KADEPLOY_DEPLOY_PART_NUM:-}" ]; then
    # (the kernel keeps its view of the partitions: only the flag changes)
    sfdisk --quiet --activate "$KADEPLOY_BLOCK_DEVICE" "$KADEPLOY_DEPLOY_PART_NUM" 2>/dev/null
fi
