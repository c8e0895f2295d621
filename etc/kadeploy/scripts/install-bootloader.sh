#!/bin/sh
# Runs on the node once the image is written, the deploy partition mounted on
# $KADEPLOY_ENV_EXTRACTION_DIR: makes the deployed system boot from the disk.
#
# KADEPLOY_BOOTLOADER=grub (the default): GRUB, its grub.cfg written from the
# environment's kernel, initrd and params (KADEPLOY_ENV_KERNEL, _INITRD,
# _KERNEL_PARAMS, then the cluster's KADEPLOY_USER_KERNEL_PARAMS), root= the
# deploy partition:
#   BIOS  into the deploy partition's boot sector (what PXELINUX's chain.c32
#         hd0 N and GRUB's chainloader +1 start) and, on an MBR disk, the MBR too
#         (a disk boot: iPXE's sanboot, the firmware's own disk entry);
#   UEFI  into the EFI system partition ($KADEPLOY_ESP_PART): \EFI\kabin with a
#         boot entry placed after the existing ones (the network stays first),
#         and \EFI\BOOT\BOOTX64.EFI (what the firmware's disk entry starts).
# KADEPLOY_BOOTLOADER=activate: only mark the deploy partition active (the
# loopback testbed's emulated firmware reads the partition it names).
# The deploy partition is recorded in /boot/kabin-root in both cases.
set -eu
dest=${KADEPLOY_ENV_EXTRACTION_DIR:-/mnt/dest}
dev=${KADEPLOY_BLOCK_DEVICE:?KADEPLOY_BLOCK_DEVICE is not set}
part=${KADEPLOY_DEPLOY_PART:?KADEPLOY_DEPLOY_PART is not set}
mkdir -p "$dest/boot"
echo "$part" > "$dest/boot/kabin-root"

if [ "${KADEPLOY_BOOTLOADER:-grub}" = activate ]; then
    # (the kernel keeps its view of the partitions: only the flag changes)
    sfdisk --quiet --activate "$dev" "${KADEPLOY_DEPLOY_PART_NUM:?}" 2>/dev/null
    exit 0
fi

kernel=${KADEPLOY_ENV_KERNEL:?the environment names no boot.kernel}
params="root=$part ro ${KADEPLOY_ENV_KERNEL_PARAMS:-} ${KADEPLOY_USER_KERNEL_PARAMS:-}"
mkdir -p "$dest/boot/grub"
{
    echo "# written by kabin's install-bootloader.sh for ${KADEPLOY_ENV:-the environment}"
    echo "set timeout=1"
    echo "serial --unit=0 --speed=115200"
    echo "terminal_input serial console"
    echo "terminal_output serial console"
    echo "search --no-floppy --fs-uuid --set=root $(blkid -o value -s UUID "$part")"
    echo "menuentry '${KADEPLOY_ENV:-deployed system}' {"
    echo "    linux $kernel $params"
    [ -n "${KADEPLOY_ENV_INITRD:-}" ] && echo "    initrd $KADEPLOY_ENV_INITRD"
    echo "}"
} > "$dest/boot/grub/grub.cfg"

if [ -d /sys/firmware/efi ]; then
    esp=${KADEPLOY_ESP_PART:?a UEFI machine needs an EFI system partition: partitioning.partitions.esp}
    mkdir -p "$dest/boot/efi"
    mount "$esp" "$dest/boot/efi"
    trap 'umount "$dest/boot/efi"' EXIT
    before=$(efibootmgr | sed -n 's/^BootOrder: //p')
    grub-install --target=x86_64-efi --efi-directory="$dest/boot/efi" \
        --boot-directory="$dest/boot" --bootloader-id=kabin --recheck
    grub-install --target=x86_64-efi --efi-directory="$dest/boot/efi" \
        --boot-directory="$dest/boot" --removable --no-nvram
    added=$(efibootmgr | sed -n 's/^Boot\([0-9A-F]\{4\}\)\* kabin.*/\1/p' | head -n 1)
    others=$(echo "$before" | tr ',' '\n' | grep -v "^$added\$" | paste -sd, -)
    [ -n "$added" ] && [ -n "$others" ] && efibootmgr -q -o "$others,$added"
else
    if [ "${KADEPLOY_PART_LABEL:-dos}" = dos ]; then
        grub-install --target=i386-pc --boot-directory="$dest/boot" "$dev"
        sfdisk --quiet --activate "$dev" "${KADEPLOY_DEPLOY_PART_NUM:?}" 2>/dev/null || true
    fi
    # (GRUB warns that blocklists in a partition are fragile: they are what chain.c32 needs)
    if ! out=$(grub-install --target=i386-pc --boot-directory="$dest/boot" --force "$part" 2>&1)
    then
        echo "$out" >&2
        exit 1
    fi
fi
