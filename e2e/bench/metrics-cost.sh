#!/usr/bin/env bash
# What the node's per-volume metrics cost a request: `enbd-node bench` against one
# enbd-server, 4k random read and write, without and with `--metrics-listen` (with it, the
# IO goes through the device target that keeps the per-volume counters and histograms, as
# a ublk device's does, and the metrics are served). Prints IOPS and client CPU time per
# request of both, and the difference. The difference is an upper bound of the metrics'
# cost: the device-target layer itself is in it too. Not a timed test: numbers move with
# the machine's load; the cells are interleaved in shuffled order.
#
#   e2e/bench/metrics-cost.sh                  # 10 s per cell, 3 rounds
#   RUNTIME=5 ROUNDS=2 e2e/bench/metrics-cost.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/e2e/bench
RUNTIME=${RUNTIME:-10}
ROUNDS=${ROUNDS:-3}
CHANNELS=${CHANNELS:-4}
DEPTH=${DEPTH:-16}
FILL_MIB=${FILL_MIB:-256}
PORT=${METRICS_BENCH_PORT:-12839}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
ENBD_SERVER_BIN=${ENBD_SERVER_BIN:-$TARGET/release/enbd-server}
ENBD_NODE_BIN=${ENBD_NODE_BIN:-$TARGET/release/enbd-node}

for tool in nbdinfo python3 /usr/bin/time; do
  command -v "$tool" >/dev/null || { echo "missing $tool (run e2e/setup-host.sh)" >&2; exit 1; }
done
if [[ ! -x $ENBD_SERVER_BIN || ! -x $ENBD_NODE_BIN ]]; then
  (cd "$ROOT" && cargo build --release -p enbd-server -p enbd-node)
fi

WORK=$(mktemp -d /var/tmp/enbd-metrics-bench.XXXXXX)
SERVER_PID=
trap 'stop_server; rm -rf "$WORK"' EXIT
# shellcheck source=servers.sh
source "$HERE/servers.sh"

DATA=$WORK/data
start_enbd "$DATA" "$PORT"
stop_server
dd if=/dev/urandom of="$DATA/volumes/demo/data" bs=1M count="$FILL_MIB" conv=notrunc status=none
start_enbd "$DATA" "$PORT"
warm_up "$PORT" "$FILL_MIB"

RESULTS=$WORK/results.tsv
: >"$RESULTS"
run_cell() { # VARIANT RW ROUND
  local variant=$1 rw=$2 round=$3 out=$WORK/$1.$2.$3 extra=()
  [[ $variant == metrics ]] && extra=(--metrics-listen 127.0.0.1:0)
  /usr/bin/time -f '%U %S' -o "$out.time" \
    "$ENBD_NODE_BIN" bench --server "127.0.0.1:$PORT" --export demo --channels "$CHANNELS" \
    --depth "$DEPTH" --rw "$rw" --bs 4k --range "${FILL_MIB}m" --seconds "$RUNTIME" --ramp 1 \
    "${extra[@]}" --json >"$out.json" 2>"$out.err" || { cat "$out.err" >&2; exit 1; }
  printf '%s\t%s\t%s\n' "$variant" "$rw" "$out" >>"$RESULTS"
  echo "round $round: $variant $rw done" >&2
}

for round in $(seq 1 "$ROUNDS"); do
  for rw in randread randwrite; do
    for variant in $(printf '%s\n' plain metrics | shuf); do
      run_cell "$variant" "$rw" "$round"
    done
  done
done

python3 - "$RESULTS" "$RUNTIME" "$CHANNELS" "$DEPTH" "$ROUNDS" <<'PY'
import json, statistics, sys
results, runtime, channels, depth, rounds = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
window = (runtime + 1) / runtime  # CPU is measured over ramp + runtime (+ start-up)
cells = {}
for line in open(results):
    variant, rw, out = line.rstrip("\n").split("\t")
    user, sys_ = map(float, open(out + ".time").read().split()[-2:])
    # With --metrics-listen the bench prints its readiness line first.
    text = open(out + ".json").read()
    rep = json.loads(text[text.index("{"):])
    ios = max(rep["ops"], 1) * window
    cells.setdefault((rw, variant), []).append((rep["iops"], (user + sys_) / ios * 1e6))
print()
print(f"node metrics cost: enbd-node bench, one enbd-server, 4k, {channels} connections x QD{depth}; median of {rounds} rounds")
print(f"{'workload':<10} {'variant':<8} {'IOPS':>9} {'client CPU us/req':>18} {'CPU vs plain':>13}")
for rw in ("randread", "randwrite"):
    med = {v: (statistics.median(x[0] for x in cells[(rw, v)]),
               statistics.median(x[1] for x in cells[(rw, v)])) for v in ("plain", "metrics")}
    for v in ("plain", "metrics"):
        iops, cpu = med[v]
        diff = f"{100 * (cpu - med['plain'][1]) / med['plain'][1]:+.1f}%" if v == "metrics" else ""
        print(f"{rw:<10} {v:<8} {iops:>9.0f} {cpu:>18.1f} {diff:>13}")
PY
