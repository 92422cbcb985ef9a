#!/usr/bin/env bash
# The test cluster's control plane: etcd, kube-apiserver, kube-controller-manager and
# kube-scheduler, run on the host inside the network namespace enbd-cluster, so nothing
# listens on the host's own network. The node (e2e/cluster/node-vm.sh) is a VM whose tap
# device enbdtap0 lives in that namespace: host side 10.88.0.1/24, node 10.88.0.2.
#
# usage: e2e/cluster/control-plane.sh up [--fresh] | down [--purge] | status
#   up       creates the netns and tap (if absent), certificates and kubeconfigs (if absent),
#            starts the four processes (if not running) and waits for /readyz;
#            --fresh first wipes etcd's data (a new, empty cluster; certificates are kept)
#   down     stops the processes (and removes the netns once nothing else runs in it);
#            --purge also deletes the state dir
#   status   which processes run, and the API server's /readyz
#
# State: ${ENBD_CLUSTER_STATE:-/var/tmp/enbd-cluster}: pki/ (X.509 v3: ca, front-proxy-ca, apiserver,
# apiserver-kubelet-client, admin, kubelet (system:node:enbd-vm), kubelet-server,
# controller-manager, scheduler, kube-proxy, front-proxy-client; sa.key/sa.pub), *.kubeconfig (server
# https://10.88.0.1:6443), etcd/, logs/<process>.log, run/<process>.pid.
# Binaries: $ENBD_CLUSTER_BIN, else the bin dir e2e/cluster/build-kube.sh prints.
# Needs root (netns, tap), openssl, iproute2.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
STATE=${ENBD_CLUSTER_STATE:-/var/tmp/enbd-cluster}
NETNS=${ENBD_CLUSTER_NETNS:-enbd-cluster}   # another name only to test beside a running cluster
TAP=enbdtap0
HOST_IP=10.88.0.1
NODE_IP=10.88.0.2
NODE_NAME=enbd-vm
POD_CIDR=10.244.0.0/24      # the node's (the controller manager allocates it from CLUSTER_CIDR)
CLUSTER_CIDR=10.244.0.0/16
SERVICE_CIDR=10.96.0.0/16
API_SERVICE_IP=10.96.0.1
SERVER=https://$HOST_IP:6443
PKI=$STATE/pki
LOGS=$STATE/logs
RUN=$STATE/run
PROCS=(etcd kube-apiserver kube-controller-manager kube-scheduler)

log() { echo "control-plane.sh: $*" >&2; }
die() { log "$*"; exit 1; }
in_ns() { ip netns exec "$NETNS" "$@"; }

bin_dir() {
  if [ -n "${ENBD_CLUSTER_BIN:-}" ]; then echo "$ENBD_CLUSTER_BIN"; return; fi
  "$HERE/build-kube.sh" | tail -n 1
}

# ---- network namespace ----------------------------------------------------------------------
netns_up() {
  ip netns list | awk '{print $1}' | grep -qx "$NETNS" || ip netns add "$NETNS"
  in_ns ip link set lo up
  if ! in_ns ip link show "$TAP" >/dev/null 2>&1; then
    in_ns ip tuntap add dev "$TAP" mode tap
  fi
  in_ns ip addr replace "$HOST_IP/24" dev "$TAP"
  in_ns ip link set "$TAP" up
  # Pods on the node are reached through the node (its CNI bridge).
  in_ns ip route replace "$POD_CIDR" via "$NODE_IP" dev "$TAP" onlink
}

# ---- certificates -----------------------------------------------------------------------------
# new_ca NAME CN : a self-signed CA key and certificate.
new_ca() {
  [ -s "$PKI/$1.crt" ] && return 0
  openssl genrsa -out "$PKI/$1.key" 2048 2>/dev/null
  openssl req -x509 -new -key "$PKI/$1.key" -subj "/CN=$2" -days 3650 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" -out "$PKI/$1.crt"
}

# issue NAME SUBJECT EXTENSIONS [CA] : a key and a certificate signed by CA (default ca),
# X.509 v3 (the extensions make it v3; kube-rs refuses v1 certificates).
issue() {
  local name=$1 subject=$2 ext=$3 ca=${4:-ca}
  [ -s "$PKI/$name.crt" ] && return 0
  openssl genrsa -out "$PKI/$name.key" 2048 2>/dev/null
  openssl req -new -key "$PKI/$name.key" -subj "$subject" -out "$PKI/$name.csr"
  printf '%s\n' "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" \
    "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid" "$ext" > "$PKI/$name.ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/$ca.crt" -CAkey "$PKI/$ca.key" \
    -CAcreateserial -days 3650 -sha256 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr" "$PKI/$name.ext"
}

pki() {
  mkdir -p "$PKI"
  chmod 700 "$PKI"
  new_ca ca enbd-cluster-ca
  # The request-header (front proxy) CA, as kubeadm makes it: components that delegate
  # authentication to the API server read it from kube-system/extension-apiserver-authentication.
  new_ca front-proxy-ca enbd-cluster-front-proxy-ca
  issue front-proxy-client "/CN=front-proxy-client" "extendedKeyUsage=clientAuth" front-proxy-ca
  issue apiserver "/CN=kube-apiserver" "extendedKeyUsage=serverAuth
subjectAltName=IP:$HOST_IP,IP:127.0.0.1,IP:$API_SERVICE_IP,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  # The API server's client certificate towards kubelets (logs, exec, port-forward); RBAC
  # grants it system:kubelet-api-admin, as kubeadm does.
  issue apiserver-kubelet-client "/CN=kube-apiserver-kubelet-client" "extendedKeyUsage=clientAuth"
  issue admin "/O=system:masters/CN=kubernetes-admin" "extendedKeyUsage=clientAuth"
  # The node's credentials: the Node authorizer and NodeRestriction know a kubelet by
  # user system:node:<name> in group system:nodes.
  issue kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" "extendedKeyUsage=clientAuth"
  issue kubelet-server "/CN=$NODE_NAME" "extendedKeyUsage=serverAuth
subjectAltName=IP:$NODE_IP,DNS:$NODE_NAME"
  issue controller-manager "/CN=system:kube-controller-manager" "extendedKeyUsage=clientAuth"
  issue scheduler "/CN=system:kube-scheduler" "extendedKeyUsage=clientAuth"
  issue kube-proxy "/CN=system:kube-proxy" "extendedKeyUsage=clientAuth"
  [ -s "$PKI/sa.key" ] || openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  [ -s "$PKI/sa.pub" ] || openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  chmod 600 "$PKI"/*.key
}

# kubeconfig FILE USER CERT : a kubeconfig with the certificates inlined (one file to copy).
kubeconfig() {
  local file=$1 user=$2 cert=$3
  [ -s "$file" ] && return 0
  cat > "$file.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: enbd-cluster
  cluster:
    server: $SERVER
    certificate-authority-data: $(base64 -w0 < "$PKI/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 < "$PKI/$cert.crt")
    client-key-data: $(base64 -w0 < "$PKI/$cert.key")
contexts:
- name: $user@enbd-cluster
  context: {cluster: enbd-cluster, user: $user}
current-context: $user@enbd-cluster
EOF
  chmod 600 "$file.tmp"
  mv "$file.tmp" "$file"
}

kubeconfigs() {
  kubeconfig "$STATE/admin.kubeconfig" kubernetes-admin admin
  kubeconfig "$STATE/kubelet.kubeconfig" "system:node:$NODE_NAME" kubelet
  kubeconfig "$STATE/kube-proxy.kubeconfig" system:kube-proxy kube-proxy
  kubeconfig "$STATE/controller-manager.kubeconfig" system:kube-controller-manager controller-manager
  kubeconfig "$STATE/scheduler.kubeconfig" system:kube-scheduler scheduler
}

# ---- processes --------------------------------------------------------------------------------
running() {
  local pid
  pid=$(cat "$RUN/$1.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

# start NAME ARGS... : runs the binary NAME inside the netns in its own session, logging to
# $LOGS/NAME.log, unless it already runs.
start() {
  local name=$1
  shift
  if running "$name"; then return 0; fi
  echo "=== $(date -u +%FT%TZ) starting $name" >> "$LOGS/$name.log"
  ip netns exec "$NETNS" setsid "$BIN/$name" "$@" >> "$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! > "$RUN/$name.pid"
}

stop() {
  local name=$1 pid
  pid=$(cat "$RUN/$name.pid" 2>/dev/null) || return 0
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { log "$name ($pid) ignored SIGTERM for 10 s; killing it"; kill -KILL "$pid" 2>/dev/null || true; }
  fi
  rm -f "$RUN/$name.pid"
}

kubectl_admin() { in_ns "$BIN/kubectl" --kubeconfig "$STATE/admin.kubeconfig" "$@"; }

# wait_ready SECONDS : polls the API server's /readyz; on timeout shows the logs' tails.
wait_ready() {
  local deadline=$(( $(date +%s) + $1 )) name
  until kubectl_admin get --raw /readyz >/dev/null 2>&1; do
    for name in etcd kube-apiserver; do
      running "$name" || { tail -n 30 "$LOGS/$name.log" >&2; die "$name exited (log: $LOGS/$name.log)"; }
    done
    if [ "$(date +%s)" -ge "$deadline" ]; then
      for name in etcd kube-apiserver; do log "--- $name"; tail -n 15 "$LOGS/$name.log" >&2; done
      die "the API server did not become ready within $1 s"
    fi
    sleep 1
  done
}

# wait_healthy NAME PORT SECONDS : polls a component's /healthz on the netns' loopback
# (served without authentication, as for a kubelet's liveness probe).
wait_healthy() {
  local name=$1 port=$2 deadline=$(( $(date +%s) + $3 ))
  until in_ns curl -sfk -o /dev/null "https://127.0.0.1:$port/healthz"; do
    running "$name" || { tail -n 30 "$LOGS/$name.log" >&2; die "$name exited (log: $LOGS/$name.log)"; }
    if [ "$(date +%s)" -ge "$deadline" ]; then
      tail -n 15 "$LOGS/$name.log" >&2
      die "$name was not healthy within $3 s"
    fi
    sleep 1
  done
}

up() {
  local fresh=0
  [ "${1:-}" != --fresh ] || fresh=1
  [ "$(id -u)" = 0 ] || die "needs root (network namespace, tap device)"
  BIN=$(bin_dir)
  for name in "${PROCS[@]}" kubectl; do [ -x "$BIN/$name" ] || die "no $name in $BIN"; done
  if [ $fresh = 1 ]; then
    for name in kube-scheduler kube-controller-manager kube-apiserver etcd; do stop "$name"; done
    rm -rf "$STATE/etcd"
  fi
  mkdir -p "$STATE" "$LOGS" "$RUN" "$STATE/etcd"
  chmod 700 "$STATE/etcd"
  local t0
  t0=$(date +%s)
  netns_up
  pki
  kubeconfigs

  cat > "$STATE/etcd.yaml" <<EOF
name: enbd-cluster
data-dir: $STATE/etcd
listen-client-urls: http://127.0.0.1:2379
advertise-client-urls: http://127.0.0.1:2379
listen-peer-urls: http://127.0.0.1:2380
initial-advertise-peer-urls: http://127.0.0.1:2380
initial-cluster: enbd-cluster=http://127.0.0.1:2380
initial-cluster-state: new
log-level: warn
EOF
  start etcd --config-file "$STATE/etcd.yaml"

  start kube-apiserver \
    --etcd-servers=http://127.0.0.1:2379 \
    --bind-address=0.0.0.0 --secure-port=6443 --advertise-address="$HOST_IP" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --allow-privileged=true \
    --authorization-mode=Node,RBAC \
    --enable-admission-plugins=NodeRestriction \
    --client-ca-file="$PKI/ca.crt" \
    --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
    --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types=InternalIP \
    --requestheader-client-ca-file="$PKI/front-proxy-ca.crt" \
    --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="$PKI/front-proxy-client.crt" \
    --proxy-client-key-file="$PKI/front-proxy-client.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$PKI/sa.pub" \
    --service-account-signing-key-file="$PKI/sa.key" \
    --profiling=false

  # The controller manager and the scheduler read RBAC-protected objects at start-up and
  # exit when the API server's bootstrap roles are not there yet: they start after /readyz.
  wait_ready 180
  # What kubeadm sets up besides the built-in roles: the API server's kubelet client may use
  # the kubelet API (logs, exec), and nodes may renew their own client certificates.
  kubectl_admin apply -f - >/dev/null <<EOF
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: kube-apiserver-kubelet-api-admin
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: system:kubelet-api-admin}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: kube-apiserver-kubelet-client}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: node-autoapprove-certificate-rotation
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: system:certificates.k8s.io:certificatesigningrequests:selfnodeclient
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: Group, name: system:nodes}
EOF

  start kube-controller-manager \
    --kubeconfig="$STATE/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$STATE/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$STATE/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --leader-elect=false \
    --controllers='*' \
    --cluster-name=enbd-cluster \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --root-ca-file="$PKI/ca.crt" \
    --service-account-private-key-file="$PKI/sa.key" \
    --use-service-account-credentials=true \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --allocate-node-cidrs=true --cluster-cidr="$CLUSTER_CIDR" --node-cidr-mask-size=24 \
    --profiling=false

  start kube-scheduler \
    --kubeconfig="$STATE/scheduler.kubeconfig" \
    --authentication-kubeconfig="$STATE/scheduler.kubeconfig" \
    --authorization-kubeconfig="$STATE/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --leader-elect=false --profiling=false

  wait_healthy kube-controller-manager 10257 120
  wait_healthy kube-scheduler 10259 120
  log "ready in $(( $(date +%s) - t0 ))s: KUBECONFIG=$STATE/admin.kubeconfig, inside 'ip netns exec $NETNS'"
}

down() {
  local name
  for name in kube-scheduler kube-controller-manager kube-apiserver etcd; do stop "$name"; done
  if ip netns list | awk '{print $1}' | grep -qx "$NETNS"; then
    if [ -z "$(ip netns pids "$NETNS" 2>/dev/null)" ]; then
      ip netns delete "$NETNS"
    else
      log "netns $NETNS kept: processes still run in it ($(ip netns pids "$NETNS" | tr '\n' ' '))"
    fi
  fi
  if [ "${1:-}" = --purge ]; then
    rm -rf "$STATE"
  fi
  log "stopped"
}

status() {
  local name rc=0
  for name in "${PROCS[@]}"; do
    if running "$name"; then echo "$name: running (pid $(cat "$RUN/$name.pid"))"; else echo "$name: not running"; rc=1; fi
  done
  BIN=$(bin_dir)
  if kubectl_admin get --raw /readyz >/dev/null 2>&1; then echo "readyz: ok ($SERVER)"; else echo "readyz: not ready"; rc=1; fi
  return $rc
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) shift; down "$@" ;;
  status) status ;;
  -h|--help) sed -n '2,22p' "$0" ;;
  *) sed -n '2,22p' "$0" >&2; exit 2 ;;
esac
