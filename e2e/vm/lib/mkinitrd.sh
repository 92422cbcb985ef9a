#!/usr/bin/env bash
# Builds the VM suite's initramfs: busybox, the kernel modules the suite needs (in load order),
# the project's static binaries, the filesystem tools and fio with their shared libraries,
# the guest /init, the scenarios and the certificates (e2e/vm/lib/mkcerts.sh) in /etc/enbd/pki.
#
# usage: mkinitrd.sh <unpacked-kernel-dir> <bin-dir> <out.cpio.gz> <pki-dir>
set -euo pipefail

KDIR=$(realpath "$1"); BINDIR=$(realpath "$2"); OUT=$3; PKI=$(realpath "$4")
VM=$(cd "$(dirname "$0")/.." && pwd)
KVER=$(ls "$KDIR/usr/lib/modules")
ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT
# shellcheck source-path=SCRIPTDIR
. "$VM/lib/rootfs.sh"

rootfs_base
mkdir -p "$ROOT/scenarios"
rootfs_modules "$KDIR" ublk_drv nbd loop ext4 xfs
rootfs_static_bins "$BINDIR"
rootfs_fs_tools
rootfs_copy_tool "$(rootfs_tool fio)" /bin/fio

cp "$VM/guest/init" "$ROOT/init"; chmod +x "$ROOT/init"
cp -r "$VM/scenarios/." "$ROOT/scenarios/"
mkdir -p "$ROOT/etc/enbd/pki"
cp "$PKI"/*.pem "$ROOT/etc/enbd/pki/"
chmod 0600 "$ROOT"/etc/enbd/pki/*-key.pem

rootfs_pack "$OUT"
echo "mkinitrd: $(ls -s --block-size=M "$OUT" | cut -d' ' -f1) initramfs for $KVER, modules: $(xargs -n1 basename < "$ROOT/lib/modules/load.order" | tr '\n' ' ')" >&2
