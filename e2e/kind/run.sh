#!/usr/bin/env bash
# The kind e2e suite: creates a kind cluster whose nodes see the host's ublk devices, builds
# and loads the three images, installs the snapshot CRDs + snapshot-controller and the chart,
# runs the Rust tests e2e/tests/kind_*.rs against it (kind_uninstall last, alone: it uninstalls
# the chart), and deletes the cluster.
#
#   e2e/kind/run.sh                        everything, cluster deleted at the end
#   e2e/kind/run.sh --keep                 keep the cluster (kubectl --context kind-enbd-e2e)
#   e2e/kind/run.sh --reuse                use an existing enbd-e2e cluster (skips creation)
#   e2e/kind/run.sh --only kind_faults     run one test binary
#   e2e/kind/run.sh --upstream ./e2e.test  also run the Kubernetes external storage suite
#
# Needs: a Linux host with Docker (BuildKit), kind, kubectl, cargo, helm (e2e/.tools/helm from
# e2e/setup-host.sh, or HELM=), the ublk_drv module loaded (`sudo modprobe ublk_drv`), and
# network access for kind's node image, busybox and the sidecar images.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
HERE="$ROOT/e2e/kind"
CLUSTER=enbd-e2e
NAMESPACE=enbd-csi
# Image prefix and tag: the ones values-kind.yaml installs.
PREFIX=$(awk '$1 == "repositoryPrefix:" {print $2; exit}' "$HERE/values-kind.yaml")
TAG=$(awk '$1 == "tag:" {print $2; exit}' "$HERE/values-kind.yaml")
SNAPSHOTTER_REF=v8.6.0
HELM="${HELM:-$ROOT/e2e/.tools/helm}"
ARTIFACTS="${ARTIFACTS:-$HERE/.artifacts}"
KEEP=0 REUSE=0 ONLY="" UPSTREAM="" COLLECTED=0

while [ $# -gt 0 ]; do
  case "$1" in
    --keep) KEEP=1 ;;
    --reuse) REUSE=1 KEEP=1 ;;
    --only) ONLY="$2"; shift ;;
    --upstream) UPSTREAM="$2"; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

say() { echo "== kind-e2e $(date -u +%H:%M:%S): $*"; }
die() { echo "kind-e2e: $*" >&2; exit 1; }
START=$(date +%s)

# ---- preflight: fail before spending ten minutes on a build -------------------------------
[ "$(uname -s)" = Linux ] || die "needs a Linux host: ublk devices come from the host kernel"
for tool in docker kind kubectl cargo; do
  command -v "$tool" >/dev/null || die "$tool not found in PATH"
done
[ -x "$HELM" ] || die "helm not found at $HELM (run e2e/setup-host.sh or set HELM=)"
docker info >/dev/null 2>&1 || die "the Docker daemon is not reachable"
if [ ! -d /sys/module/ublk_drv ] || [ ! -e /dev/ublk-control ]; then
  die "ublk_drv is not loaded on this host: run 'sudo modprobe ublk_drv' (kernel 6.0+; user
recovery needs CONFIG_BLK_DEV_UBLK with UBLK_F_USER_RECOVERY, any 6.x distribution kernel)"
fi
[ -z "$UPSTREAM" ] || [ -x "$UPSTREAM" ] || die "--upstream $UPSTREAM is not an executable e2e.test"

KCTX="kind-$CLUSTER"
kc() { kubectl --context "$KCTX" "$@"; }

collect() {  # [DIR: default $ARTIFACTS]
  local out=${1:-$ARTIFACTS}
  mkdir -p "$out"
  say "collecting diagnostics in $out"
  kc get all,pvc,pv,volumeattachments,volumesnapshots,volumesnapshotcontents -A -o wide \
    >"$out/objects.txt" 2>&1 || true
  kc get events -A --sort-by=.lastTimestamp >"$out/events.txt" 2>&1 || true
  for pod in $(kc -n "$NAMESPACE" get pods -o name 2>/dev/null); do
    kc -n "$NAMESPACE" logs "$pod" --all-containers --prefix --timestamps \
      >"$out/$(basename "$pod").log" 2>&1 || true
    kc -n "$NAMESPACE" logs "$pod" --all-containers --prefix --timestamps --previous \
      >"$out/$(basename "$pod").previous.log" 2>/dev/null || true
  done
}
cleanup() {
  rc=$?
  # Diagnostics saved before kind_uninstall removed the driver are kept as they were.
  if [ $rc -ne 0 ]; then
    if [ "$COLLECTED" = 1 ]; then collect "$ARTIFACTS/after-uninstall"; else collect; fi
  fi
  if [ $KEEP = 0 ]; then
    say "deleting cluster $CLUSTER"
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  else
    say "cluster kept: kubectl --context $KCTX"
  fi
  say "finished rc=$rc after $(( $(date +%s) - START ))s"
  exit $rc
}
trap cleanup EXIT

# ---- cluster ------------------------------------------------------------------------------
if [ $REUSE = 1 ] && kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  say "reusing cluster $CLUSTER"
else
  say "creating cluster $CLUSTER"
  kind create cluster --config "$HERE/kind-config.yaml" --name "$CLUSTER" --wait 180s
fi
for node in $(kind get nodes --name "$CLUSTER"); do
  docker exec "$node" test -e /dev/ublk-control || die "node $node does not see /dev/ublk-control"
done

# ---- images ---------------------------------------------------------------------------------
say "building images ${PREFIX}{enbd-server,enbd-csi-driver,enbd-node}:$TAG"
"$ROOT/deploy/build-images.sh" "$PREFIX" "$TAG"
for image in enbd-server enbd-csi-driver enbd-node; do
  kind load docker-image --name "$CLUSTER" "${PREFIX}${image}:${TAG}"
done

# ---- snapshot CRDs and controller (from the external-snapshotter release) ------------------
say "installing snapshot CRDs and snapshot-controller $SNAPSHOTTER_REF"
SNAP="https://github.com/kubernetes-csi/external-snapshotter"
kc apply -k "$SNAP/client/config/crd?ref=$SNAPSHOTTER_REF"
kc apply -k "$SNAP/deploy/kubernetes/snapshot-controller?ref=$SNAPSHOTTER_REF"
kc -n kube-system rollout status deploy/snapshot-controller --timeout=180s

# ---- chart ----------------------------------------------------------------------------------
say "installing the chart"
"$HELM" --kube-context "$KCTX" upgrade --install enbd-csi "$ROOT/charts/enbd-csi" \
  --namespace "$NAMESPACE" --create-namespace \
  -f "$HERE/values-kind.yaml" --wait --timeout 5m
kc -n "$NAMESPACE" get pods -o wide

# ---- tests ----------------------------------------------------------------------------------
say "running the kind tests"
export KUBECONFIG
KUBECONFIG="$(mktemp)"
kind get kubeconfig --name "$CLUSTER" >"$KUBECONFIG"
export ENBD_E2E_NAMESPACE="$NAMESPACE" ENBD_E2E_RELEASE=enbd-csi
# The helm tests (kind_upgrade, kind_uninstall) drive the release with the same helm, chart and
# values as the install above (helm reads KUBECONFIG, whose current context is this cluster).
export ENBD_E2E_HELM="$HELM" ENBD_E2E_CHART="$ROOT/charts/enbd-csi" ENBD_E2E_VALUES="$HERE/values-kind.yaml"
run_tests() {
  (cd "$ROOT" && cargo nextest run -p enbd-e2e --run-ignored only --test-threads 1 \
    --no-fail-fast -E "$1")
}
failed=0
if [ -n "$ONLY" ]; then
  filter="binary($ONLY)"
else
  filter='binary(/^kind_/) and not binary(=kind_uninstall)'
fi
# One test at a time: the fault tests delete the server and node-plugin pods.
run_tests "$filter" || failed=1

if [ -n "$UPSTREAM" ]; then
  say "running the Kubernetes external storage suite with e2e/kind/test-driver.yaml"
  "$UPSTREAM" -kubeconfig "$KUBECONFIG" \
    -storage.testdriver="$HERE/test-driver.yaml" \
    -ginkgo.focus='External.Storage.*csi.enbd.io' \
    -ginkgo.skip='\[Disruptive\]|\[Serial\]' \
    -ginkgo.timeout=2h -report-dir="$ARTIFACTS/upstream" || failed=1
fi

# kind_uninstall removes the driver: last and alone, after the diagnostics of any earlier
# failure are saved (the exit handler's would find no driver pods).
if [ -z "$ONLY" ]; then
  if [ $failed = 1 ]; then collect; COLLECTED=1; fi
  say "running kind_uninstall (last: helm uninstall of enbd-csi)"
  run_tests 'binary(=kind_uninstall)' || failed=1
fi
[ $failed = 0 ] || die "some kind tests failed"
say "all kind tests passed"
