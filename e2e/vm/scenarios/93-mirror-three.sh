# Scenario 9.3: three replicas (vm, vm-b, vm-c), ext4 mounted, two checksummed writers (files
# copied with fsync and checked by sha256; fio random writes with crc32c verify).
# 1. vm-b SIGKILLed mid-write: 0 writer errors, Degraded, vm-b not in sync.
# 2. Then vm-c SIGKILLed mid-write: 0 writer errors, IO continues on vm alone, still Degraded.
#    Everything written so far verifies (page cache dropped: read from vm).
# 3. Both back: only dirty regions resynced to each, Healthy, the three data files equal,
#    fio re-verifies, e2fsck clean.
. /scenarios/lib/common.sh
. /scenarios/lib/writers.sh
. /scenarios/lib/mirror.sh

mirror_volume3 tvol 128
start_server
start_b
start_c
start_daemon
dev=$(attach_mirror3 tvol)
wait_until 30 is_engine tvol Healthy
enbd-node list
grep -c '^  replica ' list.now | grep -qx 3 || fail "not three replicas: $(cat list.now)"
mkfs_ext4 "$dev"
do_mount "$dev" /mnt/tvol
make_sources p1 80 64
make_sources p2 80 64

# 1. vm-b dies under both writers.
start_fio fio1 /mnt/tvol/fio1.dat 16 6 100; FIO1=$FIO_PID
start_files_writer p1 /mnt/tvol/p1 20; W1=$WRITER_PID
wait_until 120 test -e p1.mark
kill_b
files_writer_done p1 && fail "the files writer finished before vm-b was killed"
kill -0 "$FIO1" 2>/dev/null || fail "fio finished before vm-b was killed"
wait_files_writer p1 "$W1"
wait_fio fio1 "$FIO1"
wait_until 30 is_engine tvol Degraded
is_replica vm-b in-sync && fail "vm-b listed in sync while down"

# 2. vm-c dies under both writers: vm alone takes the IO.
start_fio fio2 /mnt/tvol/fio2.dat 16 6 100; FIO2=$FIO_PID
start_files_writer p2 /mnt/tvol/p2 20; W2=$WRITER_PID
wait_until 120 test -e p2.mark
kill_c
files_writer_done p2 && fail "the files writer finished before vm-c was killed"
kill -0 "$FIO2" 2>/dev/null || fail "fio finished before vm-c was killed"
wait_files_writer p2 "$W2"
wait_fio fio2 "$FIO2"
enbd-node list > list.txt; cat list.txt
awk '$2 == "tvol" {print $5}' list.txt | grep -qx Degraded || fail "volume not Degraded with two replicas down"
grep -E '^  replica vm ' list.txt | grep -q ' in-sync' || fail "vm not in sync"
grep -E '^  replica vm-c ' list.txt | grep -qvE ' in-sync' || fail "vm-c still listed in sync"
sync; echo 3 > /proc/sys/vm/drop_caches   # read back from vm alone
verify_files p1 /mnt/tvol/p1
verify_files p2 /mnt/tvol/p2
verify_fio_again fio1
verify_fio_again fio2
log "two of three replicas lost in turn: 0 writer errors, everything verifies from vm alone"

# 3. Both back: resynced, then the three copies are identical.
start_b
start_c
wait_resynced tvol vm-b 300
[ -z "$RESYNC_SEEN" ] || awk -v t="$RESYNC_SEEN" 'BEGIN{exit !(t < 128)}' \
  || fail "a resync copied the whole volume ($RESYNC_SEEN MiB), not the dirty regions"
# The node's metrics for this real device: every replica in sync, the resync counted, and
# reads after the resync (page cache dropped) served by all three replicas.
for r in vm vm-b vm-c; do
  [ "$(node_metric enbd_node_replica_state volume=tvol replica=$r state=in_sync)" = 1 ] \
    || fail "metrics: replica $r not in_sync: $(grep enbd_node_replica_state metrics.now)"
done
copied=$(node_metric enbd_node_mirror_resync_copied_bytes_total volume=tvol)
awk -v c="${copied:-0}" 'BEGIN{exit !(c > 0)}' || fail "metrics: no resync bytes counted ($copied)"
writes=$(node_metric enbd_node_volume_requests_total volume=tvol op=write)
awk -v c="${writes:-0}" 'BEGIN{exit !(c > 0)}' || fail "metrics: no device writes counted ($writes)"
reads_of() { node_metric enbd_node_replica_reads_total volume=tvol replica="$1"; }
for r in vm vm-b vm-c; do echo "$r $(reads_of $r)"; done > reads.before
sync; echo 3 > /proc/sys/vm/drop_caches
verify_files p1 /mnt/tvol/p1
verify_files p2 /mnt/tvol/p2
for r in vm vm-b vm-c; do
  before=$(awk -v r="$r" '$1 == r {print $2}' reads.before)
  served=$(awk -v a="$(reads_of $r)" -v b="${before:-0}" 'BEGIN{print a - b}')
  awk -v n="$served" 'BEGIN{exit !(n > 0)}' \
    || fail "reads after the resync never reached $r (${before:-0} before, $served more): not balanced"
  log "replica $r served $served reads after the resync"
done
log "metrics: three replicas in_sync, $copied resync bytes, $writes device writes"
umount /mnt/tvol; MOUNTS=""
e2fsck -fn "$dev" > fsck.out 2>&1 || { cat fsck.out; fail "e2fsck found errors"; }
replicas_equal3 tvol
detach tvol
log "three replicas, two lost in turn: 0 errors, data verified, resynced, three copies identical"
