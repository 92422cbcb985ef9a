#!/usr/bin/env bash
# The cluster's node: Kubernetes node "enbd-vm" in a TCG VM, where ublk exists, plus the
# cluster DNS on the host side.
#
# usage: e2e/cluster/node-vm.sh up [--kube-bin DIR] [--images DIR] [--timeout SECS]
#        e2e/cluster/node-vm.sh down | status
#
#   up      builds the node's root disk (ext4 from e2e/cluster/lib/mknode-root.sh's tree with
#           mke2fs -d, plus kubelet, kube-proxy, kubeconfigs, the CA and the image archives),
#           boots the VM inside the network namespace enbd-cluster (tap enbdtap0, guest
#           10.88.0.2), starts enbd-dns there on 10.88.0.1:53 behind the Service
#           kube-system/kube-dns (10.96.0.10), waits for "ENBD-NODE: ready" on the console
#           (containerd, the images, kubelet and kube-proxy started) and for Node enbd-vm Ready.
#   down    powers the VM off cleanly (the guest's control port) and stops enbd-dns.
#   status  says what runs.
#
# Needs the control plane (e2e/cluster/control-plane.sh up): the state dir's pki/ca.crt,
# admin.kubeconfig, kubelet.kubeconfig and kube-proxy.kubeconfig. --kube-bin defaults to the
# last line of e2e/cluster/build-kube.sh, --images to $STATE/images (e2e/cluster/images.sh).
# Logs: $STATE/logs/vm-console.log (the guest's console), node-daemons.log (containerd,
# kubelet, kube-proxy), enbd-dns.log.
# ENBD_NODE_KERNEL: the Debian suite whose cloud kernel the node boots (default trixie, 6.12;
# sid's has ublk UPDATE_SIZE, so kind_volumes' online expansion grows the mounted filesystem).
set -euo pipefail

CLUSTER=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$CLUSTER/../.." && pwd)
STATE=${ENBD_CLUSTER_STATE:-/var/tmp/enbd-cluster}
NETNS=${ENBD_CLUSTER_NETNS:-enbd-cluster}   # another name only to test beside a running cluster
TAP=enbdtap0
LOGS="$STATE/logs"
PIDFILE="$STATE/node-vm.pid"
DNS_PIDFILE="$STATE/enbd-dns.pid"
CTL="$STATE/node-ctl"
log() { echo "node-vm: $*" >&2; }
die() { log "$*"; exit 1; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
in_ns() { ip netns exec "$NETNS" "$@"; }

# The namespace and the tap, as control-plane.sh makes them (whichever runs first).
ensure_netns() {
  ip netns list | grep -qw "$NETNS" || ip netns add "$NETNS"
  ip -n "$NETNS" link set lo up
  if ! ip -n "$NETNS" link show "$TAP" >/dev/null 2>&1; then
    ip -n "$NETNS" tuntap add dev "$TAP" mode tap
  fi
  ip -n "$NETNS" addr replace 10.88.0.1/24 dev "$TAP"
  ip -n "$NETNS" link set "$TAP" up
}

kubectl_admin() { in_ns "$KUBE_BIN/kubectl" --kubeconfig "$STATE/admin.kubeconfig" "$@"; }

# The cluster DNS: enbd-dns on the host side of the tap, and the Service that gives it
# 10.96.0.10 (no selector: its EndpointSlice names 10.88.0.1, kube-proxy does the rest).
start_dns() {
  local dns
  kubectl_admin apply -f - >/dev/null <<'EOF'
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: { k8s-app: kube-dns }
spec:
  clusterIP: 10.96.0.10
  ports:
    - { name: dns, port: 53, protocol: UDP, targetPort: 53 }
    - { name: dns-tcp, port: 53, protocol: TCP, targetPort: 53 }
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-enbd
  namespace: kube-system
  labels:
    kubernetes.io/service-name: kube-dns
    endpointslice.kubernetes.io/managed-by: enbd-dns
addressType: IPv4
endpoints:
  - addresses: [10.88.0.1]
    conditions: { ready: true }
ports:
  - { name: dns, port: 53, protocol: UDP }
  - { name: dns-tcp, port: 53, protocol: TCP }
EOF
  alive "$DNS_PIDFILE" && return 0
  dns=$(dns_binary)
  # The pid file is written by the process that becomes enbd-dns (exec): setsid forks when
  # it is a group leader, so $! would name a process that is gone (`down` then left
  # enbd-dns running in the netns).
  in_ns setsid sh -c 'echo $$ > "$1"; shift; exec "$@"' sh "$DNS_PIDFILE" \
    env KUBECONFIG="$STATE/admin.kubeconfig" RUST_LOG=info \
    "$dns" --listen 10.88.0.1:53 --domain cluster.local >> "$LOGS/enbd-dns.log" 2>&1 < /dev/null &
  for _ in 1 2 3 4 5 6 7 8 9 10; do [ -s "$DNS_PIDFILE" ] && break; sleep 0.2; done
  log "enbd-dns on 10.88.0.1:53 (pid $(cat "$DNS_PIDFILE"), log $LOGS/enbd-dns.log)"
}

# enbd-dns from the static release build (the one e2e/vm/run.sh and images.sh use), built
# when missing.
dns_binary() {
  local target_dir=${CARGO_TARGET_DIR:-$REPO/target} bin
  bin="$target_dir/x86_64-unknown-linux-gnu/release/enbd-dns"
  if [ ! -x "$bin" ]; then
    log "building enbd-dns"
    (cd "$REPO" && RUSTFLAGS='-C target-feature=+crt-static' \
      cargo build --release --quiet --target x86_64-unknown-linux-gnu -p enbd-e2e --bin enbd-dns) >&2
  fi
  echo "$bin"
}

# The root disk: the node's tree (mknode-root.sh) plus /var/seed from the host, as a sparse
# ext4 image (mke2fs -d: no mount needed). The guest writes containerd's and kubelet's state
# and its logs there. A fresh disk every boot.
make_disk() { # <root-dir>
  local root=$1 seed ref file
  seed="$root/var/seed"; mkdir -p "$seed/bin" "$seed/pki" "$seed/images"
  for b in kubelet kube-proxy; do
    [ -x "$KUBE_BIN/$b" ] || die "$KUBE_BIN/$b missing (e2e/cluster/build-kube.sh)"
    cp "$KUBE_BIN/$b" "$seed/bin/"
  done
  cp "$STATE/pki/ca.crt" "$seed/pki/ca.crt"
  # Certificates embedded: the kubeconfigs name files under the host's state dir.
  for k in kubelet kube-proxy; do
    [ -f "$STATE/$k.kubeconfig" ] || die "$STATE/$k.kubeconfig missing (control-plane.sh up)"
    "$KUBE_BIN/kubectl" --kubeconfig "$STATE/$k.kubeconfig" config view --flatten --raw \
      > "$seed/$k.kubeconfig"
  done
  [ -f "$IMAGES/images.txt" ] || die "$IMAGES/images.txt missing (e2e/cluster/images.sh $IMAGES)"
  cp "$IMAGES/images.txt" "$seed/images/"
  while read -r ref file; do
    [ -n "$ref" ] || continue
    cp -l "$IMAGES/$file" "$seed/images/" 2>/dev/null || cp "$IMAGES/$file" "$seed/images/"
  done < "$IMAGES/images.txt"
  rm -f "$STATE/node-disk.img"
  truncate -s 24G "$STATE/node-disk.img"
  mke2fs -q -t ext4 -L enbd-node -E lazy_itable_init=1,lazy_journal_init=1 \
    -d "$root" "$STATE/node-disk.img"
  log "root disk $STATE/node-disk.img: $(du -sh "$root" | cut -f1) used (seed $(du -sh "$seed" | cut -f1))"
  rm -rf "$root"
}

# The guest's kernel panicked: qemu is gone (panic=-1 with -no-reboot) and the console says so.
guest_panicked() { ! alive "$PIDFILE" && grep -aq 'Kernel panic' "$LOGS/vm-console.log"; }

# Builds the root disk, boots the VM and waits for Node enbd-vm Ready; sets PANICKED=1 and
# returns if the guest kernel panics on the way (cmd_up decides whether to boot again).
boot_node() {
  local kdir vmlinuz initrd
  PANICKED=0

  kdir=$("$REPO/e2e/vm/lib/fetch-kernel.sh" "${ENBD_NODE_KERNEL:-trixie}" cloud-amd64 "$REPO/e2e/vm/.cache" | tail -1)
  # trixie's package has boot/vmlinuz-*, sid's (7.x) usr/lib/modules/*/vmlinuz.
  vmlinuz=$( (ls "$kdir"/boot/vmlinuz-* "$kdir"/usr/lib/modules/*/vmlinuz 2>/dev/null || true) | head -1)
  [ -f "$vmlinuz" ] || die "no vmlinuz in $kdir"
  initrd="$STATE/node-initrd.cpio.gz"
  "$CLUSTER/lib/mknode-root.sh" "$kdir" "$STATE/node-root.d" "$initrd"
  make_disk "$STATE/node-root.d"

  ensure_netns
  rm -f "$CTL.in" "$CTL.out"; mkfifo "$CTL.in" "$CTL.out"
  : > "$LOGS/vm-console.log"; : > "$LOGS/node-daemons.log"
  # ttyS0 console, ttyS1 control port (node-vm.sh down writes "poweroff"), ttyS2 daemon logs.
  in_ns qemu-system-x86_64 -accel tcg -cpu max -m "${ENBD_NODE_MEMORY:-8G}" -smp 2 -nodefaults -no-reboot \
    -display none -daemonize -pidfile "$PIDFILE" \
    -kernel "$vmlinuz" -initrd "$initrd" -append "console=ttyS0 panic=-1 quiet" \
    -serial "file:$LOGS/vm-console.log" -serial "pipe:$CTL" -serial "file:$LOGS/node-daemons.log" \
    -drive "file=$STATE/node-disk.img,format=raw,if=virtio,cache=unsafe" \
    -netdev "tap,id=n0,ifname=$TAP,script=no,downscript=no" \
    -device virtio-net-pci,netdev=n0,mac=52:54:00:88:00:02
  # A drain for the control port's output: nothing should block qemu on it.
  (cat "$CTL.out" > /dev/null 2>&1 &)
  ip -n "$NETNS" route replace 10.244.0.0/24 via 10.88.0.2 dev "$TAP" onlink
  log "VM booting (pid $(cat "$PIDFILE"), console $LOGS/vm-console.log)"
  start_dns

  local waited=0
  while :; do
    if grep -aq 'ENBD-NODE: ready' "$LOGS/vm-console.log"; then break; fi
    if guest_panicked; then PANICKED=1; return 0; fi
    if grep -aq 'ENBD-NODE: FAILED' "$LOGS/vm-console.log" || ! alive "$PIDFILE" \
       || [ $waited -ge "$TIMEOUT" ]; then
      log "FAIL: the node did not come up (after ${waited}s)"
      tail -n 30 "$LOGS/vm-console.log" >&2
      tail -n 40 "$LOGS/node-daemons.log" >&2
      exit 1
    fi
    sleep 2; waited=$((waited + 2))
  done
  log "guest: $(grep -ao 'ENBD-NODE: ready.*' "$LOGS/vm-console.log" | tr -d '\r'); waiting for Node enbd-vm Ready"
  local left=$((TIMEOUT - waited)); [ $left -gt 60 ] || left=60
  until kubectl_admin get node enbd-vm >/dev/null 2>&1; do
    if guest_panicked; then PANICKED=1; return 0; fi
    alive "$PIDFILE" || die "FAIL: the node VM ended before node enbd-vm registered"
    [ $left -gt 0 ] || die "FAIL: node enbd-vm never registered"; sleep 2; left=$((left - 2))
  done
  # In steps, so a guest that dies meanwhile is seen at once.
  until kubectl_admin wait --for=condition=Ready node/enbd-vm --timeout=10s >/dev/null 2>&1; do
    if guest_panicked; then PANICKED=1; return 0; fi
    left=$((left - 10))
    [ $left -gt 0 ] || { tail -n 40 "$LOGS/node-daemons.log" >&2; die "FAIL: node enbd-vm not Ready"; }
  done
}

cmd_up() {
  KUBE_BIN=""; IMAGES="$STATE/images"; TIMEOUT=1200
  while [ $# -gt 0 ]; do
    case "$1" in
      --kube-bin) KUBE_BIN=${2:?}; shift 2 ;;
      --images) IMAGES=${2:?}; shift 2 ;;
      --timeout) TIMEOUT=${2:?}; shift 2 ;;
      *) die "unknown argument $1" ;;
    esac
  done
  [ "$(id -u)" = 0 ] || die "needs root (network namespace, tap, port 53)"
  for t in qemu-system-x86_64 mke2fs depmod modprobe containerd runc ctr nft xtables-nft-multi; do
    command -v "$t" >/dev/null || die "missing $t (run e2e/setup-host.sh --cluster)"
  done
  alive "$PIDFILE" && die "the node VM already runs (pid $(cat "$PIDFILE")): node-vm.sh down first"
  [ -n "$KUBE_BIN" ] || KUBE_BIN=$("$CLUSTER/build-kube.sh" | tail -1)
  [ -x "$KUBE_BIN/kubectl" ] || die "no kubectl in $KUBE_BIN"
  [ -f "$STATE/admin.kubeconfig" ] || die "$STATE/admin.kubeconfig missing (control-plane.sh up)"
  mkdir -p "$LOGS"
  local t0
  t0=$(date +%s)
  # A TCG guest now and then oopses while its kernel patches its own text ("Oops: int3" in
  # kmem_cache_alloc, seen twice in the kubelet's first minutes: an emulation flake, as the
  # VM suite sees at boot). panic=-1 with -no-reboot ends qemu then; one more boot on a
  # fresh disk follows, the first console kept.
  boot_node
  if [ $PANICKED = 1 ]; then
    cp "$LOGS/vm-console.log" "$LOGS/vm-console.panic.log"
    log "the guest kernel panicked (console: $LOGS/vm-console.panic.log); booting once more"
    tail -n 12 "$LOGS/vm-console.log" >&2
    # A Node the dead kubelet registered would look Ready until its status goes stale.
    kubectl_admin delete node enbd-vm --ignore-not-found --wait=false >/dev/null
    boot_node
    [ $PANICKED = 0 ] || die "FAIL: the guest kernel panicked again (console: $LOGS/vm-console.log)"
  fi
  log "node enbd-vm Ready (up took $(( $(date +%s) - t0 ))s in all)"
}

cmd_down() {
  if alive "$PIDFILE"; then
    local pid; pid=$(cat "$PIDFILE")
    echo poweroff > "$CTL.in" &
    local n=0
    while kill -0 "$pid" 2>/dev/null && [ $n -lt 120 ]; do sleep 1; n=$((n + 1)); done
    if kill -0 "$pid" 2>/dev/null; then
      log "the guest did not power off in 120s: killing qemu"; kill "$pid"
    else
      log "VM powered off"
    fi
  fi
  rm -f "$PIDFILE" "$CTL.in" "$CTL.out"
  if alive "$DNS_PIDFILE"; then kill "$(cat "$DNS_PIDFILE")"; log "enbd-dns stopped"; fi
  rm -f "$DNS_PIDFILE"
}

cmd_status() {
  if alive "$PIDFILE"; then echo "node VM: running (pid $(cat "$PIDFILE"))"; else echo "node VM: stopped"; fi
  if alive "$DNS_PIDFILE"; then echo "enbd-dns: running (pid $(cat "$DNS_PIDFILE"))"; else echo "enbd-dns: stopped"; fi
  [ -f "$LOGS/vm-console.log" ] && grep -a 'ENBD-NODE:' "$LOGS/vm-console.log" | tr -d '\r' | tail -n 5
  alive "$PIDFILE"
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  -h|--help) sed -n '2,21p' "$0" ;;
  *) sed -n '2,21p' "$0" >&2; exit 2 ;;
esac
