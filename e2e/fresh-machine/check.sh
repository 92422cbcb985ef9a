#!/usr/bin/env bash
# Runs the README's two set-up commands the way `make demo` and `make test` run them
# (e2e/setup-host.sh --demo / --test) on fresh Debian bookworm machines: clean debootstrap
# root filesystems, each run from its own copy, in three variants:
#   no-node          nothing beyond debootstrap's default set (+ ca-certificates)
#   debian-node      Debian's nodejs and npm installed first
#   thirdparty-node  a third-party Node.js .deb that bundles npm (Conflicts: npm), rebuilt
#                    from the host's own package with dpkg-repack
# and asserts that apt succeeded, that the profile's commands exist afterwards, that the demo
# profile installed none of the test-only packages, and that a second run only checks. In the
# --build-in variant it also runs `cargo build --release -p enbd-server` and `make demo` in a
# private network namespace, and waits for enbd-server's readiness line.
#
# Usage: e2e/fresh-machine/check.sh [--variants a,b,c] [--profiles demo,test]
#                                    [--build-in VARIANT|none] [--nextest build|host] [--keep]
# Needs root (debootstrap, chroot, mounts). Installs debootstrap and dpkg-repack on the host if
# missing. The apt mirror is the host's own (from its apt sources; FRESH_MIRROR overrides).
# The host's Rust toolchain (~/.rustup) is mounted read-only into each chroot, with a copy of
# its rustup proxies as ~/.cargo/bin (no cargo-nextest: the test profile builds it, unless
# --nextest host puts the host's binary there, for a loaded machine: the build takes long).
# Caches under FRESH_DIR (default /var/tmp/enbd-fresh): the rootfs, the repacked Node.js, a
# copy of the host's cargo registry (downloads made in a chroot stay there), and the
# cargo-nextest build's target directory (so only the first test profile pays for that build:
# the others still run `cargo install`, which then only links).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
FRESH_DIR=${FRESH_DIR:-/var/tmp/enbd-fresh}
SUITE=bookworm
VARIANTS=no-node,debian-node,thirdparty-node
BUILD_IN=no-node
PROFILES=demo,test
NEXTEST=build
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --variants) VARIANTS=$2; shift 2 ;;
    --profiles) PROFILES=$2; shift 2 ;;
    --nextest) NEXTEST=$2; shift 2 ;;
    --build-in) BUILD_IN=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h | --help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "check: unknown argument $1" >&2; exit 2 ;;
  esac
done
for v in ${VARIANTS//,/ }; do
  case "$v" in no-node | debian-node | thirdparty-node) ;; *) echo "check: unknown variant $v" >&2; exit 2 ;; esac
done
for p in ${PROFILES//,/ }; do
  case "$p" in demo | test) ;; *) echo "check: unknown profile $p" >&2; exit 2 ;; esac
done
case "$NEXTEST" in build | host) ;; *) echo "check: --nextest is build or host" >&2; exit 2 ;; esac

log() { echo "check $(date +%T): $*" >&2; }
die() { log "$*"; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot and bind mounts)"
RUSTUP_HOME=${RUSTUP_HOME:-$HOME/.rustup}
CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
[ -d "$RUSTUP_HOME/toolchains" ] && [ -x "$CARGO_HOME/bin/rustup" ] ||
  die "needs the host's rustup toolchain ($RUSTUP_HOME, $CARGO_HOME/bin/rustup)"
[ "$NEXTEST" = build ] || command -v cargo-nextest >/dev/null || die "--nextest host: no cargo-nextest on the host"

# ---- the host's apt mirror --------------------------------------------------------------
# Prints "URI SUITE..." for each enabled binary source of the host (deb822 and one-line form).
host_sources() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    awk 'BEGIN { RS = ""; FS = "\n" }
      { uri = ""; suites = ""; types = ""; on = 1
        for (i = 1; i <= NF; i++) {
          l = $i
          if (l ~ /^URIs:/)    { sub(/^URIs:[ \t]*/, "", l); uri = l }
          if (l ~ /^Suites:/)  { sub(/^Suites:[ \t]*/, "", l); suites = l }
          if (l ~ /^Types:/)   { types = l }
          if (l ~ /^Enabled:[ \t]*no/) on = 0
        }
        if (on && types ~ /[ \t]deb([ \t]|$)/ && uri != "") { split(uri, u, " "); print u[1], suites }
      }' "$f"
  done
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
    sed -E 's/\[[^]]*\]//' | awk '$1 == "deb" { print $2, $3 }' || true
}
DEBIAN_CODENAMES='bullseye|bookworm|trixie|forky|sid'
MIRROR=${FRESH_MIRROR:-$(host_sources | awk -v re="(^| )($DEBIAN_CODENAMES)( |$)" \
  '{ s = $0; sub(/^[^ ]+ /, "", s); if (s ~ re && !m) m = $1 } END { print m }')}
SECURITY=${FRESH_SECURITY_MIRROR:-$(host_sources | awk -v re="($DEBIAN_CODENAMES)-security" \
  '$0 ~ re && !m { m = $1 } END { print m }')}
[ -n "$MIRROR" ] || die "no Debian mirror in the host's apt sources; set FRESH_MIRROR=<uri>"

# ---- host tools -------------------------------------------------------------------------
need_pkgs=()
command -v debootstrap >/dev/null || need_pkgs+=(debootstrap)
[[ ",$VARIANTS," == *,thirdparty-node,* ]] && ! command -v dpkg-repack >/dev/null && need_pkgs+=(dpkg-repack)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing ${need_pkgs[*]} on the host"
  apt-get -q update >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_pkgs[@]}" >/dev/null
fi

# ---- state and cleanup ------------------------------------------------------------------
mkdir -p "$FRESH_DIR/work" "$FRESH_DIR/cache/nextest-target"
ACTIVE_ROOT=
BG_PGID=
unmount_all() { # every mount below $1, deepest first
  local m
  findmnt -rn -o TARGET | awk -v r="$1/" 'index($0, r) == 1' | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m"
  done
}
drop_root() {
  local root=$1
  unmount_all "$root"
  if findmnt -rn -o TARGET | awk -v r="$root/" 'index($0, r) == 1' | grep -q .; then
    log "mounts left under $root; not deleting it"; return 1
  fi
  [ "$KEEP" = 1 ] || rm -rf --one-file-system "$root"
}
cleanup() {
  if [ -n "$BG_PGID" ]; then kill -TERM -- "-$BG_PGID" 2>/dev/null || true; fi
  if [ -n "$ACTIVE_ROOT" ]; then drop_root "$ACTIVE_ROOT" || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s; }
dur() { printf '%d:%02d' $(($1 / 60)) $(($1 % 60)); }

# ---- the cached rootfs ------------------------------------------------------------------
ROOTFS=$FRESH_DIR/rootfs-$SUITE
DEBOOTSTRAP_SECS=cached
if [ ! -e "$ROOTFS/.enbd-fresh-complete" ]; then
  rm -rf --one-file-system "$ROOTFS" "$ROOTFS.tmp"
  log "debootstrap $SUITE from $MIRROR into $ROOTFS (default variant + ca-certificates)"
  t0=$(now)
  debootstrap --include=ca-certificates "$SUITE" "$ROOTFS.tmp" "$MIRROR" >"$FRESH_DIR/debootstrap.log" 2>&1 ||
    die "debootstrap failed; see $FRESH_DIR/debootstrap.log"
  DEBOOTSTRAP_SECS=$(($(now) - t0))
  {
    echo "deb $MIRROR $SUITE main"
    echo "deb $MIRROR $SUITE-updates main"
    [ -z "$SECURITY" ] || echo "deb $SECURITY $SUITE-security main"
  } >"$ROOTFS.tmp/etc/apt/sources.list"
  # A mirror that serves a frozen snapshot has Release files past Valid-Until: carry over
  # the host's own apt settings for that, and nothing else.
  apt-config dump | grep -E '^Acquire::Check-(Valid-Until|Date) "false";' \
    >"$ROOTFS.tmp/etc/apt/apt.conf.d/99enbd-fresh-host" || true
  rm -rf "$ROOTFS.tmp/var/lib/apt/lists/"* "$ROOTFS.tmp/var/cache/apt/archives/"*.deb
  touch "$ROOTFS.tmp/.enbd-fresh-complete"
  mv "$ROOTFS.tmp" "$ROOTFS"
fi

# ---- the third-party Node.js package ----------------------------------------------------
NODE_DEB=
if [[ ",$VARIANTS," == *,thirdparty-node,* ]]; then
  maint=$(dpkg-query -W -f='${Maintainer}' nodejs 2>/dev/null || true)
  if [ -z "$maint" ] || [[ "${maint,,}" == *debian* ]]; then
    die "variant thirdparty-node needs a non-Debian nodejs package on the host to repack" \
      "(found: ${maint:-none}); choose --variants no-node,debian-node"
  fi
  ver=$(dpkg-query -W -f='${Version}' nodejs)
  NODE_DEB=$(ls "$FRESH_DIR/cache/nodejs_${ver}"_*.deb 2>/dev/null | head -1 || true)
  if [ -z "$NODE_DEB" ]; then
    log "dpkg-repack nodejs ($ver, $maint)"
    # The package's file list as dpkg has it, but the bundled npm as it is on disk now: an
    # `npm install -g npm` upgrade replaces files that dpkg never learns of, and a repack of
    # the list alone leaves an npm that cannot start.
    rm -rf "$FRESH_DIR/cache/repack.tmp"; mkdir "$FRESH_DIR/cache/repack.tmp"
    (cd "$FRESH_DIR/cache/repack.tmp" && dpkg-repack --generate nodejs >../repack.log 2>&1) ||
      die "dpkg-repack nodejs failed; see $FRESH_DIR/cache/repack.log"
    tree=$(echo "$FRESH_DIR/cache/repack.tmp/dpkg-repack.nodejs."*)
    if [ -d /usr/lib/node_modules/npm ]; then
      rm -rf "$tree/usr/lib/node_modules/npm"
      cp -a /usr/lib/node_modules/npm "$tree/usr/lib/node_modules/npm"
      rm -f "$tree/DEBIAN/md5sums"
    fi
    # gzip -1: xz of ~190 MB takes minutes; built aside so a killed run leaves no half .deb.
    dpkg-deb -Zgzip -z1 --build "$tree" "$FRESH_DIR/cache/repack.tmp/nodejs.deb" >>"$FRESH_DIR/cache/repack.log" 2>&1 ||
      die "dpkg-deb --build failed; see $FRESH_DIR/cache/repack.log"
    mv "$FRESH_DIR/cache/repack.tmp/nodejs.deb" "$FRESH_DIR/cache/nodejs_${ver}_$(dpkg --print-architecture).deb"
    rm -rf "$FRESH_DIR/cache/repack.tmp"
    NODE_DEB=$(ls "$FRESH_DIR/cache/nodejs_${ver}"_*.deb | head -1)
  fi
fi

# The host's cargo registry cache, copied once: the chroot's cargo takes its package lock in
# its own ~/.cargo, so sharing the host's registry directory itself would let it unpack crates
# under the feet of the host's cargo.
if [ ! -d "$FRESH_DIR/cache/cargo-registry" ]; then
  rm -rf "$FRESH_DIR/cache/cargo-registry.tmp"
  cp -a "$CARGO_HOME/registry" "$FRESH_DIR/cache/cargo-registry.tmp"
  mv "$FRESH_DIR/cache/cargo-registry.tmp" "$FRESH_DIR/cache/cargo-registry"
fi

# ---- one chroot ---------------------------------------------------------------------------
bind() { # SRC DEST [ro]
  mkdir -p "$2"
  mount --bind "$1" "$2"
  mount --make-private "$2"
  if [ "${3:-}" = ro ]; then mount -o remount,bind,ro "$2"; fi
}
make_root() { # NAME [SOURCE_ROOTFS] -> the new root in $ACTIVE_ROOT, everything mounted
  local root=$FRESH_DIR/work/$1
  [ ! -e "$root" ] || KEEP=0 drop_root "$root"
  cp -a "${2:-$ROOTFS}" "$root"
  ACTIVE_ROOT=$root
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  # The host's network, as resolv.conf: a network that inspects TLS has its CA among the
  # host's local certificates (and NODE_EXTRA_CA_CERTS for a Node.js with its own CA list);
  # without them cargo and npm inside could not reach their registries. A plain network needs
  # neither.
  if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null 2>&1
  fi
  mount -t proc proc "$root/proc"
  mount -t sysfs sysfs "$root/sys"
  bind /dev "$root/dev"
  # A pty instance of its own (apt logs through one); $root/dev is private, so this mount
  # stays inside the chroot.
  mount -t devpts -o newinstance,ptmxmode=0666 devpts "$root/dev/pts"
  # The toolchain as rustup installed it, read-only; the proxies (cargo, rustc, ...) copied,
  # so `cargo install` writes into the chroot's own ~/.cargo/bin.
  bind "$RUSTUP_HOME" "$root/root/.rustup" ro
  mkdir -p "$root/root/.cargo"
  cp -a "$CARGO_HOME/bin" "$root/root/.cargo/bin"
  rm -f "$root/root/.cargo/bin/cargo-nextest"
  if [ "$NEXTEST" = host ]; then cp "$(command -v cargo-nextest)" "$root/root/.cargo/bin/"; fi
  bind "$FRESH_DIR/cache/cargo-registry" "$root/root/.cargo/registry"
  bind "$FRESH_DIR/cache/nextest-target" "$root/var/cache/enbd-nextest-target"
  # The repository as a fresh clone would have it: tracked and new files, nothing ignored
  # (no target/, no e2e/.tools); a tracked file deleted in the work tree is skipped.
  mkdir -p "$root/root/enbd"
  (cd "$REPO" && git ls-files -z -co --exclude-standard |
    tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$root/root/enbd"
}
# Runs bash -c "$2" in root $1 with a clean login-like environment. Extra env as NAME=VALUE
# in CHROOT_ENV.
CHROOT_ENV=()
in_root() {
  chroot "$1" /usr/bin/env -i HOME=/root USER=root LOGNAME=root TERM=dumb LANG=C.UTF-8 \
    PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    CARGO_TERM_COLOR=never CARGO_INCREMENTAL=0 ${NODE_EXTRA_CA_CERTS:+NODE_EXTRA_CA_CERTS=$NODE_EXTRA_CA_CERTS} \
    "${CHROOT_ENV[@]}" /bin/bash -c "$2"
}

RESULTS=()
FAILED=0
record() { # VARIANT PROFILE VERDICT SETUP_SECS DETAIL
  RESULTS+=("$(printf '%-16s %-5s %-4s %6s  %s' "$1" "$2" "$3" "$4" "$5")")
  [ "$3" = PASS ] || FAILED=1
}

# The variant's starting point, cached as its own rootfs (installing Debian's npm alone takes
# minutes): its path goes to VARIANT_SRC. Installs the way a user would, recommends included.
VARIANT_SRC=
variant_rootfs() { # VARIANT
  local v=$1 dest=$FRESH_DIR/rootfs-$SUITE-$1 logf=$FRESH_DIR/work/prep-$1.log cmd
  case "$v" in
    no-node) VARIANT_SRC=$ROOTFS; return 0 ;;
    debian-node) cmd='apt-get install -y -q nodejs npm' ;;
    thirdparty-node) cmd="apt-get install -y -q /tmp/$(basename "$NODE_DEB")" ;;
  esac
  if [ ! -e "$dest/.enbd-fresh-complete" ]; then
    log "$v: preparing the variant's rootfs once (log: $logf)"
    make_root "prep-$v" >"$logf" 2>&1
    [ "$v" != thirdparty-node ] || cp "$NODE_DEB" "$ACTIVE_ROOT/tmp/"
    in_root "$ACTIVE_ROOT" "apt-get update -q && DEBIAN_FRONTEND=noninteractive $cmd && rm -f /tmp/*.deb" \
      >>"$logf" 2>&1 || { drop_root "$ACTIVE_ROOT"; ACTIVE_ROOT=; return 1; }
    unmount_all "$ACTIVE_ROOT"
    # What make_root added (mount points, the repository, the rustup proxies) goes again.
    rm -rf --one-file-system "$ACTIVE_ROOT/root/enbd" "$ACTIVE_ROOT/root/.cargo" \
      "$ACTIVE_ROOT/root/.rustup" "$ACTIVE_ROOT/var/cache/enbd-nextest-target"
    rm -rf --one-file-system "$dest"
    mv "$ACTIVE_ROOT" "$dest"
    ACTIVE_ROOT=
  fi
  VARIANT_SRC=$dest
}
# What each variant's root must show before the setup runs.
variant_check() {
  case "$1" in
    no-node) echo '! command -v node && ! command -v npm' ;;
    debian-node) echo 'npm --version && dpkg-query -W -f="\${Maintainer}\n" nodejs npm | grep -ci debian | grep -qx 2' ;;
    thirdparty-node) echo 'npm --version && ! dpkg-query -W -f="\${Maintainer}" nodejs | grep -qi debian &&
      ! dpkg-query -W -f="\${Status}" npm 2>/dev/null | grep -q "install ok installed"' ;;
  esac
}

# Commands each profile must leave behind, and packages the demo profile must not install.
DEMO_CMDS='cc make'
TEST_CMDS='cc make qemu-system-x86_64 qemu-img qemu-nbd nbdkit nbdinfo nbdcopy fio nbd-server busybox
  cpio xz depmod mkfs.xfs mke2fs clang gpgv curl unzip npm'
DEMO_MUST_NOT='qemu-system-x86 qemu-utils clang libclang-dev busybox-static nbdkit fio nodejs'

run_profile() { # VARIANT PROFILE
  local v=$1 p=$2 root logf t0 secs detail=() ok=1
  logf=$FRESH_DIR/work/$v-$p.log
  : >"$logf"
  log "$v / $p: preparing (log: $logf)"
  if ! variant_rootfs "$v"; then
    record "$v" "$p" FAIL - "preparing the variant failed (see $FRESH_DIR/work/prep-$v.log)"
    return
  fi
  make_root "$v-$p" "$VARIANT_SRC"
  VARIANT_CHECK=$(variant_check "$v")
  root=$ACTIVE_ROOT
  CHROOT_ENV=()
  [ "$p" = test ] && CHROOT_ENV=(CARGO_TARGET_DIR=/var/cache/enbd-nextest-target)
  if ! in_root "$root" "$VARIANT_CHECK" >>"$logf" 2>&1; then
    record "$v" "$p" FAIL - "the root is not what variant $v says (see $logf)"
    drop_root "$root"; ACTIVE_ROOT=; return
  fi
  in_root "$root" '! command -v make && ! command -v cc' >>"$logf" 2>&1 || detail+=("not-fresh(make/cc present)")

  log "$v / $p: e2e/setup-host.sh --$p"
  t0=$(now)
  if in_root "$root" "cd /root/enbd && ./e2e/setup-host.sh --$p" >>"$logf" 2>&1; then
    secs=$(($(now) - t0))
  else
    secs=$(($(now) - t0))
    record "$v" "$p" FAIL "$(dur $secs)" "setup-host.sh --$p failed (see $logf)"
    drop_root "$root"; ACTIVE_ROOT=; return
  fi
  in_root "$root" 'apt-get check -q && test -z "$(dpkg --audit)"' >>"$logf" 2>&1 || { ok=0; detail+=("dpkg-inconsistent"); }

  local want=$DEMO_CMDS
  [ "$p" = test ] && want=$TEST_CMDS
  local c missing=()
  for c in $want; do in_root "$root" "command -v $c" >/dev/null 2>&1 || missing+=("$c"); done
  # Tools that are not plain commands on PATH.
  if [ "$p" = test ]; then
    in_root "$root" 'cd /root/enbd && cargo nextest --version' >>"$logf" 2>&1 || missing+=(cargo-nextest)
    in_root "$root" '/root/enbd/e2e/.tools/helm version --short' >>"$logf" 2>&1 || missing+=(helm)
  fi
  [ ${#missing[@]} -eq 0 ] || { ok=0; detail+=("missing: ${missing[*]}"); }
  if [ "$p" = demo ]; then
    local extra=()
    for c in $DEMO_MUST_NOT; do
      # nodejs is the variant's own in debian-node and thirdparty-node.
      [ "$c" = nodejs ] && [ "$v" != no-node ] && continue
      in_root "$root" "dpkg-query -W -f='\${Status}' $c 2>/dev/null | grep -q 'install ok installed'" && extra+=("$c")
    done
    [ ${#extra[@]} -eq 0 ] || { ok=0; detail+=("demo installed: ${extra[*]}"); }
    # The linker really links: a hello world with the repository's pinned toolchain.
    in_root "$root" 'cd /root/enbd && printf "fn main(){println!(\"linked\");}" >/tmp/h.rs &&
      rustc -o /tmp/h /tmp/h.rs && /tmp/h | grep -qx linked' >>"$logf" 2>&1 || { ok=0; detail+=("rustc-cannot-link"); }
  fi
  # Idempotent: a second run installs nothing.
  if in_root "$root" "cd /root/enbd && ./e2e/setup-host.sh --$p" >"$logf.again" 2>&1; then
    ! grep -q 'installing' "$logf.again" || { ok=0; detail+=("second-run-installed"); }
  else
    ok=0; detail+=("second-run-failed")
  fi
  cat "$logf.again" >>"$logf"; rm -f "$logf.again"

  if [ "$p" = demo ] && [ "$v" = "$BUILD_IN" ] && [ $ok = 1 ]; then
    build_and_start "$root" "$logf" detail || ok=0
  fi
  [ ${#detail[@]} -gt 0 ] || detail+=("ok")
  if [ $ok = 1 ]; then record "$v" "$p" PASS "$(dur $secs)" "${detail[*]}"
  else record "$v" "$p" FAIL "$(dur $secs)" "${detail[*]} (see $logf)"; fi
  drop_root "$root"; ACTIVE_ROOT=
}

# cargo build --release -p enbd-server, then `make demo` in a private network namespace
# (its fixed 127.0.0.1 ports must not meet the host's): PASS once stdout has the readiness
# line. Appends to the caller's detail array (name in $3).
build_and_start() {
  local root=$1 logf=$2 t0 secs out=$FRESH_DIR/work/demo.out
  local -n det=$3
  log "build-in variant: cargo build --release -p enbd-server (cold)"
  t0=$(now)
  if ! in_root "$root" 'cd /root/enbd && cargo build --release -p enbd-server' >>"$logf" 2>&1; then
    det+=("cargo-build-failed"); return 1
  fi
  secs=$(($(now) - t0))
  det+=("build $(dur $secs)")
  BUILD_SECS=$secs
  log "make demo (private netns), waiting for 'enbd-server ready'"
  : >"$out"
  setsid unshare --net bash -c 'ip link set lo up && exec "$@"' _ \
    chroot "$root" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
    PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    CARGO_TERM_COLOR=never /bin/bash -c 'cd /root/enbd && exec make demo' >"$out" 2>>"$logf" &
  BG_PGID=$!
  local line=
  for _ in $(seq 1 600); do
    line=$(grep -m1 '^enbd-server ready ' "$out" || true)
    [ -z "$line" ] || break
    kill -0 "$BG_PGID" 2>/dev/null || break
    sleep 0.5
  done
  kill -TERM -- "-$BG_PGID" 2>/dev/null || true
  wait "$BG_PGID" 2>/dev/null || true
  BG_PGID=
  cat "$out" >>"$logf"; rm -f "$out"
  if [ -z "$line" ]; then det+=("no-readiness-line"); return 1; fi
  det+=("ready: ${line#enbd-server ready }")
}

BUILD_SECS=
for v in ${VARIANTS//,/ }; do
  for p in ${PROFILES//,/ }; do run_profile "$v" "$p"; done
done

echo
echo "fresh-machine check: Debian $SUITE, mirror from the host's apt sources"
printf '%-16s %-5s %-4s %6s  %s\n' variant prof res setup detail
for r in "${RESULTS[@]}"; do echo "$r"; done
echo "debootstrap: $([ "$DEBOOTSTRAP_SECS" = cached ] && echo cached || dur "$DEBOOTSTRAP_SECS")" \
  " demo build (cargo build --release -p enbd-server, cold): ${BUILD_SECS:+$(dur "$BUILD_SECS")}${BUILD_SECS:-not run}"
if [ "$NEXTEST" = host ]; then echo "cargo-nextest: the host's binary, put in place before the setup (--nextest host)"
else echo "cargo-nextest: built by the setup (cold in the first test profile, then from the cached target dir)"; fi
n_pass=$(printf '%s\n' "${RESULTS[@]}" | awk '$3 == "PASS"' | wc -l)
echo "$n_pass passed, $((${#RESULTS[@]} - n_pass)) failed"
exit $FAILED
