# Scenario 2: raw block device: fio random writes with checksums, then a read-verify pass.
# First, the server's TLS gate (`--tls require --tls-client-ca`, as every scenario runs it):
# a plain-text client and a TLS client without a client certificate get nothing; the node's
# certificate gets in.
. /scenarios/lib/common.sh

new_volume raw 128
start_server
bench() { enbd-node bench --server "$NBD" --export raw --channels 1 --seconds 0.5 --ramp 0 "$@"; }
if bench > plain.out 2>&1; then fail "a plain-text client was served by a --tls require server"; fi
grep -q "server requires TLS" plain.out || fail "unclear plain-text refusal: $(cat plain.out)"
if bench --tls-ca "$PKI/ca-cert.pem" > nocert.out 2>&1; then
  fail "a TLS client without a client certificate was served"
fi
# (TLS 1.3: the server's refusal of the client arrives after the client's handshake is done,
# so the engine may report it as TLS or as the NBD handshake that follows.)
grep -qE "(TLS|NBD handshake) with $NBD" nocert.out || fail "unclear refusal without a client certificate: $(cat nocert.out)"
bench --tls-ca "$PKI/ca-cert.pem" --tls-cert "$PKI/node-cert.pem" --tls-key "$PKI/node-key.pem" \
  > tls.out 2>&1 || fail "the node's certificate was refused: $(cat tls.out)"
log "TLS gate: plain text refused ($(tail -n 1 plain.out)); no client certificate refused; node certificate served"
start_daemon
dev=$(attach raw --channels 4 --queues 2 --queue-depth 32)
fio --name=raw-verify --filename="$dev" --direct=1 --ioengine=libaio --iodepth=16 \
  --rw=randwrite --bs=16k --size=32M --verify=crc32c --do_verify=1 --verify_fatal=1 \
  --output=fio.out || { cat fio.out; fail "fio verify failed"; }
grep -q 'err= 0' fio.out || { cat fio.out; fail "fio reported errors"; }
grep -E 'IOPS|err=' fio.out
detach raw
