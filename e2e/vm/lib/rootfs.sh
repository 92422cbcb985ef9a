#!/usr/bin/env bash
# Shared pieces of the guest root filesystems booted under qemu: the VM suite's initramfs
# (e2e/vm/lib/mkinitrd.sh) and the cluster node's (e2e/cluster/lib/mknode-initrd.sh).
# Sourced, not run; every function writes below $ROOT, which the caller sets.

# The skeleton: directories, a static busybox, passwd/group/hosts.
rootfs_base() {
  mkdir -p "$ROOT"/{bin,sbin,etc,proc,sys,dev,run,tmp,mnt,var/lib,lib/modules,lib64}
  cp "$(command -v busybox)" "$ROOT/bin/busybox"
  # ldd fails on a static executable: a dynamic busybox would not run without its libraries.
  if ldd "$ROOT/bin/busybox" >/dev/null 2>&1; then
    echo "rootfs: busybox is dynamically linked (install busybox-static)" >&2; return 1
  fi
  echo 'root:x:0:0:root:/:/bin/sh' > "$ROOT/etc/passwd"
  echo 'root:x:0:' > "$ROOT/etc/group"
  printf '127.0.0.1 localhost\n' > "$ROOT/etc/hosts"
}

# Kernel modules and their dependencies, in load order, into /lib/modules/ with the order in
# /lib/modules/load.order (read by the guest's init). Built-ins ("builtin X") are skipped.
# usage: rootfs_modules <unpacked-kernel-dir> <module>...
rootfs_modules() {
  local kdir=$1 kver; shift
  kver=$(ls "$kdir/usr/lib/modules")
  : > "$ROOT/lib/modules/load.order"
  for m in "$@"; do
    modprobe -d "$kdir/usr" -S "$kver" --show-depends "$m" | awk '$1=="insmod"{print $2}'
  done | awk '!seen[$0]++' | while read -r f; do
    cp "$f" "$ROOT/lib/modules/"
    echo "/lib/modules/$(basename "$f")" >> "$ROOT/lib/modules/load.order"
  done
}

# Static executables from a directory into /bin. Debug info is stripped: it is most of their
# size, and every megabyte is decompressed by an emulated CPU at boot.
rootfs_static_bins() { # <dir>
  local b
  for b in "$1"/*; do
    [ -f "$b" ] || continue
    if command -v strip >/dev/null; then strip --strip-debug -o "$ROOT/bin/$(basename "$b")" "$b"
    else cp "$b" "$ROOT/bin/"; fi
  done
}

# A dynamically linked tool with its libraries (and the loader) at the same paths.
rootfs_copy_tool() { # <host path> <guest path>
  mkdir -p "$ROOT$(dirname "$2")"
  cp -L "$1" "$ROOT$2"
  ldd "$1" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
    mkdir -p "$ROOT$(dirname "$lib")"; [ -e "$ROOT$lib" ] || cp -L "$lib" "$ROOT$lib"
  done
}

rootfs_tool() { # <name>: its host path, or an error naming setup-host.sh
  command -v "$1" || { echo "rootfs: $1 not found (run e2e/setup-host.sh)" >&2; return 1; }
}

# The filesystem tools the node plugin runs (mkfs, fsck, grow) and their configuration.
rootfs_fs_tools() {
  rootfs_copy_tool "$(rootfs_tool mke2fs)" /sbin/mkfs.ext4
  rootfs_copy_tool "$(rootfs_tool e2fsck)" /sbin/e2fsck
  rootfs_copy_tool "$(rootfs_tool mkfs.xfs)" /sbin/mkfs.xfs
  rootfs_copy_tool "$(rootfs_tool xfs_repair)" /sbin/xfs_repair
  rootfs_copy_tool "$(rootfs_tool resize2fs)" /sbin/resize2fs
  rootfs_copy_tool "$(rootfs_tool xfs_growfs)" /sbin/xfs_growfs
  cp /etc/mke2fs.conf "$ROOT/etc/"
  ln -sf e2fsck "$ROOT/sbin/fsck.ext4"
}

# $ROOT as a gzip'd newc cpio.
rootfs_pack() { # <out.cpio.gz>
  (cd "$ROOT" && find . | cpio -o -H newc --quiet | gzip -1) > "$1"
}
