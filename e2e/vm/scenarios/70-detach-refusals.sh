# Scenario 6: detaching a mounted device is refused with a clear message (and changes
# nothing); detaching an unknown device is a clear error.
. /scenarios/lib/common.sh

new_volume held 128
start_server
start_daemon
dev=$(attach held --channels 1)
mkfs.ext4 -q -F "$dev"
do_mount "$dev" /mnt/held
echo still-here > /mnt/held/marker

for target in held "$dev"; do
  if enbd-node detach "$target" > detach.out 2>&1; then fail "detach $target of a mounted device succeeded"; fi
  cat detach.out
  grep -q "in use (mounted on /mnt/held): unmount it first" detach.out || fail "unclear refusal: $(cat detach.out)"
done
[ "$(cat /mnt/held/marker)" = still-here ] || fail "the mounted filesystem was disturbed"
enbd-node list | grep -q "$dev" || fail "the refused detach removed the device"

if enbd-node detach no-such-volume > unknown.out 2>&1; then fail "detach of an unknown volume succeeded"; fi
cat unknown.out
grep -q "volume no-such-volume is not attached on this node" unknown.out || fail "unclear error: $(cat unknown.out)"
if enbd-node detach /dev/ublkb99 > unknown.out 2>&1; then fail "detach of an unknown device succeeded"; fi
cat unknown.out
grep -q "device /dev/ublkb99 is not attached by this daemon" unknown.out || fail "unclear error: $(cat unknown.out)"

umount /mnt/held
MOUNTS=""
detach held
[ ! -e "$dev" ] || fail "$dev still exists after detach"

# Online resize: ublk's UPDATE_SIZE arrived in Linux 6.16. Before it, a clear refusal; from
# it on, an export whose size did not change keeps its size.
dev=$(attach held --channels 1)
kver=$(uname -r | awk -F. '{print $1 * 1000 + $2}')
if [ "$kver" -lt 6016 ]; then
  if enbd-node resize held > resize.out 2>&1; then fail "resize succeeded on $(uname -r)"; fi
  cat resize.out
  grep -q "online resize is not supported by this kernel's ublk driver" resize.out \
    || fail "unclear resize error: $(cat resize.out)"
else
  enbd-node resize held > resize.out 2>&1 || { cat resize.out; fail "resize failed on $(uname -r)"; }
  cat resize.out
  grep -q "held: 134217728 bytes" resize.out || fail "unexpected resize answer: $(cat resize.out)"
fi
detach held

# A takeover whose server is gone for good can be abandoned: the daemon dies, the server
# never comes back, a new daemon keeps retrying it while the kernel holds the device's IO.
# `detach` cancels the takeover and removes the device although it is mounted; the held IO
# fails with EIO instead of waiting forever.
dev=$(attach held --channels 1)
# Not in MOUNTS: unmounting a device whose IO is held would hang the teardown of a failure.
mount "$dev" /mnt/held
kill -9 "$DAEMON_PID"
wait "$DAEMON_PID" 2>/dev/null || true
kill_server
start_daemon
wait_until 30 sh -c "enbd-node list | awk '\$2 == \"held\" && \$4 == \"recovering\"' | grep -q ."
dd if="$dev" of=/dev/null bs=4k count=1 skip=1000 iflag=direct 2> held-io.err &
DD=$!
# The read is held by the kernel: its process sleeps uninterruptibly on the device.
wait_until 30 grep -q '^State:.*D' "/proc/$DD/status"
enbd-node detach held > abandon.out 2>&1 || { cat abandon.out; fail "detach of a recovering volume failed"; }
cat abandon.out
if wait "$DD"; then fail "the held read succeeded after its device was removed"; fi
grep -q "Input/output error" held-io.err || fail "held IO did not fail with EIO: $(cat held-io.err)"
[ ! -e "$dev" ] || fail "$dev still exists after the abandoned takeover"
enbd-node list | grep -q held && fail "the volume is still listed"
grep -q "takeover cancelled" daemon.log || fail "the daemon did not log the cancellation"
umount /mnt/held 2>/dev/null || umount -l /mnt/held
log "abandoned takeover: device removed, held IO failed with EIO"
