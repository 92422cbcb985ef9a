#!/usr/bin/env bash
# The VM suite's certificates, made fresh on the host for every run (openssl, ECDSA P-256,
# X.509 v3: rustls refuses v1 certificates and names only in the CN). The same set the chart
# makes, for the names the guest dials:
#   ca-cert.pem                                 the CA every side trusts
#   server-cert.pem / server-key.pem            enbd-server (data path and management), for
#                                               127.0.0.1 and localhost
#   node-cert.pem / node-key.pem                CN enbd-node: the node's client certificate
#                                               (data path; ReplicaService, GetVolume, Health)
#   controller-cert.pem / controller-key.pem    CN enbd-controller: csi-driver and the suite's
#                                               own management calls (every method)
# The CA key stays on the host: nothing in the guest signs anything.
#
# usage: mkcerts.sh <out-dir>
set -euo pipefail

OUT=$1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
rm -rf "$OUT"; mkdir -p "$OUT"

quiet() { "$@" 2>"$WORK/err" || { cat "$WORK/err" >&2; return 1; }; }

quiet openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 7 \
  -subj /CN=enbd-vm-ca -addext basicConstraints=critical,CA:TRUE \
  -addext keyUsage=critical,keyCertSign,cRLSign -keyout "$WORK/ca-key.pem" -out "$OUT/ca-cert.pem"

# leaf NAME CN EXTENDED_KEY_USAGE [SUBJECT_ALT_NAME]
leaf() {
  quiet openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$2" \
    -keyout "$OUT/$1-key.pem" -out "$WORK/$1.csr"
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=%s\n' "$3" \
    > "$WORK/$1.ext"
  [ -z "${4:-}" ] || echo "subjectAltName=$4" >> "$WORK/$1.ext"
  quiet openssl x509 -req -in "$WORK/$1.csr" -CA "$OUT/ca-cert.pem" -CAkey "$WORK/ca-key.pem" \
    -set_serial "0x$(openssl rand -hex 8)" -days 7 -extfile "$WORK/$1.ext" -out "$OUT/$1-cert.pem"
}
leaf server enbd-server serverAuth DNS:localhost,IP:127.0.0.1
leaf node enbd-node clientAuth
leaf controller enbd-controller clientAuth
chmod 0600 "$OUT"/*-key.pem
