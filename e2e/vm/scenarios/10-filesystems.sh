# Scenario 1: ext4 and xfs on a ublk device survive unmount, detach and a fresh attach:
# attach → mkfs → mount → write files → record checksums → unmount → detach → attach →
# mount → every checksum matches (and fsck is clean).
. /scenarios/lib/common.sh

new_volume fs-ext4 256
new_volume fs-xfs 512
start_server
start_daemon
make_files src 24 512   # 12 MiB of random data
here=$PWD

for fs in ext4 xfs; do
  vol=fs-$fs
  dev=$(attach "$vol" --channels 2)
  [ -b "$dev" ] || fail "$dev is not a block device"
  log "$vol attached as $dev ($(cat /sys/block/${dev#/dev/}/size) sectors)"
  if [ $fs = ext4 ]; then mkfs.ext4 -q -F "$dev"; else mkfs.xfs -q -f "$dev"; fi
  # mkfs discards and zeroes the whole device: every such request must succeed (the kernel
  # logs 'error, dev ublkbN' for each one the device fails).
  if dmesg | grep -q "error, dev ${dev#/dev/}"; then
    dmesg | grep "error, dev ${dev#/dev/}" | tail -5; fail "$fs: the device failed requests during mkfs"
  fi
  do_mount "$dev" /mnt/$fs
  cp src/* /mnt/$fs/
  (cd /mnt/$fs && sha256sum f* > "$here/$fs.sums")
  umount /mnt/$fs
  detach "$vol"
  [ ! -e "$dev" ] || fail "$dev still exists after detach"

  dev=$(attach "$vol" --channels 2)
  if [ $fs = ext4 ]; then e2fsck -fn "$dev" >fsck.out 2>&1 || { cat fsck.out; fail "e2fsck found errors"; }
  else xfs_repair -n "$dev" >fsck.out 2>&1 || { cat fsck.out; fail "xfs_repair found errors"; }
  fi
  mount "$dev" /mnt/$fs
  (cd /mnt/$fs && sha256sum -c "$here/$fs.sums") > verify.out 2>&1 || { cat verify.out; fail "$fs checksums differ"; }
  n=$(grep -c ': OK$' verify.out)
  [ "$n" = 24 ] || fail "$fs: only $n of 24 files verified"
  # The files must also match the sources (not just what was read back before unmount).
  for f in src/*; do cmp "$f" "/mnt/$fs/${f#src/}" || fail "$fs: ${f#src/} differs from its source"; done
  umount /mnt/$fs
  detach "$vol"
  log "$fs: 24 files verified after detach/attach, fsck clean"
done
