# Scenario 3: one channel killed during a fio verify run: 0 errors, verify passes.
# Channel 0 dies through the fault proxy (TCP reset on the wire), channel 1 through the
# daemon's control socket; both must reconnect and have their requests re-issued.
. /scenarios/lib/common.sh

new_volume chan 128
start_server
mkfifo fp.in
enbd-faultproxy --listen 127.0.0.1:11809 --upstream "$NBD" < fp.in > fp.out 2>&1 &
PROXY_PID=$!
exec 4> fp.in
wait_until 20 grep -q listening fp.out
start_daemon
out=$(enbd-node attach --server 127.0.0.1:11809 --export chan --channels 4) || fail "attach: $out"
dev=$(echo "$out" | sed -n 's/.* as \(\/dev\/ublkb[0-9]*\) .*/\1/p')
echo "$out"

fio --name=chan-verify --filename="$dev" --direct=1 --ioengine=libaio --iodepth=16 \
  --rw=randwrite --bs=16k --size=48M --verify=crc32c --do_verify=1 --verify_fatal=1 \
  --output=fio.out &
FIO=$!
sleep 3
echo list >&4
wait_until 10 grep -q '^ok [0-9]' fp.out
id=$(grep '^ok [0-9]' fp.out | tail -1 | awk '{split($3, a, "="); print a[1]}')
echo "reset $id" >&4
wait_until 10 grep -q "ok reset $id" fp.out
cat fp.out
sleep 2
enbd-node reset-channel chan 1
fio_rc=0; wait $FIO || fio_rc=$?
cat fio.out | grep -E 'err=|IOPS'
[ $fio_rc = 0 ] || { cat fio.out; fail "fio failed (rc=$fio_rc) after a channel was killed"; }
grep -q 'err= 0' fio.out || fail "fio reported errors"
enbd-node list --json > list.json
cat list.json | grep -E '"index"|"state"|"connects"|"reissued"'
# Both kills caused a reconnect: connects over all channels exceed the channel count by 2+.
extra=$(awk '/"connects"/ { gsub(/[^0-9]/, "", $2); c += $2; n++ } END {print c - n}' list.json)
[ "$extra" -ge 2 ] || fail "expected at least 2 reconnects, saw $extra"
detach chan
kill $PROXY_PID 2>/dev/null || true
