# Shared helpers for the VM scenarios (busybox sh). Sourced by every scenario; each scenario
# runs in its own scratch directory under /tmp with `sh -e`.
#
# Layout in the guest: enbd-server serves /tmp/srv on 127.0.0.1:10809; enbd-node daemon keeps
# its state in /tmp/enbd-state and its control socket at /run/enbd-node/control.sock.
#
# Every server and daemon runs as the chart deploys them by default: NBD over TLS with client
# certificates (`--tls require --tls-client-ca`), management over mutual TLS (`--mgmt-tls
# require`, roles by certificate CN), the certificates made on the host by
# e2e/vm/lib/mkcerts.sh. ACCESS is the servers' `--access`: `open` where the scenario attaches
# with `enbd-node attach` (no controller publishes anything), `published` in the CSI scenarios,
# which set it before start_server.

SRV_DATA=/tmp/srv
NBD=127.0.0.1:10809
MGMT=https://127.0.0.1:10810
PKI=/etc/enbd/pki
ACCESS=open
# enbd-server: NBD TLS required, client certificates from the CA; management mTLS.
SERVER_TLS="--tls require --tls-cert $PKI/server-cert.pem --tls-key $PKI/server-key.pem
  --tls-client-ca $PKI/ca-cert.pem --mgmt-tls require --mgmt-client-ca $PKI/ca-cert.pem"
# enbd-node daemon: TLS for every volume, its client certificate (CN enbd-node) on the data
# path and for a mirror's management calls.
NODE_TLS="--tls require --tls-ca $PKI/ca-cert.pem --tls-cert $PKI/node-cert.pem
  --tls-key $PKI/node-key.pem"
# csi-driver: the controller's management client certificate (CN enbd-controller).
CONTROLLER_TLS="--mgmt-tls-ca $PKI/ca-cert.pem --mgmt-tls-cert $PKI/controller-cert.pem
  --mgmt-tls-key $PKI/controller-key.pem"
STATE_DIR=/tmp/enbd-state
SOCK=/run/enbd-node/control.sock
SERVER_PID=""
DAEMON_PID=""
MOUNTS=""

log() { echo "$(cut -d' ' -f1 /proc/uptime)s $*"; }
fail() { echo "FAIL: $*"; exit 1; }
now() { cut -d' ' -f1 /proc/uptime; }
# elapsed START -> seconds since START (one decimal)
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }

# wait_until SECONDS CMD... : polls CMD every 0.1 s; fails the scenario on timeout.
wait_until() {
  limit=$1; shift
  i=0
  while ! "$@" >/dev/null 2>&1; do
    i=$((i+1))
    [ $i -lt $((limit * 10)) ] || fail "timed out after ${limit}s waiting for: $*"
    sleep 0.1
  done
}

# port_listening PORT : a TCP socket listens on PORT (from /proc/net/tcp, no tools needed).
port_listening() {
  hex=$(printf ':%04X' "$1")
  awk -v p="$hex" '$2 ~ p"$" && $4 == "0A" {found=1} END{exit !found}' /proc/net/tcp
}

# new_volume NAME SIZE_MIB : creates an empty volume in the server's data directory layout
# (DATA/volumes/NAME/{data,meta.json}), as the management API would.
new_volume() {
  mkdir -p "$SRV_DATA/volumes/$1"
  truncate -s "$2M" "$SRV_DATA/volumes/$1/data"
  echo '{"format":1,"source":null,"created_at_unix":0}' > "$SRV_DATA/volumes/$1/meta.json"
}

start_server() {
  mkdir -p "$SRV_DATA"
  # shellcheck disable=SC2086 # SERVER_TLS is a list of flags
  enbd-server --data-dir "$SRV_DATA" --listen "$NBD" --mgmt-listen 127.0.0.1:10810 \
    --metrics-listen 127.0.0.1:9810 --server-id vm --shutdown-grace-secs 1 \
    $SERVER_TLS --access "$ACCESS" >> server.log 2>&1 &
  SERVER_PID=$!
  wait_until 30 port_listening 10809
  log "enbd-server up (pid $SERVER_PID)"
}

kill_server() {
  [ -n "$SERVER_PID" ] || return 0
  kill -9 "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
  wait_until 10 port_closed 10809
  log "enbd-server killed"
}

port_closed() { ! port_listening "$1"; }

daemon_ready() { enbd-node list >/dev/null 2>&1; }

start_daemon() {
  # shellcheck disable=SC2086 # NODE_TLS is a list of flags
  enbd-node daemon --state-dir "$STATE_DIR" --metrics-listen 127.0.0.1:9812 $NODE_TLS \
    >> daemon.log 2>&1 &
  DAEMON_PID=$!
  wait_until 30 daemon_ready
  log "enbd-node daemon up (pid $DAEMON_PID)"
}

# attach VOLUME [extra enbd-node attach flags] : prints the device path.
attach() {
  vol=$1; shift
  out=$(enbd-node attach --server "$NBD" --export "$vol" "$@") || fail "attach $vol failed: $out"
  echo "$out" >&2
  echo "$out" | sed -n 's/.* as \(\/dev\/ublkb[0-9]*\) .*/\1/p'
}

detach() { enbd-node detach "$1"; }

# phase_of VOLUME : the volume's phase in `enbd-node list`.
phase_of() { enbd-node list | awk -v v="$1" '$2 == v {print $4}'; }

do_mount() { mkdir -p "$2"; mount "$1" "$2" && MOUNTS="$2 $MOUNTS"; }

cleanup() {
  rc=$?
  # Teardown is best effort: under `sh -e` a failed kill or wait here would replace the
  # scenario's own status.
  set +e
  for m in $MOUNTS; do umount "$m" 2>/dev/null || true; done
  if [ -n "$DAEMON_PID" ] && daemon_ready; then
    for d in $(enbd-node list 2>/dev/null | awk 'NR>1 {print $1}'); do enbd-node detach "$d" >/dev/null 2>&1 || true; done
  fi
  [ -n "$DAEMON_PID" ] && { kill "$DAEMON_PID" 2>/dev/null; wait "$DAEMON_PID" 2>/dev/null; }
  [ -n "$SERVER_PID" ] && { kill -9 "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null; }
  if [ $rc -ne 0 ]; then
    echo "---- daemon.log (tail)"; tail -n 40 daemon.log 2>/dev/null
    echo "---- server.log (tail)"; tail -n 20 server.log 2>/dev/null
  fi
  rm -rf "$STATE_DIR" "$SRV_DATA"
  exit $rc
}
trap cleanup EXIT

# make_files DIR COUNT KIB : COUNT random files of KIB KiB each (sources for later checks).
make_files() {
  mkdir -p "$1"
  i=0
  while [ $i -lt "$2" ]; do
    dd if=/dev/urandom of="$1/f$i" bs=1024 count="$3" 2>/dev/null
    i=$((i+1))
  done
}
