#!/usr/bin/env bash
# The cluster's container images as OCI archives, without Docker or a registry.
#
# usage: e2e/cluster/images.sh [--skip-build] [--kube-bin DIR] [--upstream] OUT_DIR
#
# Builds the project's static release binaries (as e2e/vm/run.sh does; --skip-build reuses
# them), takes the CSI sidecars from build-kube.sh's bin dir (--kube-bin, else
# $ENBD_CLUSTER_BIN, else the last line build-kube.sh prints), and writes with images.py one
# archive per image and OUT_DIR/images.txt ("<ref> <file>" lines, the file relative to
# OUT_DIR, for `ctr -n k8s.io images import`). Unchanged images are reused from OUT_DIR.
# --upstream adds the test images Kubernetes' e2e storage suite asks for (busybox, agnhost
# from the bin dir's agnhost, which build-kube.sh --upstream builds, and the glibc-dns-testing
# and nginx stand-ins; README "Real cluster"). Without it images.txt lists none of them: the
# node imports every archive listed, slowly under TCG.
# Last, the archives are checked against deploy/Dockerfile (images.py parity --archives).
# Prints OUT_DIR as its last line.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BUILD=1; KUBE_BIN=${ENBD_CLUSTER_BIN:-}; UPSTREAM=()
while [ $# -gt 1 ]; do
  case "$1" in
    --skip-build) BUILD=0; shift ;;
    --kube-bin) KUBE_BIN=${2:?}; shift 2 ;;
    --upstream) UPSTREAM=(--upstream); shift ;;
    *) break ;;
  esac
done
if [ $# != 1 ] || [ "${1#-}" != "$1" ]; then sed -n '4p' "$0" >&2; exit 2; fi
OUT=$1
for t in python3 strip ldd dpkg-query gcc git busybox; do
  command -v "$t" >/dev/null || { echo "images.sh: $t not found (run e2e/setup-host.sh --cluster)" >&2; exit 2; }
done

TARGET=x86_64-unknown-linux-gnu
RELEASE="${CARGO_TARGET_DIR:-$REPO/target}/$TARGET/release"
if [ $BUILD = 1 ]; then
  echo "images.sh: building static release binaries" >&2
  (cd "$REPO" && RUSTFLAGS='-C target-feature=+crt-static' \
    cargo build --release --quiet --target "$TARGET" --bins -p enbd-node -p enbd-server -p csi-driver)
fi
if [ -z "$KUBE_BIN" ]; then
  KUBE_BIN=$("$HERE/build-kube.sh" "${UPSTREAM[@]}" | tail -1)
fi

mkdir -p "$OUT"
python3 "$HERE/images.py" build --out "$OUT" --release "$RELEASE" --kube-bin "$KUBE_BIN" "${UPSTREAM[@]}"
python3 "$HERE/images.py" parity --archives "$OUT"
echo "$OUT"
