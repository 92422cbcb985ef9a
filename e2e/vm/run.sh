#!/usr/bin/env bash
# The VM suite: real ublk devices on a real Debian kernel, booted under qemu TCG.
#
# usage: e2e/vm/run.sh [--kernel trixie|sid] [--only SUBSTRING[,SUBSTRING..]] [--timeout SECS] [--verbose]
#                      [--skip-build]   (reuse the binaries already built in the target dir)
#
# Builds static release binaries, fetches and verifies Debian's kernel package (cached in
# e2e/vm/.cache), makes the suite's certificates, builds a busybox initramfs, boots it, runs
# e2e/vm/scenarios/NN-*.sh in order in the guest and prints one "SCENARIO <name>: PASS|FAIL
# (<secs>s)" line each. Exits 0 only if every scenario passed and the guest reported the end
# of the suite (qemu itself exits 0 whatever happens in the guest, so the console is the
# source of truth).
set -euo pipefail
trap '[[ $- == *e* ]] && echo "run.sh: failed at line $LINENO: $BASH_COMMAND" >&2' ERR

VM=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$VM/../.." && pwd)
KERNEL=trixie; ONLY=""; TIMEOUT=1800; VERBOSE=0; BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --kernel) KERNEL=${2:?}; shift 2 ;;
    --kernel=*) KERNEL=${1#*=}; shift ;;
    --only) ONLY=${2:?}; shift 2 ;;
    --timeout) TIMEOUT=${2:?}; shift 2 ;;
    --verbose|-v) VERBOSE=1; shift ;;
    --skip-build) BUILD=0; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$KERNEL" in trixie|sid) ;; *) echo "run.sh: --kernel must be trixie or sid" >&2; exit 2 ;; esac

# Tools only: installing them is e2e/setup-host.sh's job.
missing=()
for t in qemu-system-x86_64 busybox cpio gzip xz curl gpgv dpkg-deb depmod modprobe \
         mke2fs e2fsck mkfs.xfs xfs_repair fio cargo timeout openssl; do
  command -v "$t" >/dev/null || missing+=("$t")
done
[ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
if [ ${#missing[@]} -gt 0 ]; then
  echo "run.sh: missing tools: ${missing[*]} (run e2e/setup-host.sh)" >&2; exit 2
fi

CACHE="$VM/.cache"
mkdir -p "$CACHE"
t0=$(date +%s)

# 1. Kernel (verified: InRelease signature, then the sha256 chain).
KDIR=$("$VM/lib/fetch-kernel.sh" "$KERNEL" cloud-amd64 "$CACHE" | tail -1)
VMLINUZ=$( (ls "$KDIR"/boot/vmlinuz-* "$KDIR"/usr/lib/modules/*/vmlinuz 2>/dev/null || true) | head -1)
[ -f "$VMLINUZ" ] || { echo "run.sh: no vmlinuz in $KDIR" >&2; exit 1; }

# 2. Static release binaries. --target keeps crt-static away from build scripts and proc-macros.
TARGET=x86_64-unknown-linux-gnu
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
pkgs=(-p enbd-node -p enbd-server -p csi-driver)
[ -d "$REPO/e2e/src/bin" ] && pkgs+=(-p enbd-e2e)
if [ $BUILD = 1 ]; then
  echo "run.sh: building static release binaries (${pkgs[*]})"
  (cd "$REPO" && RUSTFLAGS='-C target-feature=+crt-static' \
    cargo build --release --quiet --target "$TARGET" --bins "${pkgs[@]}")
fi
BINDIR="$CACHE/bin"
rm -rf "$BINDIR"; mkdir -p "$BINDIR"
for b in enbd-node enbd-server csi-driver enbd-faultproxy csi-node-conformance; do
  [ -x "$TARGET_DIR/$TARGET/release/$b" ] && cp "$TARGET_DIR/$TARGET/release/$b" "$BINDIR/"
done
for b in enbd-node enbd-server; do
  [ -x "$BINDIR/$b" ] || { echo "run.sh: $b was not built (looked in $TARGET_DIR/$TARGET/release)" >&2; exit 1; }
done
# csi-sanity (kubernetes-csi/csi-test, Go): built once from the source in e2e/csi-sanity and
# cached outside the clone; a warm cache costs nothing.
cp "$("$REPO/e2e/csi-sanity/build.sh" | tail -1)" "$BINDIR/csi-sanity"
echo "run.sh: guest binaries: $(ls "$BINDIR" | tr '\n' ' ')"

# 3. Certificates (a CA, the server's, the node's and the controller's: the suite runs with
# TLS and management mTLS on, as the chart deploys), then the initramfs.
PKI="$CACHE/pki"
"$VM/lib/mkcerts.sh" "$PKI"
INITRD="$CACHE/initrd-$KERNEL.cpio.gz"
"$VM/lib/mkinitrd.sh" "$KDIR" "$BINDIR" "$INITRD" "$PKI"
t1=$(date +%s)
echo "run.sh: kernel $(basename "$VMLINUZ") from $(head -1 "$KDIR/packages"), prepared in $((t1 - t0))s"

# 4. Boot. KVM does not work on these machines: TCG with every CPU feature.
LOG="$CACHE/console-$KERNEL.log"
append="console=ttyS0 panic=-1 quiet ENBD_SCENARIO_TIMEOUT=600"
[ -n "$ONLY" ] && append="$append ENBD_ONLY=$ONLY"
echo "run.sh: booting (console log: $LOG)"
# A TCG guest occasionally oopses while the kernel patches its own text at boot (an
# emulation flake, seen as "Oops: int3" before /init runs): such a boot is retried once.
boot() {
  set +e
  timeout --foreground -k 10 "$TIMEOUT" qemu-system-x86_64 -accel tcg -cpu max -m 3G -smp 2 \
    -nographic -no-reboot -nodefaults -serial stdio -display none \
    -kernel "$VMLINUZ" -initrd "$INITRD" -append "$append" </dev/null 2>&1 \
    | sed -u 's/\r$//' | tee "$LOG" | if [ $VERBOSE = 1 ]; then cat; else grep --line-buffered -aE 'SCENARIO |ENBD-VM-SUITE'; fi
  qemu_rc=${PIPESTATUS[0]}
  set -e
}
boot
if ! grep -aq 'ENBD-VM-SUITE: kernel' "$LOG"; then
  echo "run.sh: the guest kernel did not reach /init; booting once more"
  tail -n 5 "$LOG"
  boot
fi
t2=$(date +%s)

# 5. Verdict from the console.
summary=$( (grep -aoE 'ENBD-VM-SUITE: DONE passed=[0-9]+ failed=[0-9]+' "$LOG" || true) | tail -1)
failed_names=$( (grep -aoE 'SCENARIO [^ ]+: FAIL' "$LOG" || true) | awk '{print $2}' | tr -d ':')
if [ $VERBOSE = 0 ]; then
  for n in $failed_names; do
    echo "---- output of $n ----"; (grep -aF "[$n" "$LOG" || true) | tail -n 80
  done
fi
echo "run.sh: VM run took $((t2 - t1))s (total $((t2 - t0))s), kernel $KERNEL"
if [ -z "$summary" ]; then
  [ "$qemu_rc" = 124 ] && echo "run.sh: FAIL: global timeout (${TIMEOUT}s) hit" >&2
  echo "run.sh: FAIL: the guest did not finish the suite (qemu rc=$qemu_rc); see $LOG" >&2
  tail -n 40 "$LOG" >&2
  exit 1
fi
passed=$(echo "$summary" | sed -E 's/.*passed=([0-9]+).*/\1/')
failed=$(echo "$summary" | sed -E 's/.*failed=([0-9]+).*/\1/')
if [ "$failed" != 0 ] || [ "$passed" = 0 ]; then
  echo "run.sh: FAIL: $passed passed, $failed failed" >&2; exit 1
fi
echo "run.sh: PASS: $passed scenarios"
