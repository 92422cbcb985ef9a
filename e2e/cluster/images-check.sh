#!/usr/bin/env bash
# Imports the archives images.sh wrote into a containerd of its own and runs each image once:
# the check that the archives are what containerd (and so the kubelet) accepts and that
# entrypoints, users and shared libraries work. Needs root, containerd, ctr and runc.
#
# usage: e2e/cluster/images-check.sh [--upstream] [--kube-bin DIR] OUT_DIR
#
# --upstream: the e2e storage suite's images (images.sh --upstream) must be there; they are
# checked whenever images.txt lists any of them: refs as images.py reads them from the
# Kubernetes tree's manifest.go and, when the bin dir (--kube-bin, else $ENBD_CLUSTER_BIN) has
# e2e.test, among those `e2e.test --list-images` prints; entrypoints; agnhost static and
# running on the host; the shell and commands the suite's tests run in each.
#
# containerd runs from a scratch directory (root, state, socket; the CRI plugin off), so the
# host's own containerd, if any, is not touched; it is stopped and the directory removed at
# exit.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
UPSTREAM=0; KUBE_BIN=${ENBD_CLUSTER_BIN:-}
while [ $# -gt 1 ]; do
  case "$1" in
    --upstream) UPSTREAM=1; shift ;;
    --kube-bin) KUBE_BIN=${2:?}; shift 2 ;;
    *) break ;;
  esac
done
[ $# = 1 ] || { sed -n '6p' "$0" >&2; exit 2; }
OUT=$(cd "$1" && pwd)
[ -f "$OUT/images.txt" ] || { echo "images-check: $OUT/images.txt missing (run images.sh)" >&2; exit 2; }
for t in containerd ctr runc; do
  command -v "$t" >/dev/null || { echo "images-check: $t not found (apt-get install containerd)" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "images-check: needs root" >&2; exit 2; }

DIR=$(mktemp -d /tmp/enbd-images-check.XXXXXX)
PID=""
cleanup() {
  if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
  # Nothing should be mounted once every container is gone; make sure before deleting.
  grep -o " $DIR/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT
cat >"$DIR/config.toml" <<EOF
version = 2
root = "$DIR/root"
state = "$DIR/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$DIR/containerd.sock"
[ttrpc]
  address = "$DIR/containerd.sock.ttrpc"
EOF
containerd --config "$DIR/config.toml" >"$DIR/containerd.log" 2>&1 &
PID=$!
CTR=(ctr --address "$DIR/containerd.sock" -n k8s.io)
ctr() { command "${CTR[@]}" "$@" </dev/null; }
for _ in $(seq 100); do ctr version >/dev/null 2>&1 && break; sleep 0.2; done
ctr version >/dev/null || { cat "$DIR/containerd.log" >&2; exit 1; }

fails=0
ok() { echo "images-check: ok   $*"; }
bad() { echo "images-check: FAIL $*" >&2; fails=$((fails + 1)); }
n=0
run() { n=$((n + 1)); timeout 120 "${CTR[@]}" run --rm "$@" </dev/null 2>&1; }
# <image> <expected output (grep -E)> <command...>: runs it and checks its output.
expect() {
  local img=$1 want=$2 out; shift 2
  out=$(run "$img" "check-$n" "$@") || true
  if grep -qE "$want" <<<"$out"; then
    ok "$img: $* -> $(head -1 <<<"$out")"
  else
    bad "$img: $* printed: $(head -3 <<<"$out")"
  fi
}
# <image> <uid> <gid> [<args>]: the process the image's config makes (entrypoint, user; with
# <args>, its command line too, words joined by spaces).
user_is() {
  local img=$1 id="check-user-$n" uid gid args; n=$((n + 1))
  ctr containers create "$img" "$id" >/dev/null
  read -r uid gid args < <(ctr containers info "$id" | python3 -c 'import json, sys
p = json.load(sys.stdin)["Spec"]["process"]
print(p["user"]["uid"], p["user"]["gid"], " ".join(p["args"]))')
  ctr containers rm "$id" >/dev/null
  if [ "$uid:$gid" = "$2:$3" ] && { [ $# -lt 4 ] || [ "$args" = "$4" ]; }; then
    ok "$img: process $args as $uid:$gid"
  else
    bad "$img: process $args as $uid:$gid, want ${4:+$4 as }$2:$3"
  fi
}

while read -r ref file; do
  [ -n "$ref" ] || continue
  if ctr images import "$OUT/$file" >/dev/null && grep -qxF "$ref" <<<"$(ctr images ls -q)"; then
    ok "imported $ref"
  else
    bad "import of $file did not give $ref"
  fi
done <"$OUT/images.txt"
ref() { awk -v f="$1" '$2 == f {print $1}' "$OUT/images.txt"; }

S=$(ref enbd-server.tar); D=$(ref enbd-csi-driver.tar); N=$(ref enbd-node.tar)
user_is "$S" 65532 65532
user_is "$D" 65532 65532
user_is "$N" 0 0
# The entrypoint alone: each binary starts and refuses to run without its configuration.
expect "$S" 'data-dir is required'
expect "$S" '^enbd-server ' /usr/local/bin/enbd-server --version
expect "$D" '^csi-driver ' /usr/local/bin/csi-driver --version
expect "$N" '^enbd-node ' /usr/local/bin/enbd-node --version
expect "$N" 'Writing superblocks' mkfs.ext4 -F /tmp/vol 16M
expect "$N" '^meta-data=' mkfs.xfs -f -d file,name=/tmp/vol,size=300m
expect "$N" 'resize2fs 1\.' resize2fs -P /dev/null
expect "$N" 'xfs_growfs version' xfs_growfs -V
expect "$N" 'from util-linux' mount --version
expect "$(ref busybox.tar)" '^uid=0\(root\)' sh -c 'id && sha256sum /bin/busybox && ls /bin | wc -l'
for f in csi-provisioner csi-attacher csi-resizer csi-snapshotter csi-external-health-monitor-controller livenessprobe \
         csi-node-driver-registrar snapshot-controller; do
  expect "$(ref "$f.tar")" 'Usage|usage' "/$f" --help
done
P=$(ref pause.tar)
user_is "$P" 65535 65535
ctr run -d "$P" check-pause >/dev/null
sleep 1
ctr tasks kill -s SIGTERM check-pause
stopped() { grep -qE '^check-pause +[0-9]+ +STOPPED' <<<"$(ctr tasks ls)"; }
for _ in $(seq 50); do stopped && break; sleep 0.2; done
if stopped; then ok "$P: runs, exits on SIGTERM"; else bad "$P did not stop on SIGTERM"; fi
ctr tasks rm check-pause >/dev/null 2>&1 || true
ctr containers rm check-pause >/dev/null

# ---- the e2e storage suite's images (images.sh --upstream) ------------------------------
if [ $UPSTREAM = 1 ] || grep -q ' e2e-' "$OUT/images.txt"; then
  want=$(python3 "$HERE/images.py" upstream-refs)
  while read -r ref file; do
    if grep -qxF "$ref $file" "$OUT/images.txt"; then
      ok "images.txt: $ref $file"
    else
      bad "images.txt has no '$ref $file' (images.sh --upstream)"
    fi
  done <<<"$want"
  if [ -x "${KUBE_BIN:-/nonexistent}/e2e.test" ]; then
    listed=$("$KUBE_BIN/e2e.test" --list-images 2>/dev/null) || bad "e2e.test --list-images failed"
    while read -r ref _; do
      if grep -qxF "$ref" <<<"$listed"; then ok "e2e.test --list-images names $ref"
      else bad "e2e.test --list-images does not name $ref"; fi
    done <<<"$want"
  else
    echo "images-check: note: no e2e.test in '${KUBE_BIN:-}' (build-kube.sh --upstream);" \
      "the refs are checked against manifest.go only"
  fi
  BU=$(ref e2e-busybox.tar); A=$(ref e2e-agnhost.tar)
  G=$(ref e2e-glibc-dns-testing.tar); NG=$(ref e2e-nginx.tar)
  if [ -n "$BU" ] && [ -n "$A" ] && [ -n "$G" ] && [ -n "$NG" ]; then
    user_is "$BU" 0 0 sh
    expect "$BU" '^uid=0\(root\)' sh -c 'id && dd if=/dev/zero bs=512 count=1 2>/dev/null | sha256sum'
    # agnhost on the host: static (the image has no libraries) and it runs.
    python3 "$HERE/images.py" extract "$OUT/e2e-agnhost.tar" /agnhost "$DIR/agnhost"
    if ! ldd "$DIR/agnhost" >/dev/null 2>&1; then ok "/agnhost is static"; else bad "/agnhost is dynamic: $(ldd "$DIR/agnhost" | head -2)"; fi
    if "$DIR/agnhost" --help 2>&1 | grep -q '^  mounttest '; then
      ok "agnhost --help on the host lists mounttest"
    else
      bad "agnhost --help on the host: $("$DIR/agnhost" --help 2>&1 | head -3)"
    fi
    user_is "$A" 0 0 "/agnhost pause"
    expect "$A" "^app version ${A##*:}\$" /agnhost --version
    expect "$A" "^app version ${A##*:}\$" /agnhost-2 --version
    expect "$A" 'content of file "/tmp/f": mount-tester new file' \
      /agnhost mounttest --new_file_0644=/tmp/f --file_perm=/tmp/f
    # The host-exec pods exec nsenter (found on PATH, not a shell builtin); the subpath tests
    # run shell commands and liveness probes (cat) in agnhost containers.
    expect "$A" 'Usage: nsenter' nsenter --help
    expect "$A" '^uid=1000\(user-defined-in-image\).*50000\(group-defined-in-image\)' \
      sh -c 'id user-defined-in-image && sleep 0 && cat /localhost.crt >/dev/null && test -d /uploads'
    user_is "$G" 0 0 sh
    expect "$G" '^/usr/bin/dash$' readlink -f /bin/sh
    # multivolume's block-volume commands: GNU dd (oflag=nocache, iflag=direct), base64,
    # sha256sum, grep -F, test, blockdev.
    expect "$G" '^multivolume-ok$' sh -c 'echo aGVsbG8= | base64 -d | dd of=/tmp/f oflag=nocache bs=5 count=1 2>/dev/null &&
      dd if=/tmp/f bs=5 count=1 2>/dev/null | sha256sum |
        grep -Fq 2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824 &&
      dd if=/nonexistent iflag=direct bs=512 count=1 2>&1 | grep -q "No such file" &&
      test -d /tmp && ! test -b /tmp && blockdev --version >/dev/null && echo multivolume-ok'
    user_is "$NG" 0 0 "sh -c echo 'nginx stand-in (e2e/cluster/images.py): no nginx here' >&2; exit 1"
    expect "$NG" '^nginx stand-in'
    # volumes' "should allow exec of files on the volume" command, with /tmp for the volume.
    expect "$NG" '^check-nginx-exec\.sh$' /bin/sh -ec \
      'echo "ls /tmp" > /tmp/check-nginx-exec.sh; chmod u+x /tmp/check-nginx-exec.sh; /tmp/check-nginx-exec.sh;'
  else
    bad "the e2e suite's images are not all in images.txt: busybox '$BU' agnhost '$A' glibc-dns-testing '$G' nginx '$NG'"
  fi
fi

left=$(ctr containers ls -q)
[ -z "$left" ] || bad "containers left behind: $left"
[ $fails = 0 ] || { echo "images-check: $fails check(s) failed" >&2; exit 1; }
echo "images-check: every image imported and ran"
