#!/usr/bin/env bash
# Builds the enbd-server fuzz target and runs it briefly (default 30 s).
set -euo pipefail
cd "$(dirname "$0")"
cargo +nightly fuzz build session_requests
cargo +nightly fuzz run session_requests -- -max_total_time="${FUZZ_SECONDS:-30}" -max_len=4096
