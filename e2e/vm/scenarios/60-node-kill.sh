# Scenario 5: enbd-node killed with SIGKILL and restarted while a filesystem is mounted and
# being written: 0 IO errors in the writer, every checksum verifies, fsck is clean.
. /scenarios/lib/common.sh

new_volume busy 256
start_server
start_daemon
dev=$(attach busy --channels 2)
mkfs.ext4 -q -F "$dev"
do_mount "$dev" /mnt/busy
make_files src 200 64   # 200 x 64 KiB

# The writer: one fsync'd copy per file; every failure is counted, none tolerated.
(
  errors=0; i=0
  while [ $i -lt 200 ]; do
    dd if=src/f$i of=/mnt/busy/f$i bs=64k conv=fsync 2>/dev/null || errors=$((errors+1))
    i=$((i+1))
    [ $i = 40 ] && touch writer.40
  done
  echo $errors > writer.errors
) &
WRITER=$!
wait_until 120 test -e writer.40
t_kill=$(now)
kill -9 "$DAEMON_PID"
wait "$DAEMON_PID" 2>/dev/null || true
log "daemon killed with SIGKILL while the writer runs"
[ -e writer.errors ] && fail "the writer finished before the daemon was killed"
start_daemon
wait_until 60 sh -c "enbd-node list | grep -q ' attached '"
# How long the kernel held the writer's IO before a daemon served the queues again (reported,
# not asserted: timings here depend on the emulator's speed).
log "IO held $(elapsed "$t_kill") s: SIGKILL -> new daemon -> device taken over, held IO reissued"
log "device taken over: $(enbd-node list | tail -1)"
wait $WRITER
errors=$(cat writer.errors)
[ "$errors" = 0 ] || fail "the writer saw $errors IO errors"
grep -qE 'device taken over' daemon.log || fail "the new daemon did not take the device over"
umount /mnt/busy
e2fsck -fn "$dev" > fsck.out 2>&1 || { cat fsck.out; fail "e2fsck found errors"; }
mount "$dev" /mnt/busy
i=0
while [ $i -lt 200 ]; do
  cmp src/f$i /mnt/busy/f$i || fail "f$i differs after the restart"
  i=$((i+1))
done
log "200 files verified, fsck clean, 0 writer errors"
umount /mnt/busy
detach busy
