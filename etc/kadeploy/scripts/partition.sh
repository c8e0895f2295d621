#!/bin/sh
# Runs on the node in the deployment environment: creates the cluster's partition
# table on $KADEPLOY_BLOCK_DEVICE from its partitioning section (kabin exports it):
#   KADEPLOY_PART_LABEL   dos (MBR) or gpt
#   KADEPLOY_PARTITIONS   'N:role:size' words in order, e.g. "1:esp:64MiB 2:swap:64MiB
#                         3:deploy:1GiB 4:tmp:" (the last may have no size: the rest);
#                         roles: esp (EFI system, FAT), swap, prod, deploy, tmp
# Without KADEPLOY_PARTITIONS: swap 1, prod 2, deploy 3, tmp 4 of 16 + 64 + 256 MiB
# and the rest (the loopback testbed's 512 MiB disks).
set -eu
dev=${KADEPLOY_BLOCK_DEVICE:-/dev/sda}      # kabin exports the cluster's block_device
label=${KADEPLOY_PART_LABEL:-dos}
layout=${KADEPLOY_PARTITIONS:-"1:swap:16MiB 2:prod:64MiB 3:deploy:256MiB 4:tmp:"}

type_of() {
    case "$label:$1" in
        dos:swap) echo 82 ;; dos:esp) echo ef ;; dos:*) echo 83 ;;
        gpt:swap) echo S ;; gpt:esp) echo U ;; gpt:*) echo L ;;
        *) echo "partition.sh: unknown label $label" >&2; exit 2 ;;
    esac
}

table() {
    echo "label: $label"
    for entry in $layout; do
        role=${entry#*:}; size=${role#*:}; role=${role%%:*}
        echo "${size:+size=$size, }type=$(type_of "$role")"
    done
}

table | sfdisk --quiet --wipe always --wipe-partitions always "$dev"
# Tell the kernel about the new table (loop devices, as the testbed's disks are,
# need partx: see testbed-notes).
partx -u "$dev" 2>/dev/null || partprobe "$dev" 2>/dev/null || true
# An EFI system partition is formatted here: the bootloader step only mounts it.
if [ -n "${KADEPLOY_ESP_PART:-}" ]; then
    for i in 1 2 3 4 5 6 7 8 9 10; do [ -b "$KADEPLOY_ESP_PART" ] && break; sleep 0.2; done
    mkfs.vfat -F 32 -n KABIN-ESP "$KADEPLOY_ESP_PART" >/dev/null
fi
