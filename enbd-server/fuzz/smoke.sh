#!/usr/bin/env bash
# Builds the enbd-server fuzz target and runs it briefly (FUZZ_SECONDS, default 30) from the
# committed seeds (one per session mode: simple, structured, extended, read-only, raw).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p corpus/session_requests
cargo +nightly fuzz build session_requests
cargo +nightly fuzz run session_requests corpus/session_requests seeds -- \
  -max_total_time="${FUZZ_SECONDS:-30}" -max_len=4096
