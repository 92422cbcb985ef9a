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
