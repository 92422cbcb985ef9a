#!/usr/bin/env bash
# The ENBD client engine (`enbd-node bench`) next to fio's nbd engine (libnbd) against the same
# enbd-server, with the same connections and depth: 4k random read and write. Prints IOPS,
# client and server CPU time per request, and the engine/libnbd IOPS ratio. Run by run.sh
# after the server table, or alone. Not a timed test: numbers move with the machine's load.
#
#   e2e/bench/engine.sh                          # 10 s per cell, 2 rounds in shuffled order
#   RUNTIME=5 ROUNDS=1 CHANNELS=2 DEPTH=32 e2e/bench/engine.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/e2e/bench
RUNTIME=${RUNTIME:-10}
ROUNDS=${ROUNDS:-2}
CHANNELS=${CHANNELS:-4}
DEPTH=${DEPTH:-16}
FILL_MIB=${FILL_MIB:-512}
PORT=${ENGINE_BENCH_PORT:-12819}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
ENBD_SERVER_BIN=${ENBD_SERVER_BIN:-$TARGET/release/enbd-server}
ENBD_NODE_BIN=${ENBD_NODE_BIN:-$TARGET/release/enbd-node}

for tool in fio nbdinfo python3 /usr/bin/time; do
  command -v "$tool" >/dev/null || { echo "missing $tool (run e2e/setup-host.sh)" >&2; exit 1; }
done
if [[ ! -x $ENBD_SERVER_BIN || ! -x $ENBD_NODE_BIN ]]; then
  (cd "$ROOT" && cargo build --release -p enbd-server -p enbd-node)
fi

WORK=$(mktemp -d /var/tmp/enbd-engine-bench.XXXXXX)
SERVER_PID=
trap 'stop_server; rm -rf "$WORK"' EXIT
# shellcheck source=servers.sh
source "$HERE/servers.sh"

# One volume, its first FILL_MIB MiB filled with data so reads are not holes.
DATA=$WORK/data
start_enbd "$DATA" "$PORT"
stop_server
dd if=/dev/urandom of="$DATA/volumes/demo/data" bs=1M count="$FILL_MIB" conv=notrunc status=none
# As in run.sh: out of the cache, then back in through the server in 4k pages.
evict_cache "$DATA/volumes/demo/data"
start_enbd "$DATA" "$PORT"
warm_up "$PORT" "$FILL_MIB"

RESULTS=$WORK/results.tsv
: >"$RESULTS"
run_client() { # CLIENT RW ROUND
  local client=$1 rw=$2 round=$3 out=$WORK/$1.$2.$3
  local before after
  before=$(cpu_seconds "$SERVER_PID")
  case $client in
    libnbd)
      /usr/bin/time -f '%U %S' -o "$out.time" \
        fio --name="$rw" --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/demo" --rw="$rw" --bs=4k \
        --numjobs="$CHANNELS" --iodepth="$DEPTH" --size="${FILL_MIB}M" --time_based \
        --runtime="$RUNTIME" --ramp_time=1 --group_reporting --output-format=json \
        >"$out.json" 2>"$out.err" || { cat "$out.err" >&2; exit 1; } ;;
    engine)
      /usr/bin/time -f '%U %S' -o "$out.time" \
        "$ENBD_NODE_BIN" bench --server "127.0.0.1:$PORT" --export demo --channels "$CHANNELS" \
        --depth "$DEPTH" --rw "$rw" --bs 4k --range "${FILL_MIB}m" --seconds "$RUNTIME" --ramp 1 \
        --json >"$out.json" 2>"$out.err" || { cat "$out.err" >&2; exit 1; } ;;
  esac
  after=$(cpu_seconds "$SERVER_PID")
  printf '%s\t%s\t%s\t%s\t%s\n' "$client" "$rw" "$out" "$(echo "$after - $before" | bc -l)" "$round" >>"$RESULTS"
  echo "round $round: $client $rw done" >&2
}

for round in $(seq 1 "$ROUNDS"); do
  for rw in randread randwrite; do
    for client in $(printf '%s\n' libnbd engine | shuf); do
      run_client "$client" "$rw" "$round"
    done
  done
done

python3 - "$RESULTS" "$RUNTIME" "$CHANNELS" "$DEPTH" <<'PY'
import json, sys
results, runtime, channels, depth = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
window = (runtime + 1) / runtime  # CPU is measured over ramp + runtime (+ start-up)
best = {}
for line in open(results):
    client, rw, out, server_cpu, _round = line.rstrip("\n").split("\t")
    user, sys_ = map(float, open(out + ".time").read().split()[-2:])
    text = open(out + ".json").read()
    if client == "libnbd":
        job = json.loads(text[text.index("{"):])["jobs"][0]
        side = job["read"] if rw == "randread" else job["write"]
        iops, ios = side["iops"], side["total_ios"]
    else:
        rep = json.loads(text)
        iops, ios = rep["iops"], rep["ops"]
    ios = max(ios, 1) * window
    row = (iops, (user + sys_) / ios * 1e6, float(server_cpu) / ios * 1e6)
    key = (rw, client)
    if key not in best or iops > best[key][0]:
        best[key] = row
print()
print(f"engine vs libnbd (fio nbd engine), one enbd-server, 4k, {channels} connections x QD{depth}; best of rounds")
print(f"{'workload':<10} {'client':<8} {'IOPS':>9} {'client CPU us/req':>18} {'server CPU us/req':>18} {'engine/libnbd':>14}")
for rw in ("randread", "randwrite"):
    base = best.get((rw, "libnbd"), (0,))[0]
    for client in ("libnbd", "engine"):
        if (rw, client) not in best:
            continue
        iops, ccpu, scpu = best[(rw, client)]
        ratio = f"{iops / base:.2f}x" if base and client == "engine" else ""
        print(f"{rw:<10} {client:<8} {iops:>9.0f} {ccpu:>18.1f} {scpu:>18.1f} {ratio:>14}")
PY
