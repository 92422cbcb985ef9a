# Scenario 4: the server killed and restarted during a fio verify run with brownout policy
# `wait`: 0 errors, verify passes. Then with `fail-after=2s` and the server left down, IO
# fails with EIO after about 2 s — not before.
. /scenarios/lib/common.sh

new_volume wait-vol 128
new_volume fail-vol 64
start_server
start_daemon
dev=$(attach wait-vol --channels 2 --brownout wait)
fio --name=outage-verify --filename="$dev" --direct=1 --ioengine=libaio --iodepth=8 \
  --rw=randwrite --bs=16k --size=40M --verify=crc32c --do_verify=1 --verify_fatal=1 \
  --output=fio.out &
FIO=$!
sleep 3
kill_server
sleep 3
kill -0 $FIO 2>/dev/null || fail "fio finished while the server was down: the outage was not exercised"
start_server
fio_rc=0; wait $FIO || fio_rc=$?
grep -E 'err=|IOPS' fio.out
[ $fio_rc = 0 ] || { cat fio.out; fail "fio failed (rc=$fio_rc) across a server restart"; }
grep -q 'err= 0' fio.out || fail "fio reported errors"
detach wait-vol

dev=$(attach fail-vol --channels 2 --brownout fail-after=2s)
dd if=/dev/urandom of="$dev" bs=64k count=16 oflag=direct 2>/dev/null || fail "write before the outage failed"
kill_server
t0=$(now)
if dd if="$dev" of=/dev/null bs=4k count=1 skip=100 iflag=direct 2> dd.err; then
  fail "read succeeded with the server down"
fi
took=$(elapsed "$t0")
cat dd.err
log "read failed after ${took}s"
grep -q 'Input/output error' dd.err || fail "expected EIO, got: $(cat dd.err)"
awk -v t="$took" 'BEGIN{exit !(t >= 1.8)}' || fail "EIO came too early (${took}s < 2s)"
awk -v t="$took" 'BEGIN{exit !(t <= 8)}' || fail "EIO came too late (${took}s)"
detach fail-vol
