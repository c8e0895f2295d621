#!/bin/sh
# Runs on the node once the image is written: makes the deployed partition
# bootable. The testbed's nodes boot a partition through their PXE profile, so
# this only records which partition holds the system.
set -eu
dest=${KADEPLOY_ENV_EXTRACTION_DIR:-/mnt/dest}
mkdir -p "$dest/boot"
echo "${KADEPLOY_DEPLOY_PART:-unknown}" > "$dest/boot/kabin-root"
