#!/usr/bin/env bash
# Builds the cluster node's root filesystem tree and the small initramfs that mounts it.
#
# The root (a directory; node-vm.sh turns it into the ext4 disk the guest boots from, with
# mke2fs -d): the VM suite's base (busybox, filesystem tools, via e2e/vm/lib/rootfs.sh), the
# whole kernel module tree with a real modprobe (netfilter and friends are loaded on demand by
# nft, iptables and kube-proxy), containerd + runc + the CNI plugins from the host's Debian
# packages, iptables (nft backend) and nft, and the node's /init with its containerd, CNI,
# kubelet and kube-proxy configuration. The initramfs: busybox and virtio_blk, enough to mount
# that disk and switch_root into it (runc's pivot_root(2) refuses the initial ramfs as root,
# and a disk is read on demand where a big initramfs is decompressed whole by an emulated CPU).
#
# usage: mknode-root.sh <unpacked-kernel-dir> <root-dir> <out-initrd.cpio.gz>
set -euo pipefail

KDIR=$(realpath "$1"); NODE_ROOT=$2; OUT=$3
CLUSTER=$(cd "$(dirname "$0")/.." && pwd)
REPO=$(cd "$CLUSTER/../.." && pwd)
KVER=$(ls "$KDIR/usr/lib/modules")
# shellcheck source=../../vm/lib/rootfs.sh source-path=SCRIPTDIR
. "$REPO/e2e/vm/lib/rootfs.sh"

# The initramfs.
ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT
rootfs_base
rootfs_modules "$KDIR" virtio_blk ext4
cp "$CLUSTER/guest/initrd-init" "$ROOT/init"; chmod +x "$ROOT/init"
rootfs_pack "$OUT"
rm -rf "$ROOT"

# The root disk's tree.
rm -rf "$NODE_ROOT"; mkdir -p "$NODE_ROOT"
ROOT=$(realpath "$NODE_ROOT")
trap - EXIT
rootfs_base
mkdir -p "$ROOT"/{usr/bin,usr/sbin,usr/lib/cni,etc/cni/net.d,etc/containerd,etc/enbd,var/lib/enbd-node}

# Kernel modules: the whole tree (25 MB of .ko.xz, not worth pruning) with modules.dep for the
# guest's modprobe; the kernel calls /sbin/modprobe itself for nf_tables expressions, xt
# matches, overlay and so on.
# Decompressed here once: an emulated CPU unpacking .ko.xz at every modprobe was most of the
# node's module loading time.
mkdir -p "$ROOT/lib/modules/$KVER"
cp -r "$KDIR/usr/lib/modules/$KVER/." "$ROOT/lib/modules/$KVER/"
find "$ROOT/lib/modules/$KVER" -name '*.ko.xz' -exec xz -d {} +
depmod -b "$ROOT" "$KVER" 2>&1 | grep -v WARNING >&2 || true
rootfs_copy_tool "$(rootfs_tool kmod)" /usr/bin/kmod
for l in modprobe insmod rmmod lsmod depmod modinfo; do ln -sf ../usr/bin/kmod "$ROOT/sbin/$l"; done

rootfs_fs_tools

# The container runtime, from Debian's containerd, runc and containernetworking-plugins.
rootfs_copy_tool "$(rootfs_tool containerd)" /usr/bin/containerd
rootfs_copy_tool "$(rootfs_tool containerd-shim-runc-v2)" /usr/bin/containerd-shim-runc-v2
rootfs_copy_tool "$(rootfs_tool ctr)" /usr/bin/ctr
rootfs_copy_tool "$(rootfs_tool runc)" /usr/sbin/runc
for p in bridge host-local loopback portmap; do
  [ -x "/usr/lib/cni/$p" ] || { echo "mknode-root: /usr/lib/cni/$p missing (run e2e/setup-host.sh --cluster)" >&2; exit 1; }
  rootfs_copy_tool "/usr/lib/cni/$p" "/usr/lib/cni/$p"
done

# Packet filtering: iptables through its nft backend (the CNI bridge and portmap plugins call
# it), nft for kube-proxy's nftables mode. The xtables extensions are dlopen'ed: copied whole.
rootfs_copy_tool "$(rootfs_tool xtables-nft-multi)" /usr/sbin/xtables-nft-multi
for l in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
  ln -sf xtables-nft-multi "$ROOT/usr/sbin/$l"
done
# Their directory is compiled in (/usr/lib/<triplet>/xtables); ldd names /lib/<triplet>, a
# symlink on a merged-/usr host but a directory in the guest: the real path counts.
xt=$(realpath "$(dirname "$(ldd "$(command -v xtables-nft-multi)" | grep -o '/[^ ]*libxtables[^ ]*')")/xtables")
[ -f "$xt/libxt_comment.so" ] || { echo "mknode-root: no xtables extensions in $xt" >&2; exit 1; }
mkdir -p "$ROOT$xt"; cp -r "$xt/." "$ROOT$xt/"
rootfs_copy_tool "$(rootfs_tool nft)" /usr/sbin/nft
# util-linux mount/umount: kubelet's mount options go beyond busybox's.
rootfs_copy_tool "$(rootfs_tool mount)" /usr/bin/mount
rootfs_copy_tool "$(rootfs_tool umount)" /usr/bin/umount
# util-linux losetup: the kubelet puts a loop device on each raw block volume it publishes.
rootfs_copy_tool "$(rootfs_tool losetup)" /usr/sbin/losetup
for f in protocols services ethertypes; do [ -f "/etc/$f" ] && cp "/etc/$f" "$ROOT/etc/"; done
printf 'hosts: files dns\n' > "$ROOT/etc/nsswitch.conf"
echo enbd-vm > "$ROOT/etc/hostname"
printf '127.0.0.1 localhost\n10.88.0.2 enbd-vm\n' > "$ROOT/etc/hosts"

cp "$CLUSTER/guest/containerd.toml" "$ROOT/etc/containerd/config.toml"
cp "$CLUSTER/guest/10-enbd-bridge.conflist" "$ROOT/etc/cni/net.d/"
cp "$CLUSTER/guest/kubelet.yaml" "$CLUSTER/guest/kube-proxy.yaml" "$ROOT/etc/enbd/"
cp "$CLUSTER/guest/init" "$ROOT/init"; chmod +x "$ROOT/init"
echo "mknode-root: root $(du -sh "$ROOT" | cut -f1), initramfs $(ls -s --block-size=K "$OUT" | cut -d' ' -f1) for $KVER" >&2
