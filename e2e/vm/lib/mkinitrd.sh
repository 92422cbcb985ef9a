#!/usr/bin/env bash
# Builds the VM suite's initramfs: busybox, the kernel modules the suite needs (in load order),
# the project's static binaries, the filesystem tools and fio with their shared libraries,
# the guest /init and the scenarios.
#
# usage: mkinitrd.sh <unpacked-kernel-dir> <bin-dir> <out.cpio.gz>
set -euo pipefail

KDIR=$(realpath "$1"); BINDIR=$(realpath "$2"); OUT=$3
VM=$(cd "$(dirname "$0")/.." && pwd)
KVER=$(ls "$KDIR/usr/lib/modules")
ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT

mkdir -p "$ROOT"/{bin,sbin,etc,proc,sys,dev,run,tmp,mnt,var/lib,lib/modules,lib64,scenarios}
cp "$(command -v busybox)" "$ROOT/bin/busybox"
# ldd fails on a static executable: a dynamic busybox would not run without its libraries.
if ldd "$ROOT/bin/busybox" >/dev/null 2>&1; then
  echo "mkinitrd: busybox is dynamically linked (install busybox-static)" >&2; exit 1
fi

# Modules and their dependencies in load order; built-ins print "builtin X" and are skipped.
: > "$ROOT/lib/modules/load.order"
for m in ublk_drv nbd ext4 xfs; do
  modprobe -d "$KDIR/usr" -S "$KVER" --show-depends "$m" | awk '$1=="insmod"{print $2}'
done | awk '!seen[$0]++' | while read -r f; do
  cp "$f" "$ROOT/lib/modules/"
  echo "/lib/modules/$(basename "$f")" >> "$ROOT/lib/modules/load.order"
done

# The project's binaries (static: no libraries to copy). Debug info is stripped: it is most
# of their size, and every megabyte is decompressed by an emulated CPU at boot.
for b in "$BINDIR"/*; do
  [ -f "$b" ] || continue
  if command -v strip >/dev/null; then strip --strip-debug -o "$ROOT/bin/$(basename "$b")" "$b"
  else cp "$b" "$ROOT/bin/"; fi
done

# Dynamically linked tools, their libraries (and the loader) at the same paths.
copy_tool() { # <host path> <guest path>
  cp -L "$1" "$ROOT$2"
  ldd "$1" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
    mkdir -p "$ROOT$(dirname "$lib")"; [ -e "$ROOT$lib" ] || cp -L "$lib" "$ROOT$lib"
  done
}
tool() { command -v "$1" || { echo "mkinitrd: $1 not found (run e2e/setup-host.sh)" >&2; exit 1; }; }
copy_tool "$(tool mke2fs)" /sbin/mkfs.ext4
copy_tool "$(tool e2fsck)" /sbin/e2fsck
copy_tool "$(tool mkfs.xfs)" /sbin/mkfs.xfs
copy_tool "$(tool xfs_repair)" /sbin/xfs_repair
copy_tool "$(tool resize2fs)" /sbin/resize2fs
copy_tool "$(tool xfs_growfs)" /sbin/xfs_growfs
copy_tool "$(tool fio)" /bin/fio
cp /etc/mke2fs.conf "$ROOT/etc/"
ln -s e2fsck "$ROOT/sbin/fsck.ext4"
echo 'root:x:0:0:root:/:/bin/sh' > "$ROOT/etc/passwd"
echo 'root:x:0:' > "$ROOT/etc/group"
printf '127.0.0.1 localhost\n' > "$ROOT/etc/hosts"

cp "$VM/guest/init" "$ROOT/init"; chmod +x "$ROOT/init"
cp -r "$VM/scenarios/." "$ROOT/scenarios/"

(cd "$ROOT" && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT"
echo "mkinitrd: $(ls -s --block-size=M "$OUT" | cut -d' ' -f1) initramfs for $KVER, modules: $(xargs -n1 basename < "$ROOT/lib/modules/load.order" | tr '\n' ' ')" >&2
