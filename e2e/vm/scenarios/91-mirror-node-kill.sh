# Scenario 9.1: the node daemon SIGKILLed during a mirror's resync. ext4 on a mirrored volume
# attached with a resync limit of 2 MiB/s (`--resync-bandwidth 2Mi`, kept in the state file);
# vm-b down while fio spreads writes over 48 MiB and files are written, so the resync has
# tens of MiB to copy. vm-b back; once the resync copied more than one batch (16 regions,
# whose bits are then cleared on the servers) enbd-node is SIGKILLed while a writer runs.
# The new daemon takes the device over and the resync resumes (less left to copy than at the
# start) and completes; 0 writer errors, every checksum verifies, fsck clean, both replicas'
# data files equal.
. /scenarios/lib/common.sh
. /scenarios/lib/writers.sh
. /scenarios/lib/mirror.sh

mirror_volume nvol 128
start_server
start_b
start_daemon
dev=$(attach_mirror nvol --resync-bandwidth 2Mi)
wait_until 30 is_engine nvol Healthy
grep -q '"resync_bytes_per_sec": *2097152' "$STATE_DIR/attachments.json" \
  || { cat "$STATE_DIR/attachments.json"; fail "the resync limit is not in the state file"; }
mkfs_ext4 "$dev"
do_mount "$dev" /mnt/nvol
make_sources p1 60 64
make_sources p2 60 64

# vm-b away while 8 MiB of 4 KiB random writes land across a 48 MiB file, and 60 files.
kill_b
start_fio fio1 /mnt/nvol/fio1.dat 48 8 2000; FIO1=$FIO_PID
start_files_writer p1 /mnt/nvol/p1; W1=$WRITER_PID
wait_files_writer p1 "$W1"
wait_fio fio1 "$FIO1"
wait_until 30 is_engine nvol Degraded

start_b
wait_until 120 is_replica vm-b resyncing
first=$(resync_to_copy vm-b)
log "resync of vm-b began: $first MiB to copy at 2 MiB/s"
awk -v t="$first" 'BEGIN{exit !(t > 20 && t < 128)}' \
  || fail "expected a resync of the dirty regions (20-128 MiB), got $first MiB"
wait_until 120 copied_at_least vm-b 18
start_files_writer p2 /mnt/nvol/p2 10; W2=$WRITER_PID
wait_until 60 test -e p2.mark
copied=$(resync_copied vm-b)
kill -9 "$DAEMON_PID"; wait "$DAEMON_PID" 2>/dev/null || true
t_kill=$(now)
log "daemon SIGKILLed mid-resync ($copied of $first MiB copied) with a writer running"
files_writer_done p2 && fail "the writer finished before the daemon was killed"
start_daemon
wait_until 60 sh -c "enbd-node list | grep -q ' attached '"
log "device taken over after $(elapsed "$t_kill") s"
grep -q 'device taken over' daemon.log || fail "the new daemon did not take the device over"
wait_until 60 is_replica vm-b resyncing
again=$(resync_to_copy vm-b)
log "the new daemon resumed the resync: $again MiB to copy (was $first)"
awk -v a="$again" -v f="$first" 'BEGIN{exit !(a < f)}' \
  || fail "the resync started again from the start ($again MiB, was $first)"
wait_files_writer p2 "$W2"
wait_resynced nvol vm-b 240
verify_files p1 /mnt/nvol/p1
verify_files p2 /mnt/nvol/p2
verify_fio_again fio1
umount /mnt/nvol; MOUNTS=""
e2fsck -fn "$dev" > fsck.out 2>&1 || { cat fsck.out; fail "e2fsck found errors"; }
replicas_equal nvol
detach nvol
log "daemon killed mid-resync: taken over, resync resumed and completed, 0 errors, replicas identical"
