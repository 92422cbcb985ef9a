#!/usr/bin/env bash
# The real-cluster suite (make test-cluster): a single-node Kubernetes v1.36 cluster built
# here offline — control plane on the host inside the network namespace enbd-cluster, node
# enbd-vm in a TCG VM where ublk exists — the chart installed with Helm from charts/ with
# locally built images, and the kind tests (e2e/tests/kind_*.rs, the same test binaries)
# run against it.
#
#   e2e/cluster/run.sh                      everything; the cluster is torn down at the end
#   e2e/cluster/run.sh --keep               keep it running afterwards (see the last lines)
#   e2e/cluster/run.sh --only kind_faults   run one test binary
#   e2e/cluster/run.sh --only upstream      only the upstream suite (implies --upstream);
#                                           ENBD_UPSTREAM_TIMEOUT bounds it (ginkgo, default 3h),
#                                           ENBD_UPSTREAM_PROCS parallel processes (default 3)
#   e2e/cluster/run.sh --upstream           also build and run Kubernetes' external storage
#                                           suite (e2e.test) with e2e/kind/test-driver.yaml;
#                                           its results join e2e/cluster/upstream-results.tsv
#                                           (upstream-ledger.py: the newest result per spec)
#   e2e/cluster/run.sh --only upstream --remaining
#                                           only the selected specs the ledger has no final
#                                           result for (none, failed, interrupted), found by a
#                                           dry run; ENBD_UPSTREAM_RERUN=REGEX adds specs to run
#                                           again (e.g. after a capability changed)
#
# Steps: build-kube.sh (cached Go builds) -> images.sh (static release binaries, images) ->
# control-plane.sh up --fresh -> node-vm.sh up -> Node Ready -> snapshot CRDs and
# snapshot-controller -> helm install -> tests inside the netns (kind_uninstall last, alone)
# -> on failure the pods' logs and descriptions in $STATE/logs -> teardown. Exit 0 only when
# every test passed.
# State and logs: ${ENBD_CLUSTER_STATE:-/var/tmp/enbd-cluster}. Needs root, qemu, cargo,
# cargo-nextest, helm (e2e/.tools/helm from e2e/setup-host.sh, or HELM=), openssl, iproute2,
# and the repository snapshots build-kube.sh names.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
STATE=${ENBD_CLUSTER_STATE:-/var/tmp/enbd-cluster}
export ENBD_CLUSTER_STATE=$STATE
NETNS=${ENBD_CLUSTER_NETNS:-enbd-cluster}   # another name only to test beside a running cluster
NODE_NAME=enbd-vm
NAMESPACE=enbd-csi
RELEASE=enbd-csi
HELM=${HELM:-$ROOT/e2e/.tools/helm}
KEEP=0 ONLY="" UPSTREAM=0 REMAINING=0 COLLECTED=0

while [ $# -gt 0 ]; do
  case "$1" in
    --keep) KEEP=1 ;;
    --only) ONLY="$2"; shift; [ "$ONLY" != upstream ] || UPSTREAM=1 ;;
    --upstream) UPSTREAM=1 ;;
    --remaining) REMAINING=1 ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

[ $REMAINING = 0 ] || [ $UPSTREAM = 1 ] || { echo "run.sh: --remaining needs --upstream or --only upstream" >&2; exit 2; }

START=$(date +%s)
say() { echo "== cluster-e2e $(date -u +%H:%M:%S) (+$(( $(date +%s) - START ))s): $*"; }
die() { echo "cluster-e2e: $*" >&2; exit 1; }

# ---- preflight: fail before the builds ---------------------------------------------------------
[ "$(id -u)" = 0 ] || die "needs root (network namespace, tap device, VM)"
for tool in ip openssl cargo cargo-nextest qemu-system-x86_64; do
  command -v "$tool" >/dev/null || die "$tool not found in PATH"
done
[ -x "$HELM" ] || die "helm not found at $HELM (run e2e/setup-host.sh or set HELM=)"
for part in images.sh node-vm.sh values-cluster.yaml; do
  [ -e "$HERE/$part" ] || die "e2e/cluster/$part is missing (the images and node parts of the harness)"
done

LOGS=$STATE/logs
mkdir -p "$LOGS"
KUBECONFIG_FILE=$STATE/admin.kubeconfig
in_ns() { ip netns exec "$NETNS" "$@"; }
kc() { in_ns "$BIN/kubectl" --kubeconfig "$KUBECONFIG_FILE" "$@"; }

collect() {  # [DIR under $LOGS]
  local dir=$LOGS/${1:-diagnostics} pod
  mkdir -p "$dir"
  say "collecting diagnostics in $dir"
  kc get nodes,all,pvc,pv,volumeattachments,csinodes,volumesnapshots,volumesnapshotcontents \
    -A -o wide > "$dir/objects.txt" 2>&1 || true
  kc get events -A --sort-by=.lastTimestamp > "$dir/events.txt" 2>&1 || true
  kc describe nodes > "$dir/nodes.describe.txt" 2>&1 || true
  for ns in "$NAMESPACE" kube-system $(kc get ns -l enbd.io/e2e -o name 2>/dev/null | sed 's|namespace/||'); do
    kc -n "$ns" describe pods > "$dir/$ns.pods.describe.txt" 2>&1 || true
    for pod in $(kc -n "$ns" get pods -o name 2>/dev/null); do
      kc -n "$ns" logs "$pod" --all-containers --prefix --timestamps \
        > "$dir/$ns.$(basename "$pod").log" 2>&1 || true
      kc -n "$ns" logs "$pod" --all-containers --prefix --timestamps --previous \
        > "$dir/$ns.$(basename "$pod").previous.log" 2>/dev/null || rm -f "$dir/$ns.$(basename "$pod").previous.log"
    done
  done
}

teardown() {
  "$HERE/node-vm.sh" down || true
  "$HERE/control-plane.sh" down || true
}

cleanup() {
  local rc=$?
  trap - EXIT
  if [ $rc -ne 0 ] && [ -n "${BIN:-}" ] && [ -e "$KUBECONFIG_FILE" ]; then
    # Diagnostics saved before kind_uninstall removed the driver are kept as they were.
    if [ "$COLLECTED" = 1 ]; then collect diagnostics-after-uninstall; else collect; fi
  fi
  if [ $KEEP = 0 ]; then
    say "tearing the cluster down"
    teardown
  else
    say "cluster kept: ip netns exec $NETNS $BIN/kubectl --kubeconfig $KUBECONFIG_FILE ...;" \
      "stop it with e2e/cluster/node-vm.sh down && e2e/cluster/control-plane.sh down"
  fi
  say "finished rc=$rc; logs in $LOGS"
  exit $rc
}
trap cleanup EXIT
# A signal ends the run with its own status, so cleanup reports it (it reported the last
# command's, 0, after a SIGTERM).
trap 'exit 143' TERM
trap 'exit 130' INT

# ---- builds ----------------------------------------------------------------------------------
say "Kubernetes, etcd and the CSI sidecars (e2e/cluster/build-kube.sh, cached)"
build_args=()
[ $UPSTREAM = 0 ] || build_args+=(--upstream)
BIN=$("$HERE/build-kube.sh" "${build_args[@]}" | tail -n 1)
[ -x "$BIN/kubectl" ] || die "build-kube.sh printed no bin dir with kubectl ($BIN)"
export ENBD_CLUSTER_BIN=$BIN

say "images: static release binaries and OCI archives (e2e/cluster/images.sh)"
# build_args is (--upstream) exactly when the upstream suite runs: its test images then too.
"$HERE/images.sh" --kube-bin "$BIN" "${build_args[@]}" "$STATE/images" >/dev/null

# The upstream suite's selection. With --remaining, a dry run (no cluster needed: ginkgo only
# walks the spec tree) lists the selected specs, the ledger says which have no final result,
# and one exact --focus per such spec replaces the driver's focus; a second dry run checks the
# focus picks exactly those.
UPSTREAM_FOCUS=(--focus='External.Storage.*csi.enbd.io')
UPSTREAM_SKIP='\[Disruptive\]|\[Serial\]'
LEDGER=$HERE/upstream-results.tsv
dry_run() {  # REPORT_DIR FOCUS_ARGS...
  local dir=$1; shift
  rm -rf "$dir"
  "$BIN/ginkgo" --dry-run --procs=1 --no-color "$@" --skip="$UPSTREAM_SKIP" "$BIN/e2e.test" -- \
    -storage.testdriver="$ROOT/e2e/kind/test-driver.yaml" -report-dir="$dir" >"$dir.log" 2>&1 \
    || die "dry run of the upstream suite failed (log: $dir.log)"
}
if [ $REMAINING = 1 ]; then  # (--remaining is refused without the upstream suite)
  say "upstream suite: the specs the ledger has no final result for (dry run)"
  dry_run "$LOGS/upstream-selection" "${UPSTREAM_FOCUS[@]}"
  # Through a file: a failing upstream-ledger.py must not read as "nothing remains".
  python3 "$HERE/upstream-ledger.py" remaining "$LOGS/upstream-selection" "$LEDGER" \
    ${ENBD_UPSTREAM_RERUN:+--rerun "$ENBD_UPSTREAM_RERUN"} >"$LOGS/upstream-remaining.txt" \
    || die "upstream-ledger.py remaining failed"
  mapfile -t remaining <"$LOGS/upstream-remaining.txt"
  [ ${#remaining[@]} -gt 0 ] || die "the ledger has a final result for every selected spec: nothing to run"
  UPSTREAM_FOCUS=()
  for regex in "${remaining[@]}"; do UPSTREAM_FOCUS+=(--focus="$regex"); done
  dry_run "$LOGS/upstream-focus" "${UPSTREAM_FOCUS[@]}"
  picked=$(python3 "$HERE/upstream-ledger.py" count "$LOGS/upstream-focus")
  [ "$picked" = ${#remaining[@]} ] || die "the focus picked $picked specs, not the ${#remaining[@]} meant"
fi

# Built here, outside the netns, into a nextest archive that the netns runs as it is: cargo
# run inside the netns saw a different environment and recompiled the workspace (5 min).
say "test binaries (built here: the netns has no network)"
TEST_ARCHIVE=$STATE/kind-tests.tar.zst
(cd "$ROOT" && cargo nextest archive -p enbd-e2e --archive-file "$TEST_ARCHIVE" >/dev/null)

# ---- cluster ---------------------------------------------------------------------------------
say "control plane (e2e/cluster/control-plane.sh up --fresh)"
"$HERE/control-plane.sh" up --fresh

say "node $NODE_NAME (e2e/cluster/node-vm.sh up)"
"$HERE/node-vm.sh" up --kube-bin "$BIN" --images "$STATE/images"
# Under TCG the kubelet takes a while to register and report Ready.
deadline=$(( $(date +%s) + 600 ))
until kc get node "$NODE_NAME" >/dev/null 2>&1; do
  [ "$(date +%s)" -lt "$deadline" ] || die "node $NODE_NAME did not register within 600 s"
  sleep 2
done
kc wait --for=condition=Ready "node/$NODE_NAME" --timeout=600s
kc get nodes -o wide

# test-driver.yaml says onlineExpansion: false because trixie's 6.12 lacks ublk UPDATE_SIZE.
# On a node kernel that has it (6.16+, ENBD_NODE_KERNEL=sid) the suite gets a copy that says
# true, so its online expansion specs run instead of skipping.
TEST_DRIVER=$ROOT/e2e/kind/test-driver.yaml
node_kernel=$(kc get node "$NODE_NAME" -o jsonpath='{.status.nodeInfo.kernelVersion}')
IFS=. read -r kmajor kminor _ <<<"$node_kernel"
if [ "${kmajor:-0}" -gt 6 ] || { [ "${kmajor:-0}" = 6 ] && [ "${kminor%%[!0-9]*}" -ge 16 ]; }; then
  TEST_DRIVER=$STATE/test-driver.yaml
  sed 's/^\(    onlineExpansion:\) false$/\1 true/' "$ROOT/e2e/kind/test-driver.yaml" >"$TEST_DRIVER"
  grep -q '^    onlineExpansion: true$' "$TEST_DRIVER" || die "could not turn onlineExpansion on in $TEST_DRIVER"
  say "node kernel $node_kernel has ublk UPDATE_SIZE: the upstream suite runs with onlineExpansion: true"
fi

# ---- snapshot CRDs and controller (external-snapshotter's, from the same build) --------------
say "snapshot CRDs and snapshot-controller"
for crd in "$BIN"/crds/*.storage.k8s.io_*.yaml; do kc apply --server-side -f "$crd"; done
kc wait --for=condition=Established crd --all --timeout=120s >/dev/null
kc apply -f "$BIN/crds/rbac-snapshot-controller.yaml" -f "$BIN/crds/setup-snapshot-controller.yaml"
kc -n kube-system rollout status deploy/snapshot-controller --timeout=600s

# ---- chart -----------------------------------------------------------------------------------
say "helm install $RELEASE (charts/enbd-csi, e2e/cluster/values-cluster.yaml)"
in_ns "$HELM" --kubeconfig "$KUBECONFIG_FILE" upgrade --install "$RELEASE" "$ROOT/charts/enbd-csi" \
  --namespace "$NAMESPACE" --create-namespace \
  -f "$HERE/values-cluster.yaml" --wait --timeout 20m
kc -n "$NAMESPACE" get pods -o wide

# ---- tests ----------------------------------------------------------------------------------
# The helm tests (kind_upgrade, kind_uninstall) drive the release with the same helm, chart and
# values as the install above. kind_uninstall removes the driver: it runs last and alone, after
# the upstream suite, and only once the diagnostics of any earlier failure are saved.
run_tests() {  # FILTER [-a: append to tests.log]
  in_ns env KUBECONFIG="$KUBECONFIG_FILE" ENBD_E2E_NAMESPACE="$NAMESPACE" ENBD_E2E_RELEASE="$RELEASE" \
    ENBD_E2E_HELM="$HELM" ENBD_E2E_CHART="$ROOT/charts/enbd-csi" ENBD_E2E_VALUES="$HERE/values-cluster.yaml" \
    cargo-nextest nextest run --archive-file "$TEST_ARCHIVE" --workspace-remap "$ROOT" \
      --run-ignored only --test-threads 1 --no-fail-fast -E "$1" 2>&1 | tee ${2:+"$2"} "$LOGS/tests.log"
}
failed=0
if [ -n "$ONLY" ]; then
  filter="binary($ONLY)"
else
  filter='binary(/^kind_/) and not binary(=kind_uninstall)'
fi
# One test at a time: the fault tests delete the server and node-plugin pods.
if [ "$ONLY" != upstream ]; then
  say "the kind tests, inside the netns"
  run_tests "$filter" || failed=1
fi

if [ $UPSTREAM = 1 ]; then
  # The ginkgo CLI runs the non-serial specs in parallel processes (most of a spec's time is
  # waiting for pods under TCG); the JUnit report in $LOGS/upstream has the counts.
  say "Kubernetes external storage suite (e2e.test, ${ENBD_UPSTREAM_PROCS:-3} ginkgo processes) with $TEST_DRIVER"
  in_ns "$BIN/ginkgo" --procs="${ENBD_UPSTREAM_PROCS:-3}" --no-color \
    "${UPSTREAM_FOCUS[@]}" --skip="$UPSTREAM_SKIP" \
    --timeout="${ENBD_UPSTREAM_TIMEOUT:-3h}" "$BIN/e2e.test" -- \
    -kubeconfig="$KUBECONFIG_FILE" -storage.testdriver="$TEST_DRIVER" \
    -report-dir="$LOGS/upstream" 2>&1 | tee "$LOGS/upstream.log" || failed=1
  # Each bounded run covers part of the selection: its results join the ledger in the tree
  # (commit it), which keeps every spec's newest result.
  python3 "$HERE/upstream-ledger.py" merge "$LOGS/upstream" "$LEDGER" \
    "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" || failed=1
fi

if [ -z "$ONLY" ]; then
  if [ $failed = 1 ]; then collect diagnostics; COLLECTED=1; fi
  say "kind_uninstall (last, alone: helm uninstall of $RELEASE)"
  run_tests 'binary(=kind_uninstall)' -a || failed=1
fi
[ $failed = 0 ] || die "some cluster tests failed (output in $LOGS/tests.log)"
say "all cluster tests passed"
