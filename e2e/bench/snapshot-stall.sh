#!/usr/bin/env bash
# Write stalls while a snapshot of a busy volume is taken (issue 13's stall measurement):
# for ext4 (no reflink: background copy with copy-before-write) and xfs with reflink
# (FICLONE), each on a loop file made here, one enbd-server on that filesystem, a volume of
# SIZE_MIB filled densely, WRITERS writers of 4 KiB blocks (one connection and one write in
# flight each) running throughout; a snapshot is taken after a baseline and polled until
# ready. One table row per filesystem: the CreateSnapshot call's duration, the copy's, and
# write latency p50 / p99 / max before the snapshot and from the call until ready. Each run
# also checks the snapshot holds exactly the writes acknowledged before its instant
# (`content`; the script fails if not). Not a timed test: numbers move with the load.
#
#   sudo e2e/bench/snapshot-stall.sh                 # 2 GiB volumes, 4 writers
#   SIZE_MIB=4096 WRITERS=8 sudo -E e2e/bench/snapshot-stall.sh
#   COPY_RATE_BYTES=268435456 ...                    # cap the background copy (server flag)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SIZE_MIB=${SIZE_MIB:-2048}
WRITERS=${WRITERS:-4}
BASELINE_SECS=${BASELINE_SECS:-3}
COPY_RATE_BYTES=${COPY_RATE_BYTES:-0}
PROFILE=${PROFILE:-debug}
FILESYSTEMS=${FILESYSTEMS:-"ext4 xfs-reflink"}
BASE_PORT=${SNAPSHOT_BENCH_PORT:-12930}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET/$PROFILE

[[ $(id -u) == 0 ]] || { echo "needs root (loop devices, mkfs, mount)" >&2; exit 1; }
for tool in mkfs.ext4 mkfs.xfs losetup mount; do
  command -v "$tool" >/dev/null || { echo "missing $tool (run e2e/setup-host.sh)" >&2; exit 1; }
done
# Always (a no-op when up to date): a stale binary would measure old code.
flag=(); [[ $PROFILE == release ]] && flag=(--release)
(cd "$ROOT" && cargo build -q "${flag[@]}" -p enbd-server -p enbd-e2e --bin enbd-server --bin enbd-snapshot-stall)

WORK=$(mktemp -d /var/tmp/enbd-snapshot-bench.XXXXXX)
PID=0
MNT=""
cleanup() {
  [[ $PID != 0 ]] && { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; }
  [[ -n $MNT ]] && mountpoint -q "$MNT" && umount "$MNT"
  rm -rf "$WORK"
}
trap cleanup EXIT
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

echo "enbd-server snapshot stall: ${SIZE_MIB} MiB volume, ${WRITERS} writers of 4 KiB, ${PROFILE} build, $(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg)"
echo
echo "| filesystem | volume | snapshot by | CreateSnapshot call (ms) | copy until ready | writes before | p50 / p99 / max before (ms) | writes from call to ready | p50 / p99 / max from call to ready (ms) | content |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for fs in $FILESYSTEMS; do
  img=$WORK/$fs.img
  MNT=$WORK/$fs
  mkdir -p "$MNT"
  truncate -s $(( (SIZE_MIB * 2 + 1024) << 20 )) "$img"
  case $fs in
    ext4) mkfs.ext4 -q -F "$img" ;;
    xfs-reflink) mkfs.xfs -q -f -m reflink=1 "$img" ;;
    *) echo "unknown filesystem $fs" >&2; exit 1 ;;
  esac
  mount -o loop "$img" "$MNT"
  "$BIN/enbd-server" --data-dir "$MNT/data" --server-id bench \
    --listen "127.0.0.1:$BASE_PORT" --mgmt-listen "127.0.0.1:$((BASE_PORT + 1))" \
    --metrics-listen 127.0.0.1:0 --copy-rate-bytes "$COPY_RATE_BYTES" \
    --shutdown-grace-secs 1 >>"$WORK/server-$fs.log" 2>&1 &
  PID=$!
  for _ in $(seq 1 150); do
    listening "$BASE_PORT" && listening $((BASE_PORT + 1)) && break
    sleep 0.1
  done
  listening "$BASE_PORT" || { echo "enbd-server did not come up" >&2; cat "$WORK/server-$fs.log" >&2; exit 1; }
  "$BIN/enbd-snapshot-stall" --nbd "127.0.0.1:$BASE_PORT" --mgmt "http://127.0.0.1:$((BASE_PORT + 1))" \
    --size-mib "$SIZE_MIB" --writers "$WRITERS" --baseline-secs "$BASELINE_SECS" --label "$fs" \
    2>>"$WORK/bench-$fs.log" || { echo "run on $fs failed:" >&2; cat "$WORK/bench-$fs.log" >&2; exit 1; }
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=0
  umount "$MNT"; MNT=""
  rm -f "$img"
done
