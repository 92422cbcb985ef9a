#!/usr/bin/env bash
# Short run of every fuzz target of the NBD wire codec (`make fuzz-smoke`).
# Installs what it needs (nightly toolchain, cargo-fuzz), seeds each corpus with valid
# messages written from the NBD protocol document, runs each target for FUZZ_SECONDS
# (default 30) and prints a table of executions. Any crash fails the script.
#   FUZZ_SECONDS=60 ./proto/fuzz/smoke.sh          # longer runs
#   FUZZ_TARGET_DIR=/tmp/fuzz ./proto/fuzz/smoke.sh  # build elsewhere
set -euo pipefail
cd "$(dirname "$0")"

seconds="${FUZZ_SECONDS:-30}"
target_dir="${FUZZ_TARGET_DIR:-$PWD/target}"

if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

# hex_seed FILE HEX...: writes the bytes spelled by the hex digits (spaces ignored).
hex_seed() {
    local file="$1"
    shift
    local hex="$*" escaped=""
    hex="${hex// /}"
    for ((i = 0; i < ${#hex}; i += 2)); do
        escaped+="\\x${hex:i:2}"
    done
    mkdir -p "$(dirname "$file")"
    printf '%b' "$escaped" >"$file"
}

zeroes124=$(printf '00%.0s' $(seq 124))
IHAVEOPT=49484156454f5054
REP=0003e889045565a9
hex_seed corpus/handshake/greeting 4e42444d41474943 $IHAVEOPT 0003
hex_seed corpus/handshake/client_flags 00000003
hex_seed corpus/handshake/export_name_reply 0000000000100000 0003 "$zeroes124"
hex_seed corpus/option_request/go $IHAVEOPT 00000007 0000000e 00000004 6469736b 0002 0003 0001
hex_seed corpus/option_request/export_name $IHAVEOPT 00000001 00000004 6469736b
hex_seed corpus/option_request/set_meta $IHAVEOPT 0000000a 0000001c 00000001 65 00000001 0000000f 626173653a616c6c6f636174696f6e
hex_seed corpus/option_request/structured $IHAVEOPT 00000008 00000000
hex_seed corpus/option_reply/ack $REP 00000007 00000001 00000000
hex_seed corpus/option_reply/info_export $REP 00000007 00000003 0000000c 0000 0000000040000000 000d
hex_seed corpus/option_reply/info_block $REP 00000007 00000003 0000000e 0003 00000001 00001000 02000000
hex_seed corpus/option_reply/server $REP 00000003 00000002 00000008 00000004 6469736b
hex_seed corpus/option_reply/meta $REP 0000000a 00000004 00000013 00000001 626173653a616c6c6f636174696f6e
hex_seed corpus/option_reply/error $REP 00000007 80000006 00000002 6e6f
hex_seed corpus/request/compact_read 25609513 0000 0000 0102030405060708 0000000000001000 00000200
hex_seed corpus/request/extended_write 21e41c71 0020 0001 0102030405060708 0000000000000000 0000000000000200
hex_seed corpus/request/block_status_payload 0000000000100000 00000001 00000007
hex_seed corpus/reply/simple 67446698 00000005 0102030405060708
hex_seed corpus/reply/offset_data 668e33ef 0000 0001 0102030405060708 0000000c 0000000000001000 61626364
hex_seed corpus/reply/block_status 668e33ef 0001 0005 0102030405060708 00000014 00000001 00001000 00000003 00002000 00000000
hex_seed corpus/reply/error_offset 668e33ef 0000 8002 0102030405060708 0000000f 00000005 0001 78 0000000000000200
hex_seed corpus/reply/extended_status 6e8a278c 0001 0006 0102030405060708 0000000000004000 0000000000000018 00000002 00000001 0000000100000000 0000000000000002

cargo +nightly fuzz build --target-dir "$target_dir"

summary=()
for target in $(cargo +nightly fuzz list); do
    log="$target_dir/fuzz-smoke-$target.log"
    echo "== $target: ${seconds}s"
    if ! cargo +nightly fuzz run --target-dir "$target_dir" "$target" -- \
        -max_total_time="$seconds" -max_len=4096 -print_final_stats=1 >"$log" 2>&1; then
        tail -n 40 "$log"
        echo "fuzz target $target FAILED (log: $log)" >&2
        exit 1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | cut -d' ' -f2)
    summary+=("$(printf '%-16s %10s execs %6s s   cov %s' "$target" "${runs:-?}" "$seconds" "${cov:-?}")")
done
printf '%s\n' "${summary[@]}"
