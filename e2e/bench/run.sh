#!/usr/bin/env bash
# enbd-server vs qemu-nbd, nbdkit (file plugin) and nbd-server, in one run on the same sparse
# file, each driven by fio's nbd engine. Prints IOPS / MB/s, server CPU time per request, and
# the ratio to the best peer. Not a timed test: numbers vary with the machine and its load.
#
#   e2e/bench/run.sh                       # 10 s per cell, one round
#   RUNTIME=5 ROUNDS=2 e2e/bench/run.sh    # rounds run the servers in shuffled order; best kept
#   SERVERS="enbd qemu-nbd" e2e/bench/run.sh
#   ENBD_SERVER_ARGS="--io-engine uring" e2e/bench/run.sh
#   CELLS="randread4k" SERVERS="enbd nbdkit" ROUNDS=3 e2e/bench/run.sh
#   SERVERS="enbd enbd-uring enbd-pool4" e2e/bench/run.sh   # engine variants
# Every round's numbers are printed to stderr as they come; the table keeps each server's best
# round per cell (other load on the machine only ever lowers a number).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/e2e/bench
RUNTIME=${RUNTIME:-10}
ROUNDS=${ROUNDS:-1}
SERVERS=${SERVERS:-"enbd qemu-nbd nbdkit nbd-server"}
FILL_MIB=${FILL_MIB:-512}
PORT=${PORT:-12809}
ENBD_SERVER_BIN=${ENBD_SERVER_BIN:-$ROOT/target/release/enbd-server}
read -r -a ENBD_ARGS <<<"${ENBD_SERVER_ARGS:-}"

for tool in fio nbdinfo qemu-nbd nbdkit nbd-server python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool (run e2e/setup-host.sh)" >&2; exit 1; }
done
if [[ ! -x $ENBD_SERVER_BIN ]]; then
  (cd "$ROOT" && cargo build --release -p enbd-server)
  ENBD_SERVER_BIN=$ROOT/target/release/enbd-server
fi

WORK=$(mktemp -d /var/tmp/enbd-bench.XXXXXX)
SERVER_PID=
trap 'stop_server; rm -rf "$WORK"' EXIT
# shellcheck source=servers.sh
source "$HERE/servers.sh"

# The shared volume: enbd-server creates it (1 GiB sparse) in its data directory; the first
# FILL_MIB MiB get real data so reads are not all holes. Peers serve the very same file.
DATA=$WORK/data
start_enbd "$DATA" "$PORT" "${ENBD_ARGS[@]}"
stop_server
FILE=$DATA/volumes/demo/data
dd if=/dev/urandom of="$FILE" bs=1M count="$FILL_MIB" conv=notrunc status=none
sync

# name: fio arguments. 4k rows: 4 connections x QD16. 1 MiB rows: 4 connections x QD4, each
# job streaming through its own quarter of the filled region.
read -r -a CELLS <<<"${CELLS:-randread4k randwrite4k read1m write1m}"
declare -A CELL_ARGS=(
  [randread4k]="--rw=randread --bs=4k --numjobs=4 --iodepth=16 --size=${FILL_MIB}M"
  [randwrite4k]="--rw=randwrite --bs=4k --numjobs=4 --iodepth=16 --size=${FILL_MIB}M"
  [read1m]="--rw=read --bs=1M --numjobs=4 --iodepth=4 --size=$((FILL_MIB / 4))M --offset_increment=$((FILL_MIB / 4))M"
  [write1m]="--rw=write --bs=1M --numjobs=4 --iodepth=4 --size=$((FILL_MIB / 4))M --offset_increment=$((FILL_MIB / 4))M"
)

start() {
  evict_cache "$FILE"
  case $1 in
    enbd) start_enbd "$DATA" "$PORT" "${ENBD_ARGS[@]}" ;;
    # Engine variants, for choosing the default: enbd-uring, enbd-pool<threads>.
    enbd-uring) start_enbd "$DATA" "$PORT" --io-engine uring ;;
    enbd-pool*) start_enbd "$DATA" "$PORT" --io-engine pool --io-threads "${1#enbd-pool}" ;;
    qemu-nbd) start_qemu_nbd "$FILE" "$PORT" io_uring ;;
    qemu-nbd-threads) start_qemu_nbd "$FILE" "$PORT" threads ;;
    nbdkit) start_nbdkit "$FILE" "$PORT" ;;
    nbd-server) start_nbd_server "$FILE" "$PORT" ;;
    *) echo "unknown server $1" >&2; exit 1 ;;
  esac
}

RESULTS=$WORK/results.tsv
: >"$RESULTS"
for round in $(seq 1 "$ROUNDS"); do
  order=$(printf '%s\n' $SERVERS | shuf)
  for server in $order; do
    start "$server"
    warm_up "$PORT" "$FILL_MIB"
    for cell in "${CELLS[@]}"; do
      before=$(cpu_seconds "$SERVER_PID")
      # shellcheck disable=SC2086
      fio --name="$cell" --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/demo" ${CELL_ARGS[$cell]} \
        --time_based --runtime="$RUNTIME" --ramp_time=1 --group_reporting --output-format=json \
        >"$WORK/$server.$cell.$round.json" 2>"$WORK/fio.err" || { cat "$WORK/fio.err" >&2; exit 1; }
      # nbd-server forks per connection: give the parent a moment to reap its children so
      # their CPU time is counted.
      sleep 0.3
      after=$(cpu_seconds "$SERVER_PID")
      printf '%s\t%s\t%s\t%s\t%s\n' "$server" "$cell" "$round" "$WORK/$server.$cell.$round.json" \
        "$(echo "$after - $before" | bc -l)" >>"$RESULTS"
      python3 - "$WORK/$server.$cell.$round.json" "$cell" "$server" "$round" >&2 <<'PY'
import json, sys
text = open(sys.argv[1]).read()
job = json.loads(text[text.index("{"):])["jobs"][0]
side = job["read"] if "read" in sys.argv[2] else job["write"]
print(f"round {sys.argv[4]}: {sys.argv[3]:<12} {sys.argv[2]:<12} {side['iops']:>9.0f} IOPS")
PY
    done
    stop_server
  done
done

python3 - "$RESULTS" "$RUNTIME" <<'PY'
import json, sys
results, runtime = sys.argv[1], float(sys.argv[2])
best = {}  # (server, cell) -> (ops/s, MB/s, cpu s per request); the best round is kept
for line in open(results):
    server, cell, _round, path, cpu = line.rstrip("\n").split("\t")
    text = open(path).read()  # fio may print warnings before the JSON
    job = json.loads(text[text.index("{"):])["jobs"][0]
    side = job["read"] if "read" in cell else job["write"]
    iops, mbs = side["iops"], side["bw_bytes"] / 1e6
    ios = side["total_ios"] or 1
    # CPU is measured over ramp + runtime; spread it over the requests of the same window.
    cpu_per_req_us = float(cpu) / (ios * (runtime + 1) / runtime) * 1e6
    key = (server, cell)
    if key not in best or iops > best[key][0]:
        best[key] = (iops, mbs, cpu_per_req_us)
servers = sorted({s for s, _ in best}, key=lambda s: (not s.startswith("enbd"), s))
cells = ["randread4k", "randwrite4k", "read1m", "write1m"]
print()
print(f"{'cell':<12} {'server':<17} {'IOPS':>9} {'MB/s':>8} {'CPU us/req':>10}  {'vs best peer':>12}")
for cell in cells:
    peers = [best[(s, cell)][0] for s in servers if not s.startswith("enbd") and (s, cell) in best]
    top = max(peers) if peers else None
    for s in servers:
        if (s, cell) not in best:
            continue
        iops, mbs, cpu = best[(s, cell)]
        ratio = f"{iops / top:.2f}x" if top else "-"
        print(f"{cell:<12} {s:<17} {iops:>9.0f} {mbs:>8.1f} {cpu:>10.1f}  {ratio:>12}")
    print()
PY

if [[ -x $HERE/engine.sh && -z ${SKIP_ENGINE:-} ]]; then
  "$HERE/engine.sh"
fi
