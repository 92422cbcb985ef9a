#!/usr/bin/env bash
# Chart and manifest checks that need no cluster (`make test-chart`):
#   1. helm lint --strict with the default values and every e2e/chart/values-*.yaml;
#   2. values that must be refused are refused (schema and template checks);
#   3. helm template of each value set, saved to e2e/chart/.rendered/<set>.yaml;
#   4. deploy/manifests is what deploy/render-manifests.sh renders now; the metrics
#      extras (ServiceMonitor, PodMonitor, PrometheusRule) are rendered only when enabled
#      and the monitoring.coreos.com/v1 API is served (or metrics.skipApiCheck);
#   5. the real cluster's install (e2e/cluster/values-cluster.yaml) uses only images that
#      e2e/cluster/images.py builds, never pulled; images.py's offline images agree with
#      deploy/Dockerfile (entrypoint, user, ports, binaries' paths, node packages);
#   6. the Rust tests e2e/tests/deploy_*.rs: every rendered object and every manifest
#      deserialised strictly into its Kubernetes API type, cross-checked against the
#      binaries' real command lines; management TLS (deploy_tls.rs): flags, mounted
#      certificate Secrets, NetworkPolicy peers, and Helm's generated certificates used
#      against a real enbd-server (target/debug/enbd-server, which the script builds first).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
HELM="${HELM:-$ROOT/e2e/.tools/helm}"
CHART="$ROOT/charts/enbd-csi"
OUT="$ROOT/e2e/chart/.rendered"
RELEASE=enbd-csi
NAMESPACE=enbd-csi

if [ ! -x "$HELM" ]; then
  echo "check: helm not found at $HELM (run e2e/setup-host.sh, or set HELM=)" >&2
  exit 2
fi
step() { echo "== check: $*"; }

# Value sets: the defaults, each e2e/chart/values-*.yaml, and what the kind suite and the
# real-cluster run (e2e/cluster/values-cluster.yaml) install, each rendered as for a
# cluster that serves the snapshot API (--api-versions); and
# default-nosnapshot: the defaults on a cluster without the snapshot CRDs. The Rust side
# (deploy_common::value_sets) lists the same sets.
SNAPSHOT_API=snapshot.storage.k8s.io/v1
sets=(default default-nosnapshot kind cluster)
for f in "$ROOT"/e2e/chart/values-*.yaml; do
  s=$(basename "$f" .yaml); sets+=("${s#values-}")
done
values_args() {
  case "$1" in
    default|default-nosnapshot) ;;
    kind) echo "-f $ROOT/e2e/kind/values-kind.yaml" ;;
    cluster) echo "-f $ROOT/e2e/cluster/values-cluster.yaml" ;;
    *) echo "-f $ROOT/e2e/chart/values-$1.yaml" ;;
  esac
}
# The cluster's API versions as `helm template` sees them (lint and install take none).
api_args() {
  case "$1" in
    default-nosnapshot) ;;
    *) echo "--api-versions $SNAPSHOT_API" ;;
  esac
}

step "helm lint (${sets[*]})"
for s in "${sets[@]}"; do
  # shellcheck disable=SC2046
  "$HELM" lint --strict --quiet "$CHART" --namespace "$NAMESPACE" $(values_args "$s") >/dev/null \
    || { "$HELM" lint --strict "$CHART" $(values_args "$s"); echo "check: lint failed for $s" >&2; exit 1; }
done

step "invalid values are refused"
refuse() {
  local why=$1; shift
  if "$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" "$@" >/dev/null 2>&1; then
    echo "check: helm template accepted $why ($*)" >&2; exit 1
  fi
}
refuse "an unknown value key" --set server.bogus=1
refuse "an unknown storage type" --set server.storage.type=nfs
refuse "a bad log format" --set logFormat=xml
refuse "a listen address without a port" --set server.listen=0.0.0.0
refuse "static discovery without servers" --set controller.discovery=static
refuse "an unknown fsType" --set 'storageClasses[0].name=x' --set 'storageClasses[0].fsType=zfs' \
  --set 'storageClasses[0].reclaimPolicy=Delete' --set 'storageClasses[0].allowVolumeExpansion=true' \
  --set 'storageClasses[0].volumeBindingMode=Immediate'
refuse "an unknown TLS source" --set tls.source=vault
refuse "a management TLS mode other than require" --set tls.mgmtMode=optional
refuse "a cert-manager duration that is not a Go duration" --set tls.source=cert-manager --set tls.certManager.duration=90d
refuse "a malformed static server entry" --set controller.discovery=static --set 'controller.servers[0]=no-equals-sign'
refuse "two controller replicas (in-memory publish records)" --set controller.replicas=2
refuse "a log level with spaces" --set 'node.logLevel=info debug'
refuse "extraArgs that are not a list" --set server.extraArgs=--x
refuse "a PriorityClass value above the non-system maximum" --set server.priorityClass.value=2000000000
refuse "the removed node.topologyZone" --set node.topologyZone=zone-a
refuse "a leader-election duration that is not a Go duration" --set sidecars.leaderElection.leaseDuration=1min
refuse "a renew deadline not below the lease duration" --set sidecars.leaderElection.renewDeadline=15s
refuse "a renew deadline not below the lease duration (other units)" --set sidecars.leaderElection.leaseDuration=1m \
  --set sidecars.leaderElection.renewDeadline=2m
refuse "a retry period not below the renew deadline" --set sidecars.leaderElection.retryPeriod=10s
refuse "a registrar timeout that is not a duration" --set sidecars.nodeDriverRegistrar.timeout=10

step "helm template -> e2e/chart/.rendered/"
rm -rf "$OUT"; mkdir -p "$OUT"
for s in "${sets[@]}"; do
  # shellcheck disable=SC2046
  "$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" $(values_args "$s") $(api_args "$s") >"$OUT/$s.yaml"
  echo "   $s: $(grep -c '^kind:' "$OUT/$s.yaml") objects"
done

step "metrics: Prometheus Operator objects only when asked for and served"
kinds() { grep -c "^kind: $1\$" || true; }
default_sm=$(kinds ServiceMonitor <"$OUT/default.yaml")
[ "$default_sm" = 0 ] || { echo "check: a ServiceMonitor is rendered by default" >&2; exit 1; }
no_api=$("$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" \
  --set metrics.serviceMonitor.enabled=true --set metrics.prometheusRule.enabled=true | kinds 'ServiceMonitor\|PrometheusRule')
[ "$no_api" = 0 ] || { echo "check: ServiceMonitor/PrometheusRule rendered without the monitoring API" >&2; exit 1; }
with_api=$("$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" --api-versions monitoring.coreos.com/v1 \
  --set metrics.serviceMonitor.enabled=true --set metrics.prometheusRule.enabled=true | kinds 'ServiceMonitor\|PrometheusRule')
[ "$with_api" = 2 ] || { echo "check: ServiceMonitor and PrometheusRule not both rendered with the monitoring API ($with_api)" >&2; exit 1; }
for k in ServiceMonitor PrometheusRule ConfigMap; do
  [ "$(kinds $k <"$OUT/monitoring.yaml")" = 1 ] || { echo "check: monitoring set lacks its $k" >&2; exit 1; }
done
[ "$(kinds PodMonitor <"$OUT/podmonitor.yaml")" = 1 ] || { echo "check: podmonitor set lacks its PodMonitor" >&2; exit 1; }
refuse "a ServiceMonitor without the metrics Services" --set metrics.skipApiCheck=true \
  --set metrics.serviceMonitor.enabled=true --set metrics.services=false
echo "   ServiceMonitor: off by default, off without the API, on with it (and with skipApiCheck)"

step "promtool check rules on the PrometheusRule's groups"
PROMTOOL="${PROMTOOL:-$(command -v promtool || true)}"
if [ -z "$PROMTOOL" ]; then
  echo "check: promtool not found (Debian package prometheus; e2e/setup-host.sh --test installs it)" >&2
  exit 2
fi
# Outside $OUT: every file there is read as a render set.
rules=$(mktemp --suffix=.yaml); trap 'rm -f "$rules"' EXIT
"$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" -f "$ROOT/e2e/chart/values-monitoring.yaml" \
  --show-only templates/metrics-prometheusrule.yaml | sed -n '/^spec:/,$p' | tail -n +2 | sed 's/^  //' >"$rules"
"$PROMTOOL" check rules "$rules"

step "snapshot API present / absent; image overrides"
has() { grep -q -- "$2" "$OUT/$1.yaml" || { echo "check: $1 lacks $2" >&2; exit 1; }; }
lacks() { ! grep -q -- "$2" "$OUT/$1.yaml" || { echo "check: $1 has $2" >&2; exit 1; }; }
has default "kind: VolumeSnapshotClass"
has default "name: csi-snapshotter"
lacks default-nosnapshot "kind: VolumeSnapshotClass"
lacks default-nosnapshot "name: csi-snapshotter"
has default-nosnapshot "name: csi-provisioner"
# A plain `helm install` without the CRDs (what `helm template` assumes) must not need them.
"$HELM" install --dry-run=client "$RELEASE" "$CHART" --namespace "$NAMESPACE" >/dev/null
mirror=$("$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" \
  --set sidecars.provisioner.repository=mirror.example/sig-storage/csi-provisioner \
  --set sidecars.attacher.tag=v4.99.0 --set node.image.repository=mirror.example/enbd/node \
  --set node.image.tag=1.2.3)
for want in "image: mirror.example/sig-storage/csi-provisioner:v6.3.0" \
  "image: registry.k8s.io/sig-storage/csi-attacher:v4.99.0" "image: mirror.example/enbd/node:1.2.3" \
  "image: ghcr.io/enbd-csi/enbd-server:"; do
  grep -qF "$want" <<<"$mirror" || { echo "check: image override: no '$want'" >&2; exit 1; }
done

step "leader election: every leader-elected sidecar gets the timings"
for s in default cluster; do
  elected=$(grep -c -- '- --leader-election$' "$OUT/$s.yaml" || true)
  case $s in
    cluster) values=$ROOT/e2e/cluster/values-cluster.yaml ;;
    *) values=$CHART/values.yaml ;;
  esac
  le=$(sed -n '/^  leaderElection:/,/retryPeriod/p' "$values")
  for flag in leaseDuration:lease-duration renewDeadline:renew-deadline retryPeriod:retry-period; do
    value=$(sed -n "s/^ *${flag%%:*}: *//p" <<<"$le")
    timed=$(grep -c -- "- --leader-election-${flag#*:}=$value\$" "$OUT/$s.yaml" || true)
    [ "$elected" -ge 5 ] && [ "$timed" = "$elected" ] \
      || { echo "check: $s: $elected leader-elected sidecars, $timed with --leader-election-${flag#*:}=$value" >&2; exit 1; }
  done
  echo "   $s: $elected sidecars, $(tr -s ' \n' ' ' <<<"$le")"
done
grep -A8 -- '- name: node-driver-registrar$' "$OUT/default.yaml" | grep -q -- '- --timeout=10s$' \
  || { echo "check: the node-driver-registrar lacks --timeout=10s" >&2; exit 1; }

step "NOTES.txt renders for every value set (helm install --dry-run=client)"
for s in "${sets[@]}"; do
  # shellcheck disable=SC2046
  notes=$("$HELM" install --dry-run=client "$RELEASE" "$CHART" --namespace "$NAMESPACE" $(values_args "$s") \
    | sed -n '/^NOTES:/,$p')
  if [ -z "$notes" ] || ! grep -q "kubectl" <<<"$notes"; then
    echo "check: NOTES.txt did not render for $s" >&2; exit 1
  fi
done

step "deploy/manifests up to date"
HELM="$HELM" "$ROOT/deploy/render-manifests.sh" --check

step "real-cluster images: built offline, never pulled; parity with deploy/Dockerfile"
built=$(python3 "$ROOT/e2e/cluster/images.py" refs)
used=$(sed -nE 's/^ +image: "?([^" ]+)"?$/\1/p' "$OUT/cluster.yaml" | sort -u)
[ -n "$used" ] || { echo "check: no images in the cluster render" >&2; exit 1; }
for img in $used; do
  grep -qxF "$img" <<<"$built" || { echo "check: the cluster install uses $img, which e2e/cluster/images.py does not build" >&2; exit 1; }
done
if grep -E '^ +imagePullPolicy:' "$OUT/cluster.yaml" | grep -qv 'Never$'; then
  echo "check: the cluster install may pull an image (imagePullPolicy other than Never)" >&2; exit 1
fi
echo "   cluster: $(wc -w <<<"$used") images, all built by images.py, pullPolicy Never"
python3 "$ROOT/e2e/cluster/images.py" parity
diverged=$(mktemp)
sed 's/^EXPOSE 9811$/EXPOSE 9811 9999/' "$ROOT/deploy/Dockerfile" >"$diverged"
if python3 "$ROOT/e2e/cluster/images.py" parity --dockerfile "$diverged" 2>/dev/null; then
  rm -f "$diverged"; echo "check: the parity check accepted a Dockerfile exposing another port" >&2; exit 1
fi
rm -f "$diverged"

step "strict validation against the Kubernetes API types and the binaries' CLIs"
cd "$ROOT"
# deploy_tls starts the real server: built here so `make test-chart` works on its own too.
cargo build -q -p enbd-server
ENBD_CHART_RENDERED="$OUT" cargo nextest run -p enbd-e2e --no-fail-fast -E 'binary(/^deploy_/)'
