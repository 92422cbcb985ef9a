#!/usr/bin/env bash
# Mirrored volumes on loopback, through the client engine (`enbd-node bench`, no ublk): three
# enbd-servers on this machine, one table for 1, 2 and 3 replicas (4k random write IOPS, 4k
# random read IOPS, 1 MiB random write MB/s), then the resync measurement
# (`enbd-node bench-resync`, one replica's server SIGKILLed while it writes, restarted
# after): bytes copied / bytes written while degraded, and the resync rate next to a raw copy
# of the same bytes (nbdcopy between two of the enbd-servers, and dd of the data file).
# And what the mirror's activity log costs: 4k random writes with 1 replica (one Client), and
# 2 replicas without (`--no-activity-log`) and with it, in the same run, client CPU per write.
# Not a timed test: numbers move with the machine's load.
#
#   e2e/bench/mirror.sh                      # make bench-mirror; 10 s per cell
#   RUNTIME=5 VOL_MIB=128 SPAN_MIB=32 e2e/bench/mirror.sh
#   AL_ONLY=1 ROUNDS=3 e2e/bench/mirror.sh   # the activity-log table only, 3 rounds
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
RUNTIME=${RUNTIME:-10}
VOL_MIB=${VOL_MIB:-256}      # volume size for the throughput table (prefilled: reads hit data)
SPAN_MIB=${SPAN_MIB:-64}     # volume (and write span) size for the resync measurement
BASE_PORT=${MIRROR_BENCH_PORT:-12830}
AL_ONLY=${AL_ONLY:-0}        # 1: only the activity-log cost table
ROUNDS=${ROUNDS:-1}          # rounds of the activity-log cells (interleaved)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
ENBD_SERVER_BIN=${ENBD_SERVER_BIN:-$TARGET/release/enbd-server}
ENBD_NODE_BIN=${ENBD_NODE_BIN:-$TARGET/release/enbd-node}

for tool in nbdcopy python3 sha256sum; do
  command -v "$tool" >/dev/null || { echo "missing $tool (run e2e/setup-host.sh)" >&2; exit 1; }
done
if [[ ! -x $ENBD_SERVER_BIN || ! -x $ENBD_NODE_BIN ]]; then
  (cd "$ROOT" && cargo build --release -p enbd-server -p enbd-node)
fi

WORK=$(mktemp -d /var/tmp/enbd-mirror-bench.XXXXXX)
PIDS=(0 0 0)
stop_all() {
  local i
  for i in 0 1 2; do stop_server "$i"; done
}
trap 'stop_all; rm -rf "$WORK"' EXIT

nbd_port() { echo $((BASE_PORT + $1)); }
mgmt_port() { echo $((BASE_PORT + 10 + $1)); }
spec() { echo "bench-$1@127.0.0.1:$(nbd_port "$1")@http://127.0.0.1:$(mgmt_port "$1")"; }
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_server() { # INDEX
  local i=$1 n
  "$ENBD_SERVER_BIN" --data-dir "$WORK/srv-$i" --server-id "bench-$i" \
    --listen "127.0.0.1:$(nbd_port "$i")" --mgmt-listen "127.0.0.1:$(mgmt_port "$i")" \
    --metrics-listen 127.0.0.1:0 --shutdown-grace-secs 1 >>"$WORK/srv-$i.log" 2>&1 &
  PIDS[i]=$!
  for n in $(seq 1 150); do
    listening "$(nbd_port "$i")" && listening "$(mgmt_port "$i")" && return 0
    sleep 0.1
  done
  echo "enbd-server bench-$i did not come up" >&2; cat "$WORK/srv-$i.log" >&2; exit 1
}
stop_server() { # INDEX (SIGKILL: the replica's server dies)
  local i=$1
  [[ ${PIDS[i]} != 0 ]] || return 0
  kill -9 "${PIDS[i]}" 2>/dev/null || true
  wait "${PIDS[i]}" 2>/dev/null || true
  PIDS[i]=0
}

# volume NAME MIB SOURCE INDEX... : the volume in each server's data directory layout, every
# copy a byte-identical copy of SOURCE, with the first membership record (generation 1, all
# in sync) when there are several, as the controller writes it for a new mirrored volume.
volume() {
  local name=$1 mib=$2 src=$3 i members=(); shift 3
  for i in "$@"; do members+=("{\"replica_id\":\"bench-$i\",\"state\":\"in_sync\"}"); done
  for i in "$@"; do
    mkdir -p "$WORK/srv-$i/volumes/$name"
    cp --sparse=never "$src" "$WORK/srv-$i/volumes/$name/data"
    truncate -s "${mib}M" "$WORK/srv-$i/volumes/$name/data"
    echo '{"format":1,"source":null,"created_at_unix":0}' >"$WORK/srv-$i/volumes/$name/meta.json"
    [[ $# -gt 1 ]] || continue
    (IFS=,; echo "{\"format\":1,\"generation\":1,\"region_bytes\":1048576,\"members\":[${members[*]}]}") \
      >"$WORK/srv-$i/volumes/$name/membership.json"
  done
}

echo "mirror bench: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), ${RUNTIME}s per cell" >&2
dd if=/dev/urandom of="$WORK/fill" bs=1M count="$VOL_MIB" status=none
volume r1 "$VOL_MIB" "$WORK/fill" 0
volume r2 "$VOL_MIB" "$WORK/fill" 0 1
volume r3 "$VOL_MIB" "$WORK/fill" 0 1 2
dd if=/dev/urandom of="$WORK/span" bs=1M count="$SPAN_MIB" status=none
volume rs "$SPAN_MIB" "$WORK/span" 0 1
volume raw "$SPAN_MIB" "$WORK/span" 1
rm -f "$WORK/fill"
for i in 0 1 2; do start_server "$i"; done

# cell REPLICAS RW BS CHANNELS DEPTH [BENCH FLAGS] -> JSON report of `enbd-node bench`
cell() {
  local n=$1 rw=$2 bs=$3 ch=$4 depth=$5 target=(); shift 5
  if [[ $n == 1 ]]; then
    target=(--server "127.0.0.1:$(nbd_port 0)")
  else
    for i in $(seq 0 $((n - 1))); do target+=(--replica "$(spec "$i")"); done
  fi
  "$ENBD_NODE_BIN" bench "${target[@]}" --export "r$n" --channels "$ch" --depth "$depth" \
    --rw "$rw" --bs "$bs" --seconds "$RUNTIME" --ramp 1 --json "$@"
}

# The activity log's cost: the same 4k random writes on 1 replica, 2 without the log, 2 with
# it, interleaved round by round so load drifts hit all three alike.
ALRES=$WORK/al.tsv
: >"$ALRES"
for round in $(seq 1 "$ROUNDS"); do
  printf '1\t%s\n' "$(cell 1 randwrite 4k 4 16)" >>"$ALRES"
  printf '2-off\t%s\n' "$(cell 2 randwrite 4k 4 16 --no-activity-log)" >>"$ALRES"
  printf '2-on\t%s\n' "$(cell 2 randwrite 4k 4 16)" >>"$ALRES"
  echo "activity-log round $round done" >&2
done
python3 - "$ALRES" "$RUNTIME" <<'PY'
import json, sys
from collections import defaultdict
rows = defaultdict(list)
for line in open(sys.argv[1]):
    k, js = line.rstrip("\n").split("\t", 1)
    rows[k].append(json.loads(js))
def mean(k, f):
    return sum(r[f] for r in rows[k]) / len(rows[k])
print()
print(f"activity log: 4k random writes (4 channels x QD16 per replica), {sys.argv[2]} s per cell, "
      f"{len(rows['1'])} round(s), means")
print("| mirror | IOPS | client CPU µs per write | p99 µs |")
print("|---|---:|---:|---:|")
names = {"1": "1 replica (one Client)", "2-off": "2 replicas, no activity log",
         "2-on": "2 replicas, activity log"}
for k in ("1", "2-off", "2-on"):
    print(f"| {names[k]} | {mean(k, 'iops'):,.0f} | {mean(k, 'cpu_us_per_op'):.1f} | "
          f"{mean(k, 'p99_us'):,.0f} |".replace(",", " "))
one, off, on = (mean(k, "cpu_us_per_op") for k in ("1", "2-off", "2-on"))
print(f"activity log: {100 * (on - off) / off:+.1f}% client CPU per write; "
      f"mirroring over sending each write to 2 replicas (2 x one Client's {one:.1f} µs): "
      f"without the log {100 * (off - 2 * one) / (2 * one):+.1f}%, with it "
      f"{100 * (on - 2 * one) / (2 * one):+.1f}% (target <= +30%)")
PY
[[ $AL_ONLY == 1 ]] && exit 0
RESULTS=$WORK/results.tsv
: >"$RESULTS"
for n in 1 2 3; do
  w4k=$(cell "$n" randwrite 4k 4 16)
  r4k=$(cell "$n" randread 4k 4 16)
  w1m=$(cell "$n" randwrite 1m 4 4)
  printf '%s\tw4k\t%s\n%s\tr4k\t%s\n%s\tw1m\t%s\n' "$n" "$w4k" "$n" "$r4k" "$n" "$w1m" >>"$RESULTS"
  echo "replicas=$n done" >&2
done

# resync CASE ARGS... : one bench-resync run with bench-1's server killed and restarted when
# told; afterwards both replicas' data files must be identical.
RESYNC=$WORK/resync.tsv
: >"$RESYNC"
resync() {
  local name=$1 out=$WORK/resync-$1.out; shift
  : >"$out"
  "$ENBD_NODE_BIN" bench-resync --replica "$(spec 0)" --replica "$(spec 1)" --export rs \
    --drop bench-1 --span "${SPAN_MIB}m" "$@" >"$out" 2>"$out.err" &
  local pid=$! n
  for n in $(seq 1 1200); do grep -q '^kill ' "$out" && break; sleep 0.05; done
  grep -q '^kill ' "$out" || { cat "$out.err" >&2; exit 1; }
  stop_server 1
  for n in $(seq 1 6000); do grep -q '^restart ' "$out" && break; sleep 0.05; done
  grep -q '^restart ' "$out" || { cat "$out.err" >&2; exit 1; }
  start_server 1
  wait "$pid" || { cat "$out.err" >&2; exit 1; }
  local a b
  a=$(sha256sum <"$WORK/srv-0/volumes/rs/data"); b=$(sha256sum <"$WORK/srv-1/volumes/rs/data")
  [[ $a == "$b" ]] || { echo "resync $name: the replicas differ after the resync" >&2; exit 1; }
  printf '%s\t%s\n' "$name" "$(tail -1 "$out")" >>"$RESYNC"
  echo "resync $name done (replicas identical)" >&2
}
resync random-full --pattern random --bs 4k --write-bytes "${SPAN_MIB}m"
resync random-quarter --pattern random --bs 4k --write-bytes "$((SPAN_MIB / 4))m"
resync scattered --pattern scattered --bs 4k --stride 1m

# The raw copy of the same bytes on the same machine: nbdcopy from bench-0's export to a
# volume on bench-1 (the path a resync takes: NBD read, NBD write, flush), and dd of the file.
t0=$(date +%s.%N)
nbdcopy --flush --no-extents "nbd://127.0.0.1:$(nbd_port 0)/rs" "nbd://127.0.0.1:$(nbd_port 1)/raw"
t1=$(date +%s.%N)
dd if="$WORK/srv-0/volumes/rs/data" of="$WORK/dd-copy" bs=1M conv=fsync status=none
t2=$(date +%s.%N)
SPAN_BYTES=$((SPAN_MIB << 20))

python3 - "$RESULTS" "$RESYNC" "$SPAN_BYTES" "$t0" "$t1" "$t2" "$RUNTIME" <<'PY'
import json, sys
results, resync, span, t0, t1, t2, runtime = sys.argv[1:]
span, t0, t1, t2 = int(span), float(t0), float(t1), float(t2)
cells = {}
for line in open(results):
    n, cell, js = line.rstrip("\n").split("\t", 2)
    cells[(int(n), cell)] = json.loads(js)
print()
print(f"replicas on loopback, engine without ublk, {runtime} s per cell "
      "(4k: 4 channels x QD16 per replica set; 1 MiB: 4 x QD4)")
print("| replicas | 4k random write IOPS | 4k random read IOPS | 1 MiB random write MB/s | 4k write p99 µs |")
print("|---:|---:|---:|---:|---:|")
for n in (1, 2, 3):
    w, r, big = cells[(n, "w4k")], cells[(n, "r4k")], cells[(n, "w1m")]
    print(f"| {n} | {w['iops']:,.0f} | {r['iops']:,.0f} | {big['mb_per_s']:,.0f} | {w['p99_us']} |".replace(",", " "))
MIB = 1 << 20
nbdcopy_rate, dd_rate = span / (t1 - t0), span / (t2 - t1)
print()
print(f"resync of a {span // MIB} MiB volume, 2 replicas, one SIGKILLed while written, 1 MiB regions")
print("| writes while degraded | written MiB | copied MiB | copied / written | resync MiB/s | vs nbdcopy |")
print("|---|---:|---:|---:|---:|---:|")
what = {
    "random-full": "4k random over the whole volume, volume-size bytes",
    "random-quarter": "4k random over the whole volume, a quarter of its size",
    "scattered": "one 4k write per 1 MiB region",
}
for line in open(resync):
    name, js = line.rstrip("\n").split("\t", 1)
    r = json.loads(js)
    rate = r["resync_bytes_per_sec"]
    print(f"| {what[name]} ({r['writes']} writes) | {r['bytes_written'] / MIB:.2f} | "
          f"{r['bytes_copied'] / MIB:.2f} | {r['ratio']:.2f} | {rate / MIB:.1f} | "
          f"{rate / nbdcopy_rate:.2f}x |")
print(f"raw copy of the same {span // MIB} MiB: nbdcopy enbd-server -> enbd-server "
      f"{nbdcopy_rate / MIB:.1f} MiB/s, dd of the data file (conv=fsync) {dd_rate / MIB:.1f} MiB/s")
PY
