# Scenario 2: raw block device: fio random writes with checksums, then a read-verify pass.
. /scenarios/lib/common.sh

new_volume raw 128
start_server
start_daemon
dev=$(attach raw --channels 4 --queues 2 --queue-depth 32)
fio --name=raw-verify --filename="$dev" --direct=1 --ioengine=libaio --iodepth=16 \
  --rw=randwrite --bs=16k --size=32M --verify=crc32c --do_verify=1 --verify_fatal=1 \
  --output=fio.out || { cat fio.out; fail "fio verify failed"; }
grep -q 'err= 0' fio.out || { cat fio.out; fail "fio reported errors"; }
grep -E 'IOPS|err=' fio.out
detach raw
