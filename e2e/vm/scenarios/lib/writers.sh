# Checksummed writers for the VM scenarios (busybox sh), sourced after common.sh: files
# copied with fsync and checked by sha256, and fio random writes checked by fio's own verify.
# Every failed write is counted and reported; none is tolerated by the callers.

# make_sources SET COUNT KIB : COUNT random files SET/f0.. and their manifest SET.sha256.
make_sources() {
  make_files "$1" "$2" "$3"
  (cd "$1" && sha256sum f*) > "$1.sha256"
}

# start_files_writer SET DEST [MARK] : copies every file of SET into DEST (mkdir'ed) with
# dd conv=fsync, in the background (its pid in WRITER_PID), DEST's mkdir included: the caller
# never touches the device, so it may start a writer while IO is held. After MARK files it
# touches SET.mark; at the end it writes the number of failed copies to SET.errors.
start_files_writer() {
  set_=$1; dest_=$2; mark_=${3:-0}
  rm -f "$set_.mark" "$set_.errors"
  (
    errors=0; n=0
    mkdir -p "$dest_" || errors=1
    for f in $(cd "$set_" && ls); do
      dd if="$set_/$f" of="$dest_/$f" bs=64k conv=fsync 2>/dev/null || errors=$((errors+1))
      n=$((n+1))
      [ $n = "$mark_" ] && touch "$set_.mark"
    done
    echo $errors > "$set_.errors"
  ) &
  WRITER_PID=$!
}

# wait_files_writer SET PID : waits for the writer; fails the scenario on any error.
wait_files_writer() {
  wait "$2" || true
  [ -e "$1.errors" ] || fail "writer $1 did not finish"
  errors=$(cat "$1.errors")
  [ "$errors" = 0 ] || fail "writer $1 saw $errors IO errors"
  log "writer $1: 0 errors"
}

# files_writer_done SET : the writer of SET has finished.
files_writer_done() { [ -e "$1.errors" ]; }

# verify_files SET DIR : every file of SET's manifest has its checksum in DIR.
verify_files() {
  m_=$(pwd)/$1.sha256
  (cd "$2" && sha256sum -c "$m_" > /dev/null) || {
    (cd "$2" && sha256sum -c "$m_" 2>&1 | grep -v ': OK$' | head -n 5)
    fail "files of $1 differ in $2"
  }
  log "$(wc -l < "$m_") files of $1 verified (sha256) in $2"
}

# start_fio JOB FILE SIZE_MIB IO_MIB RATE_IOPS : fio random 4 KiB writes (IO_MIB of them over
# a SIZE_MIB file, at most RATE_IOPS per second, so the job outlasts the events it is meant
# to see), then fio's read-back verify (crc32c), in the background (pid in FIO_PID). The job's
# arguments are kept in JOB.args for verify_fio_again.
start_fio() {
  echo "--name=$1 --filename=$2 --size=${3}M --io_size=${4}M --rw=randwrite --bs=4k \
--direct=1 --ioengine=libaio --iodepth=8 --verify=crc32c --verify_fatal=1" > "$1.args"
  # shellcheck disable=SC2046
  fio $(cat "$1.args") --rate_iops="$5" --do_verify=1 --output="$1.fio.out" &
  FIO_PID=$!
}

# wait_fio JOB PID : fio exited 0 with no error and its verify passed.
wait_fio() {
  rc=0; wait "$2" || rc=$?
  [ $rc = 0 ] || { cat "$1.fio.out"; fail "fio $1 failed (rc=$rc)"; }
  grep -q 'err= 0' "$1.fio.out" || { cat "$1.fio.out"; fail "fio $1 reported errors"; }
  log "fio $1: $(grep -oE 'IOPS=[^,]+' "$1.fio.out" | head -1), err=0, verify passed"
}

# verify_fio_again JOB : reads JOB's file back and checks every block it wrote (fio
# --verify_only replays the same offsets and checksums).
verify_fio_again() {
  # shellcheck disable=SC2046
  fio $(cat "$1.args") --verify_only --output="$1.reverify.out" \
    || { cat "$1.reverify.out"; fail "fio $1: re-verify failed"; }
  grep -q 'err= 0' "$1.reverify.out" || { cat "$1.reverify.out"; fail "fio $1: re-verify errors"; }
  log "fio $1: data re-verified"
}
