#!/usr/bin/env bash
# How each NBD server under test is started on FILE (export name "demo") at 127.0.0.1:PORT,
# and stopped. Sourced by run.sh. Every start_* sets SERVER_PID (the process whose CPU time,
# children included, is charged to the server).
# Peers' quirks are documented in /work/shared/notes/nbd-peers.md and the README.

wait_nbd() { # PORT — until the server answers a handshake (timeout 15 s)
  local port=$1 i
  for i in $(seq 1 150); do
    if nbdinfo --size "nbd://127.0.0.1:$port/demo" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "server on port $port did not come up" >&2
  return 1
}

start_enbd() { # DATADIR PORT [extra flags...]
  local dir=$1 port=$2; shift 2
  "$ENBD_SERVER_BIN" --demo --data-dir "$dir" --server-id bench \
    --listen "127.0.0.1:$port" --mgmt-listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 "$@" \
    >"$WORK/enbd.log" 2>&1 &
  SERVER_PID=$!
  wait_nbd "$port"
}

start_qemu_nbd() { # FILE PORT AIO
  local file=$1 port=$2 aio=$3
  qemu-nbd -f raw -x demo -p "$port" -b 127.0.0.1 --shared=8 -t --cache=writeback \
    --aio="$aio" "$file" >"$WORK/qemu-nbd.log" 2>&1 &
  SERVER_PID=$!
  wait_nbd "$port"
}

start_nbdkit() { # FILE PORT
  local file=$1 port=$2
  nbdkit -f -p "$port" -i 127.0.0.1 file "$file" >"$WORK/nbdkit.log" 2>&1 &
  SERVER_PID=$!
  wait_nbd "$port"
}

start_nbd_server() { # FILE PORT
  local file=$1 port=$2
  cat >"$WORK/nbd-server.conf" <<CONF
[generic]
    listenaddr = 127.0.0.1
    port = $port
    allowlist = false
[demo]
    exportname = $file
    flush = true
    fua = true
    trim = true
CONF
  rm -f "$WORK/nbd-server.pid"
  nbd-server -C "$WORK/nbd-server.conf" -p "$WORK/nbd-server.pid" >"$WORK/nbd-server.log" 2>&1
  local i
  for i in $(seq 1 50); do [[ -s $WORK/nbd-server.pid ]] && break; sleep 0.1; done
  SERVER_PID=$(cat "$WORK/nbd-server.pid")
  wait_nbd "$port"
}

# Writes FILE back and drops it from the page cache, so every server starts from the same
# state: the file on disk, nothing cached. Without this each server would inherit the cache
# the previous one left (and the prefill's large page-cache folios, which make every small
# buffered write into them several times dearer on kernels with large folios).
evict_cache() { # FILE
  python3 - "$1" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
os.fsync(fd)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
os.close(fd)
PY
}

# Brings the first FILL_MIB MiB into the page cache through the server on PORT, with 4k
# random reads (each block once): the measurements that follow then see the servers, not the
# disk behind them, and every server starts them from the same cache state, made of 4k pages.
warm_up() { # PORT FILL_MIB
  local port=$1 fill=$2
  fio --name=warmup --ioengine=nbd --uri="nbd://127.0.0.1:$port/demo" --rw=randread --bs=4k \
    --numjobs=4 --iodepth=16 --size=$((fill / 4))M --offset_increment=$((fill / 4))M \
    --group_reporting --output-format=terse >/dev/null 2>"$WORK/warmup.err" \
    || { cat "$WORK/warmup.err" >&2; return 1; }
}

stop_server() {
  [[ -n ${SERVER_PID:-} ]] || return 0
  kill "$SERVER_PID" 2>/dev/null || true
  local i
  for i in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.05; done
  kill -9 "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
}

# CPU seconds (user+system, reaped children included) of PID so far.
cpu_seconds() {
  awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15 + $16 + $17) / hz }' "/proc/$1/stat"
}
