#!/usr/bin/env bash
# Imports the archives images.sh wrote into a containerd of its own and runs each image once:
# the check that the archives are what containerd (and so the kubelet) accepts and that
# entrypoints, users and shared libraries work. Needs root, containerd, ctr and runc.
#
# usage: e2e/cluster/images-check.sh OUT_DIR
#
# containerd runs from a scratch directory (root, state, socket; the CRI plugin off), so the
# host's own containerd, if any, is not touched; it is stopped and the directory removed at
# exit.
set -euo pipefail
OUT=$(cd "${1:?usage: images-check.sh OUT_DIR}" && pwd)
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
# <image> <uid> <gid>: the process the image's config makes (entrypoint, user).
user_is() {
  local img=$1 id="check-user-$n" uid gid args; n=$((n + 1))
  ctr containers create "$img" "$id" >/dev/null
  read -r uid gid args < <(ctr containers info "$id" | python3 -c 'import json, sys
p = json.load(sys.stdin)["Spec"]["process"]
print(p["user"]["uid"], p["user"]["gid"], " ".join(p["args"]))')
  ctr containers rm "$id" >/dev/null
  if [ "$uid:$gid" = "$2:$3" ]; then
    ok "$img: process $args as $uid:$gid"
  else
    bad "$img: process $args as $uid:$gid, want $2:$3"
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
for f in csi-provisioner csi-attacher csi-resizer csi-snapshotter livenessprobe \
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

left=$(ctr containers ls -q)
[ -z "$left" ] || bad "containers left behind: $left"
[ $fails = 0 ] || { echo "images-check: $fails check(s) failed" >&2; exit 1; }
echo "images-check: every image imported and ran"
