#!/usr/bin/env bash
# TLS against plain text on the data path, in one run: the ENBD client engine
# (`enbd-node bench`, which speaks NBD_OPT_STARTTLS; fio's nbd engine has no TLS) against
# enbd-server with `--tls optional`, then against nbdkit with `--tls=on` (GnuTLS) as the peer,
# each server serving the same file and both the plain and the TLS client. Cells: 4k random
# read and write (IOPS) and 1 MiB random read and write (MB/s). Prints the table with the
# TLS/plain ratio. Not a timed test: numbers move with the machine's load.
#
#   e2e/bench/tls.sh                     # 5 s per cell, 1 round
#   RUNTIME=10 ROUNDS=2 CHANNELS=2 DEPTH=32 e2e/bench/tls.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/e2e/bench
RUNTIME=${RUNTIME:-5}
ROUNDS=${ROUNDS:-1}
CHANNELS=${CHANNELS:-4}
DEPTH=${DEPTH:-16}
FILL_MIB=${FILL_MIB:-512}
PORT=${TLS_BENCH_PORT:-12829}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
ENBD_SERVER_BIN=${ENBD_SERVER_BIN:-$TARGET/release/enbd-server}
ENBD_NODE_BIN=${ENBD_NODE_BIN:-$TARGET/release/enbd-node}

for tool in fio nbdinfo nbdkit openssl python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool (run e2e/setup-host.sh)" >&2; exit 1; }
done
if [[ ! -x $ENBD_SERVER_BIN || ! -x $ENBD_NODE_BIN ]]; then
  (cd "$ROOT" && cargo build --release -p enbd-server -p enbd-node)
fi

WORK=$(mktemp -d /var/tmp/enbd-tls-bench.XXXXXX)
SERVER_PID=
trap 'stop_server; rm -rf "$WORK"' EXIT
# shellcheck source=servers.sh
source "$HERE/servers.sh"

# Lab certificates, as the README shows: a CA and a server certificate for 127.0.0.1, in
# the layout nbdkit reads (ca-cert.pem, server-cert.pem, server-key.pem).
PKI=$WORK/pki
mkdir -p "$PKI"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench-ca \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
  -keyout "$PKI/ca-key.pem" -out "$PKI/ca-cert.pem" 2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
  -keyout "$PKI/server-key.pem" -out "$PKI/server.csr" 2>/dev/null
printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$PKI/server.ext"
openssl x509 -req -in "$PKI/server.csr" -CA "$PKI/ca-cert.pem" -CAkey "$PKI/ca-key.pem" \
  -set_serial "0x$(openssl rand -hex 8)" -days 2 -extfile "$PKI/server.ext" -out "$PKI/server-cert.pem" 2>/dev/null

DATA=$WORK/data
FILE=$DATA/volumes/demo/data
start_enbd "$DATA" "$PORT"
stop_server
dd if=/dev/urandom of="$FILE" bs=1M count="$FILL_MIB" conv=notrunc status=none

start_server() { # enbd|nbdkit
  evict_cache "$FILE"
  case $1 in
    enbd) start_enbd "$DATA" "$PORT" --tls optional --tls-cert "$PKI/server-cert.pem" \
            --tls-key "$PKI/server-key.pem" ;;
    nbdkit)
      nbdkit -f -p "$PORT" -i 127.0.0.1 --tls=on --tls-certificates="$PKI" file "$FILE" \
        >"$WORK/nbdkit.log" 2>&1 &
      SERVER_PID=$!
      wait_nbd "$PORT" ;;
  esac
  warm_up "$PORT" "$FILL_MIB"
}

RESULTS=$WORK/results.tsv
: >"$RESULTS"
run_cell() { # SERVER TRANSPORT RW BS ROUND
  local server=$1 transport=$2 rw=$3 bs=$4 round=$5 out=$WORK/$1.$2.$3.$4.$5 tls=()
  [[ $transport == tls ]] && tls=(--tls-ca "$PKI/ca-cert.pem")
  "$ENBD_NODE_BIN" bench --server "127.0.0.1:$PORT" --export demo --channels "$CHANNELS" \
    --depth "$DEPTH" --rw "$rw" --bs "$bs" --range "${FILL_MIB}m" --seconds "$RUNTIME" --ramp 1 \
    "${tls[@]}" --json >"$out.json" 2>"$out.err" || { cat "$out.err" >&2; exit 1; }
  printf '%s\t%s\t%s\t%s\t%s\n' "$server" "$transport" "$rw" "$bs" "$out.json" >>"$RESULTS"
  echo "round $round: $server $transport $rw $bs done" >&2
}

for server in enbd nbdkit; do
  start_server "$server"
  for round in $(seq 1 "$ROUNDS"); do
    for cell in "randread 4k" "randwrite 4k" "randread 1m" "randwrite 1m"; do
      read -r rw bs <<<"$cell"
      for transport in $(printf '%s\n' plain tls | shuf); do
        run_cell "$server" "$transport" "$rw" "$bs" "$round"
      done
    done
  done
  stop_server
done

python3 - "$RESULTS" "$CHANNELS" "$DEPTH" <<'PY'
import json, sys
results, channels, depth = sys.argv[1], sys.argv[2], sys.argv[3]
best = {}
for line in open(results):
    server, transport, rw, bs, out = line.rstrip("\n").split("\t")
    rep = json.load(open(out))
    key = (server, rw, bs, transport)
    if key not in best or rep["iops"] > best[key]["iops"]:
        best[key] = rep
print()
print(f"TLS vs plain, client: enbd-node bench (the engine), {channels} connections x QD{depth}; best of rounds")
print(f"{'server':<12} {'workload':<14} {'plain':>12} {'TLS':>12} {'TLS/plain':>10} {'engine CPU us/req plain/TLS':>28}")
for server in ("enbd", "nbdkit"):
    for rw, bs in (("randread", "4k"), ("randwrite", "4k"), ("randread", "1m"), ("randwrite", "1m")):
        p, t = best.get((server, rw, bs, "plain")), best.get((server, rw, bs, "tls"))
        if not p or not t:
            continue
        metric = "iops" if bs == "4k" else "mb_per_s"
        unit = "IOPS" if bs == "4k" else "MB/s"
        name = "enbd-server" if server == "enbd" else "nbdkit"
        cpu = f"{p['cpu_us_per_op']:.1f} / {t['cpu_us_per_op']:.1f}"
        print(f"{name:<12} {rw + ' ' + bs:<14} {p[metric]:>7.0f} {unit:<4} {t[metric]:>7.0f} {unit:<4} "
              f"{t[metric] / p[metric]:>9.2f}x {cpu:>28}")
PY
