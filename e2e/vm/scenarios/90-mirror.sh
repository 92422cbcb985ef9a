# Scenario 9: a mirrored volume over two enbd-servers. ext4 on it, an fsync'd writer; one
# server SIGKILLed mid-write: 0 writer errors, `enbd-node list` shows the volume Degraded with
# that replica not in sync. The server restarted: the replica is resynced (Healthy again) and
# both servers' data files are byte-identical (sha256).
. /scenarios/lib/common.sh

B_DATA=/tmp/srv-b
B_PID=""
start_b() {
  mkdir -p "$B_DATA"
  enbd-server --data-dir "$B_DATA" --listen 127.0.0.1:10819 --mgmt-listen 127.0.0.1:10820 \
    --metrics-listen 127.0.0.1:9820 --server-id vm-b --shutdown-grace-secs 1 \
    >> server-b.log 2>&1 &
  B_PID=$!
  wait_until 30 port_listening 10819
  log "enbd-server vm-b up (pid $B_PID)"
}
mirror_cleanup() {
  rc=$?
  set +e   # teardown is best effort (see cleanup); its statuses must not replace rc
  [ -n "$B_PID" ] && { kill -9 "$B_PID" 2>/dev/null; wait "$B_PID" 2>/dev/null; }
  [ $rc -ne 0 ] && { echo "---- server-b.log (tail)"; tail -n 20 server-b.log 2>/dev/null; }
  rm -rf "$B_DATA"
  (exit $rc)
  cleanup
}
trap mirror_cleanup EXIT

# state_of VOLUME : the ENGINE column (Healthy / Degraded / Waiting) of `enbd-node list`.
state_of() { enbd-node list | awk -v v="$1" '$2 == v {print $5}'; }
is_state() { [ "$(state_of "$1")" = "$2" ]; }

new_volume mvol 128
SRV_DATA_A=$SRV_DATA
SRV_DATA=$B_DATA; new_volume mvol 128; SRV_DATA=$SRV_DATA_A
start_server
start_b
start_daemon
out=$(enbd-node attach --export mvol --channels 2 --replica-timeout 2s \
  --replica vm@127.0.0.1:10809@http://127.0.0.1:10810 \
  --replica vm-b@127.0.0.1:10819@http://127.0.0.1:10820) || fail "mirrored attach failed: $out"
echo "$out"
dev=$(echo "$out" | sed -n 's/.* as \(\/dev\/ublkb[0-9]*\) .*/\1/p')
[ -b "$dev" ] || fail "no device in: $out"
wait_until 30 is_state mvol Healthy
enbd-node list
mkfs.ext4 -q -F "$dev"
do_mount "$dev" /mnt/mvol
make_files src 120 64   # 120 x 64 KiB

(
  errors=0; i=0
  while [ $i -lt 120 ]; do
    dd if=src/f$i of=/mnt/mvol/f$i bs=64k conv=fsync 2>/dev/null || errors=$((errors+1))
    i=$((i+1))
    [ $i = 30 ] && touch writer.30
  done
  echo $errors > writer.errors
) &
WRITER=$!
wait_until 120 test -e writer.30
kill -9 "$B_PID"; wait "$B_PID" 2>/dev/null || true; B_PID=""
log "server vm-b killed with SIGKILL while the writer runs"
[ -e writer.errors ] && fail "the writer finished before the server was killed"
wait $WRITER
errors=$(cat writer.errors)
[ "$errors" = 0 ] || fail "the writer saw $errors IO errors with one replica gone"
# (Listings go to files first: `grep -q` closing the pipe early would break enbd-node's stdout.)
enbd-node list > list.txt; cat list.txt
awk '$2 == "mvol" {print $5}' list.txt | grep -qx Degraded \
  || fail "volume not Degraded with a replica down"
grep -E '^  replica vm-b ' list.txt | grep -qvE ' in-sync' || fail "replica vm-b still listed in sync"
enbd-node list --json > list.json
grep -q '"state": "in-sync"' list.json || fail "--json lacks replica states"
grep -qE '"state": "(out|down|resyncing)"' list.json || fail "--json shows no replica behind"

start_b
wait_until 180 is_state mvol Healthy
enbd-node list
grep -q 'resync' daemon.log && log "resync in the daemon log: $(grep -c resync daemon.log) lines"
i=0
while [ $i -lt 120 ]; do
  cmp src/f$i /mnt/mvol/f$i || fail "f$i differs"
  i=$((i+1))
done
umount /mnt/mvol; MOUNTS=""
detach mvol
a=$(sha256sum "$SRV_DATA_A/volumes/mvol/data" | cut -d' ' -f1)
b=$(sha256sum "$B_DATA/volumes/mvol/data" | cut -d' ' -f1)
log "replica data sha256: vm=$a vm-b=$b"
[ "$a" = "$b" ] || fail "the replicas differ after resync"
log "120 files verified, 0 writer errors, replicas identical after resync"
