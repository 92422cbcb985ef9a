# Helpers for the mirrored-volume scenarios (busybox sh), sourced after common.sh: a second
# and a third enbd-server (replicas vm-b, vm-c), mirrored attach, replica status from `enbd-node list`, and the
# byte comparison of both replicas' data files.

# Mirror status from `enbd-node list` (read from a file: `grep -q` closing the pipe early
# would break enbd-node's stdout).
# engine_of VOLUME : the ENGINE column (Healthy / Degraded / Waiting).
engine_of() { enbd-node list > list.now; awk -v v="$1" '$2 == v {print $5}' list.now; }
is_engine() { [ "$(engine_of "$1")" = "$2" ]; }
# replica_state ID : in-sync / out / resyncing / down.
replica_state() { enbd-node list > list.now; awk -v r="$1" '$1 == "replica" && $2 == r {print $6}' list.now; }
is_replica() { [ "$(replica_state "$1")" = "$2" ]; }
# resync_copied ID / resync_to_copy ID : MiB copied / to copy in the pass running now.
# The table prints sizes such as `12.0MiB/100.0MiB`; MIB_OF converts one to MiB.
MIB_OF='function mib(s,  n, u) { n = s; sub(/[A-Za-z]+$/, "", n); u = substr(s, length(n) + 1);
  return n * (u == "B" ? 1 / 1048576 : u == "KiB" ? 1 / 1024 : u == "MiB" ? 1 : u == "GiB" ? 1024 : 1048576) }'
resync_copied() { enbd-node list > list.now; awk -v r="$1" "$MIB_OF"'$1 == "replica" && $2 == r && $6 == "resyncing" {split($7, a, "/"); print mib(a[1])}' list.now; }
resync_to_copy() { enbd-node list > list.now; awk -v r="$1" "$MIB_OF"'$1 == "replica" && $2 == r && $6 == "resyncing" {split($7, a, "/"); print mib(a[2])}' list.now; }
# copied_at_least ID MIB : the running pass has copied at least MIB MiB.
copied_at_least() { c=$(resync_copied "$1"); [ -n "$c" ] && awk -v c="$c" -v m="$2" 'BEGIN{exit !(c >= m)}'; }

# Second enbd-server (replica vm-b) on 127.0.0.1:10819, data in B_DATA; TLS and access as
# the first (common.sh). The mirror reaches each replica's management API over mutual TLS
# with the node's certificate (https:// in --replica).
B_DATA=/tmp/srv-b
B_PID=""
start_b() {
  mkdir -p "$B_DATA"
  # shellcheck disable=SC2086 # SERVER_TLS is a list of flags
  enbd-server --data-dir "$B_DATA" --listen 127.0.0.1:10819 --mgmt-listen 127.0.0.1:10820 \
    --metrics-listen 127.0.0.1:9820 --server-id vm-b --shutdown-grace-secs 1 \
    $SERVER_TLS --access "$ACCESS" >> server-b.log 2>&1 &
  B_PID=$!
  wait_until 30 port_listening 10819
  log "enbd-server vm-b up (pid $B_PID)"
}
kill_b() {
  kill -9 "$B_PID"; wait "$B_PID" 2>/dev/null || true; B_PID=""
  wait_until 10 port_closed 10819
  log "enbd-server vm-b killed with SIGKILL"
}

# Third enbd-server (replica vm-c) on 127.0.0.1:10829, data in C_DATA (3-replica scenarios).
C_DATA=/tmp/srv-c
C_PID=""
start_c() {
  mkdir -p "$C_DATA"
  # shellcheck disable=SC2086 # SERVER_TLS is a list of flags
  enbd-server --data-dir "$C_DATA" --listen 127.0.0.1:10829 --mgmt-listen 127.0.0.1:10830 \
    --metrics-listen 127.0.0.1:9830 --server-id vm-c --shutdown-grace-secs 1 \
    $SERVER_TLS --access "$ACCESS" >> server-c.log 2>&1 &
  C_PID=$!
  wait_until 30 port_listening 10829
  log "enbd-server vm-c up (pid $C_PID)"
}
kill_c() {
  kill -9 "$C_PID"; wait "$C_PID" 2>/dev/null || true; C_PID=""
  wait_until 10 port_closed 10829
  log "enbd-server vm-c killed with SIGKILL"
}
# mirror_volume3 NAME SIZE_MIB : the volume on all three servers' data directories.
mirror_volume3() {
  mirror_volume "$1" "$2"
  a_=$SRV_DATA; SRV_DATA=$C_DATA; new_volume "$1" "$2"; SRV_DATA=$a_
}
# attach_mirror3 NAME [flags] : as attach_mirror, over vm, vm-b and vm-c.
attach_mirror3() {
  vol_=$1; shift
  wait_until 30 port_listening 10830
  attach_mirror "$vol_" --replica vm-c@127.0.0.1:10829@https://127.0.0.1:10830 "$@"
}
# replicas_equal3 NAME : as replicas_equal, with vm-c's copy too.
replicas_equal3() {
  replicas_equal "$1"
  c_=$(sha256sum "$C_DATA/volumes/$1/data" | cut -d' ' -f1)
  log "replica data sha256: vm-c=$c_"
  [ "$a_" = "$c_" ] || fail "the replicas of $1 differ (vm-c)"
}

# mirror_volume NAME SIZE_MIB : the volume on both servers' data directories.
mirror_volume() {
  new_volume "$1" "$2"
  a_=$SRV_DATA; SRV_DATA=$B_DATA; new_volume "$1" "$2"; SRV_DATA=$a_
}

# attach_mirror NAME [flags] : attaches NAME over vm (10809) and vm-b (10819); prints the device.
# The replica timeout also bounds the mirror's management calls at open, whose first one sets
# up an HTTP/2 connection: 5 s, as 2 s was seen to time out on a loaded host.
attach_mirror() {
  vol_=$1; shift
  wait_until 30 port_listening 10810
  wait_until 30 port_listening 10820
  out=$(enbd-node attach --export "$vol_" --channels 2 --replica-timeout 5s \
    --replica vm@127.0.0.1:10809@https://127.0.0.1:10810 \
    --replica vm-b@127.0.0.1:10819@https://127.0.0.1:10820 "$@") \
    || fail "mirrored attach failed: $out"
  echo "$out" >&2
  dev_=$(echo "$out" | sed -n 's/.* as \(\/dev\/ublkb[0-9]*\) .*/\1/p')
  [ -b "$dev_" ] || fail "no device in: $out"
  echo "$dev_"
}

# replicas_equal NAME : both servers' data files of NAME have the same sha256 (nothing may be
# writing: unmount first).
replicas_equal() {
  a_=$(sha256sum "$SRV_DATA/volumes/$1/data" | cut -d' ' -f1)
  b_=$(sha256sum "$B_DATA/volumes/$1/data" | cut -d' ' -f1)
  log "replica data sha256: vm=$a_ vm-b=$b_"
  [ "$a_" = "$b_" ] || fail "the replicas of $1 differ"
}

mirror_cleanup() {
  rc=$?
  set +e   # teardown is best effort (see cleanup); its statuses must not replace rc
  [ -n "$B_PID" ] && { kill -9 "$B_PID" 2>/dev/null; wait "$B_PID" 2>/dev/null; }
  [ -n "$C_PID" ] && { kill -9 "$C_PID" 2>/dev/null; wait "$C_PID" 2>/dev/null; }
  [ $rc -ne 0 ] && { echo "---- server-b.log (tail)"; tail -n 20 server-b.log 2>/dev/null; enbd-node list 2>/dev/null; }
  rm -rf "$B_DATA" "$C_DATA"
  (exit $rc)
  cleanup
}
trap mirror_cleanup EXIT

# mkfs_ext4 DEV : ext4 with its inode tables and journal initialised now, so no background
# lazy-init writes reach the device later (the replica comparisons need a quiet device).
mkfs_ext4() { mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$1"; }

# wait_resynced VOLUME REPLICA SECS : waits until VOLUME is Healthy again, noting the largest
# "to copy" of REPLICA's resync seen meanwhile (in RESYNC_SEEN, MiB; empty if the resync was
# too quick to be seen).
wait_resynced() {
  RESYNC_SEEN=""; n_=0
  while ! is_engine "$1" Healthy; do
    t_=$(resync_to_copy "$2")
    [ -n "$t_" ] && RESYNC_SEEN=$t_
    n_=$((n_+1))
    [ $n_ -lt $(($3 * 5)) ] || fail "$1 not Healthy after $3 s: $(cat list.now)"
    sleep 0.2
  done
  log "$1 Healthy again; resync of $2 seen with ${RESYNC_SEEN:-?} MiB to copy"
}

# node_metric NAME LABEL=VALUE... : the value of the node daemon's sample NAME carrying those
# labels (in any order), scraped from its /metrics now; empty when there is none.
node_metric() {
  name_=$1; shift
  wget -q -O - http://127.0.0.1:9812/metrics > metrics.now || fail "cannot scrape the node's metrics"
  awk -v n="$name_" -v want="$*" '
    BEGIN { k = split(want, w, " ") }
    { split($1, p, "{"); if (p[1] != n) next
      for (i = 1; i <= k; i++) { split(w[i], kv, "="); if (index($1, kv[1] "=\"" kv[2] "\"") == 0) next }
      print $2; exit }' metrics.now
}
