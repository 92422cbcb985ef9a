# Scenario 5: enbd-node killed with SIGKILL and restarted while a filesystem is mounted and
# being written: 0 IO errors in the writer, every checksum verifies, fsck is clean. Then the
# same under a graceful stop (SIGTERM, what a DaemonSet rollout sends): the stopping daemon
# must not answer the requests in flight with an error on its way out.
. /scenarios/lib/common.sh
. /scenarios/lib/writers.sh

new_volume busy 256
start_server
start_daemon
dev=$(attach busy --channels 2)
mkfs.ext4 -q -F "$dev"
do_mount "$dev" /mnt/busy
make_sources src 200 64   # 200 x 64 KiB
start_files_writer src /mnt/busy 40; WRITER=$WRITER_PID
wait_until 120 test -e src.mark
t_kill=$(now)
kill -9 "$DAEMON_PID"
wait "$DAEMON_PID" 2>/dev/null || true
log "daemon killed with SIGKILL while the writer runs"
files_writer_done src && fail "the writer finished before the daemon was killed"
start_daemon
wait_until 60 sh -c "enbd-node list | grep -q ' attached '"
# How long the kernel held the writer's IO before a daemon served the queues again (reported,
# not asserted: timings here depend on the emulator's speed).
log "IO held $(elapsed "$t_kill") s: SIGKILL -> new daemon -> device taken over, held IO reissued"
log "device taken over: $(enbd-node list | tail -1)"
wait_files_writer src "$WRITER"
grep -qE 'device taken over' daemon.log || fail "the new daemon did not take the device over"
umount /mnt/busy
e2fsck -fn "$dev" > fsck.out 2>&1 || { cat fsck.out; fail "e2fsck found errors"; }
mount "$dev" /mnt/busy
verify_files src /mnt/busy
log "200 files verified, fsck clean, 0 writer errors"

make_sources term 200 64
start_files_writer term /mnt/busy/term 40; WRITER=$WRITER_PID
wait_until 120 test -e term.mark
kill -TERM "$DAEMON_PID"
wait "$DAEMON_PID" 2>/dev/null || true
log "daemon stopped with SIGTERM while the writer runs"
files_writer_done term && fail "the writer finished before the daemon stopped"
start_daemon
wait_until 60 sh -c "enbd-node list | grep -q ' attached '"
wait_files_writer term "$WRITER"
verify_files term /mnt/busy/term
log "SIGTERM under IO: 200 more files verified, 0 writer errors"
umount /mnt/busy

# Expanded on its server while no daemon runs: the next daemon grows the device after taking
# it over where the kernel has ublk UPDATE_SIZE (6.16+); elsewhere it keeps the old size and
# says why.
dev_bytes() { echo $(( $(cat "/sys/block/${dev##*/}/size") * 512 )); }
kill -9 "$DAEMON_PID"
wait "$DAEMON_PID" 2>/dev/null || true
truncate -s 320M "$SRV_DATA/volumes/busy/data"
start_daemon
wait_until 60 sh -c "enbd-node list | grep -q ' attached '"
kver=$(uname -r | awk -F. '{print $1 * 1000 + $2}')
if [ "$kver" -ge 6016 ]; then
  wait_until 30 sh -c "[ \$(( \$(cat /sys/block/${dev##*/}/size) * 512 )) = 335544320 ]"
  enbd-node list --json > list.json
  grep -q '"size_bytes": 335544320' list.json || fail "enbd-node list still shows the old size"
  log "export grown while the daemon was down: device $(dev_bytes) bytes after takeover"
else
  [ "$(dev_bytes)" = 268435456 ] || fail "device size changed to $(dev_bytes) without UPDATE_SIZE"
  wait_until 10 grep -q "keeps its old size" daemon.log
  log "export grown while the daemon was down: kernel lacks UPDATE_SIZE, device keeps 268435456 bytes"
fi
detach busy
