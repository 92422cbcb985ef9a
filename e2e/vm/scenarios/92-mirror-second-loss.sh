# Scenario 9.2: the in-sync replica dies while the other is still resyncing. ext4 on a mirror
# over vm and vm-b, resync limited to 1 MiB/s. vm SIGKILLed; files and fio writes land on
# vm-b alone. vm back: its resync starts; before it finishes vm-b is SIGKILLed. Now no replica
# in sync is reachable: IO waits (a reader of the files written while vm was away, page cache
# dropped, gets nothing, and a writer gets no further) and the volume says Waiting with the
# reason (vm-b down, vm resyncing N%); vm's
# un-synced regions are never read. vm-b back: the held IO completes, the reader's checksums
# match, the resync completes, 0 writer errors, fio re-verifies, fsck clean, replicas equal.
. /scenarios/lib/common.sh
. /scenarios/lib/writers.sh
. /scenarios/lib/mirror.sh

mirror_volume svol 128
start_server
start_b
start_daemon
dev=$(attach_mirror svol --resync-bandwidth 1Mi)
wait_until 30 is_engine svol Healthy
mkfs_ext4 "$dev"
do_mount "$dev" /mnt/svol
make_sources p0 20 64
make_sources p1 80 64
make_sources p2 20 64
start_files_writer p0 /mnt/svol/p0; wait_files_writer p0 "$WRITER_PID"

# vm away: everything in p1 and fio1 exists on vm-b only.
kill_server
start_fio fio1 /mnt/svol/fio1.dat 24 4 2000; FIO1=$FIO_PID
start_files_writer p1 /mnt/svol/p1; W1=$WRITER_PID
wait_files_writer p1 "$W1"
wait_fio fio1 "$FIO1"
wait_until 30 is_engine svol Degraded
sync; echo 3 > /proc/sys/vm/drop_caches

# vm back; its resync is under way when vm-b dies.
start_server
wait_until 120 is_replica vm resyncing
log "vm resyncing: $(resync_copied vm)/$(resync_to_copy vm) MiB"
kill_b
left=$(resync_copied vm)
log "vm-b killed with vm's resync unfinished"
[ -n "$left" ] || fail "vm's resync was no longer running when vm-b died: $(cat list.now)"
# A reader of data written while vm was away, and a writer: neither may get anywhere.
(cd /mnt/svol/p1 && sha256sum f*) > p1.read &
READER=$!
start_files_writer p2 /mnt/svol/p2; W2=$WRITER_PID
t_wait=$(now)
sleep 8   # the assertion is that nothing completes in this window
kill -0 "$READER" 2>/dev/null || fail "the reader finished with vm-b down: it was served from vm"
files_writer_done p2 && fail "the writer finished with vm-b down"
[ -s p1.read ] && fail "the reader got checksums with vm-b down: $(head -n 2 p1.read)"
engine=$(engine_of svol)
cat list.now
[ "$engine" = Waiting ] || fail "the volume says $engine, not Waiting, with its only in-sync replica down"
grep -q '^  waiting: no in-sync replica reachable: .*vm-b down' list.now \
  || fail "the Waiting status does not say why (vm-b down): $(cat list.now)"
grep -q '^  waiting: .*vm resyncing [0-9]*%' list.now \
  || fail "the Waiting status does not name vm's resync progress: $(cat list.now)"
is_replica vm in-sync && fail "vm reported in sync before its resync finished"
log "IO held for $(elapsed "$t_wait") s with vm-b down (engine $engine): no read, no write completed"

start_b
wait "$READER" || fail "the reader failed"
sort p1.read > p1.read.sorted; sort p1.sha256 > p1.want
cmp p1.read.sorted p1.want || fail "data written while vm was away read back wrong"
log "reader released after vm-b returned: all $(wc -l < p1.read) checksums match"
wait_files_writer p2 "$W2"
wait_resynced svol vm 300
verify_files p0 /mnt/svol/p0
verify_files p1 /mnt/svol/p1
verify_files p2 /mnt/svol/p2
verify_fio_again fio1
umount /mnt/svol; MOUNTS=""
e2fsck -fn "$dev" > fsck.out 2>&1 || { cat fsck.out; fail "e2fsck found errors"; }
replicas_equal svol
detach svol
log "second replica lost mid-resync: IO waited, nothing stale served, nothing lost, replicas identical"
