# Scenario 9: a mirrored volume over two enbd-servers, ext4 mounted, two checksummed writers
# (files copied with fsync and checked by sha256; fio random writes with crc32c verify).
# 1. Server vm-b SIGKILLed mid-write: 0 writer errors, fio verify passes, `enbd-node list`
#    shows the volume Degraded with that replica not in sync.
# 2. vm-b restarted: only the dirty regions are resynced (Healthy again), every file verifies,
#    both servers' data files are byte-identical (sha256, unmounted).
# 3. Then the other server (vm) SIGKILLed mid-write: 0 writer errors, and everything written
#    in 1-3 verifies from vm-b alone; e2fsck clean.
. /scenarios/lib/common.sh
. /scenarios/lib/writers.sh
. /scenarios/lib/mirror.sh

mirror_volume mvol 128
start_server
start_b
start_daemon
dev=$(attach_mirror mvol)
wait_until 30 is_engine mvol Healthy
enbd-node list
mkfs_ext4 "$dev"
do_mount "$dev" /mnt/mvol
make_sources p1 120 64   # 120 x 64 KiB

# 1. vm-b dies while both writers run.
start_fio fio1 /mnt/mvol/fio1.dat 16 6 100; FIO1=$FIO_PID
start_files_writer p1 /mnt/mvol/p1 20; W1=$WRITER_PID
wait_until 120 test -e p1.mark
kill_b
files_writer_done p1 && fail "the files writer finished before the server was killed"
kill -0 "$FIO1" 2>/dev/null || fail "fio finished before the server was killed"
wait_files_writer p1 "$W1"
wait_fio fio1 "$FIO1"
enbd-node list > list.txt; cat list.txt
awk '$2 == "mvol" {print $5}' list.txt | grep -qx Degraded \
  || fail "volume not Degraded with a replica down"
grep -E '^  replica vm-b ' list.txt | grep -qvE ' in-sync' || fail "replica vm-b still listed in sync"
enbd-node list --json > list.json
grep -q '"state": "in-sync"' list.json || fail "--json lacks replica states"
grep -qE '"state": "(out|down|resyncing)"' list.json || fail "--json shows no replica behind"

# 2. vm-b returns: the dirty regions are copied, then the replicas are identical.
start_b
wait_resynced mvol vm-b 180
[ -z "$RESYNC_SEEN" ] || awk -v t="$RESYNC_SEEN" 'BEGIN{exit !(t < 128)}' \
  || fail "the resync copied the whole volume ($RESYNC_SEEN MiB), not the dirty regions"
grep -q 'resync' daemon.log && log "resync in the daemon log: $(grep -c resync daemon.log) lines"
verify_files p1 /mnt/mvol/p1
umount /mnt/mvol; MOUNTS=""
replicas_equal mvol

# 3. The other server (vm) dies while both writers run: vm-b alone holds everything.
do_mount "$dev" /mnt/mvol
make_sources p2 60 64
start_fio fio2 /mnt/mvol/fio2.dat 16 6 100; FIO2=$FIO_PID
start_files_writer p2 /mnt/mvol/p2 15; W2=$WRITER_PID
wait_until 120 test -e p2.mark
kill_server
files_writer_done p2 && fail "the files writer finished before the server was killed"
kill -0 "$FIO2" 2>/dev/null || fail "fio finished before the server was killed"
wait_files_writer p2 "$W2"
wait_fio fio2 "$FIO2"
enbd-node list > list.txt; cat list.txt
awk '$2 == "mvol" {print $5}' list.txt | grep -qx Degraded \
  || fail "volume not Degraded with vm down"
grep -E '^  replica vm ' list.txt | grep -qvE ' in-sync' || fail "replica vm still listed in sync"
sync; echo 3 > /proc/sys/vm/drop_caches   # the checks below read from vm-b, not the cache
verify_files p1 /mnt/mvol/p1
verify_files p2 /mnt/mvol/p2
verify_fio_again fio1
verify_fio_again fio2
umount /mnt/mvol; MOUNTS=""
e2fsck -fn "$dev" > fsck.out 2>&1 || { cat fsck.out; fail "e2fsck found errors"; }
detach mvol
log "phase 1-3: 0 writer errors, replicas identical after resync, all data verified from vm-b alone, fsck clean"
