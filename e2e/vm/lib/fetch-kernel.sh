#!/usr/bin/env bash
# Fetches a Debian kernel package for the VM suite and unpacks it into a cache directory.
#
# usage: fetch-kernel.sh <suite> <flavour> <cache-dir>    e.g. trixie cloud-amd64 e2e/vm/.cache
# prints, as its last line, the unpacked kernel directory (holding boot/ or usr/lib/modules/).
#
# Trust chain: InRelease is checked with gpgv against the Debian archive keyring, Packages.xz
# against the SHA256 listed in InRelease, and every .deb against the SHA256 listed in Packages.
# The mirror is the one the system's apt sources name: no host is written here.
set -euo pipefail

SUITE=${1:?suite}; FLAVOUR=${2:?flavour}; CACHE=${3:?cache dir}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
log() { echo "fetch-kernel: $*" >&2; }
die() { log "$*"; exit 1; }

# The first Debian archive URI in the apt sources that is not a security mirror.
mirror_uri() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri=$(awk 'BEGIN{RS="";FS="\n"} {u="";s="";for(i=1;i<=NF;i++){if($i~/^URIs:/){split($i,a," ");u=a[2]} if($i~/^Suites:/)s=$i} if(u!="" && s!~/-security/ && u!~/security/){print u; exit}}' "$f")
    [ -n "$uri" ] && { echo "${uri%/}"; return; }
  done
  if [ -f /etc/apt/sources.list ]; then
    uri=$(awk '$1=="deb" && $0!~/security/ {for(i=2;i<=NF;i++) if($i ~ /^[a-z]+:\/\//){print $i; exit}}' /etc/apt/sources.list)
    [ -n "$uri" ] && { echo "${uri%/}"; return; }
  fi
  die "no Debian mirror found in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list"
}

mkdir -p "$CACHE"; CACHE=$(cd "$CACHE" && pwd)
DIR="$CACHE/$SUITE"
mkdir -p "$DIR/debs"
MIRROR=$(mirror_uri)
log "mirror $MIRROR, suite $SUITE, flavour $FLAVOUR"

# InRelease: always refreshed (small); a failed download falls back to a previously verified
# kernel so an offline re-run still works.
if ! curl -fsS --retry 3 -o "$DIR/InRelease.new" "$MIRROR/dists/$SUITE/InRelease"; then
  if [ -f "$DIR/kernel.dir" ]; then
    log "InRelease download failed; using the cached, previously verified kernel"
    cat "$DIR/kernel.dir"; exit 0
  fi
  die "cannot download $MIRROR/dists/$SUITE/InRelease"
fi
gpgv --keyring "$KEYRING" "$DIR/InRelease.new" 2>/dev/null || die "InRelease signature check FAILED"
mv "$DIR/InRelease.new" "$DIR/InRelease"
log "InRelease signature OK"

want=$(awk '/^SHA256:/{h=1;next} /^[^ ]/{h=0} h && $3=="main/binary-amd64/Packages.xz"{print $1; exit}' "$DIR/InRelease")
[ -n "$want" ] || die "InRelease lists no main/binary-amd64/Packages.xz"
if ! echo "$want  $DIR/Packages.xz" | sha256sum -c --quiet >/dev/null 2>&1; then
  curl -fsS --retry 3 -o "$DIR/Packages.xz" "$MIRROR/dists/$SUITE/main/binary-amd64/Packages.xz" \
    || die "cannot download Packages.xz"
  echo "$want  $DIR/Packages.xz" | sha256sum -c --quiet || die "Packages.xz sha256 mismatch"
  xz -dc "$DIR/Packages.xz" > "$DIR/Packages"
fi
[ -s "$DIR/Packages" ] || xz -dc "$DIR/Packages.xz" > "$DIR/Packages"
log "Packages.xz sha256 OK"

# Newest package whose name matches the regex: "name version filename sha256".
newest() {
  awk -v re="$1" 'BEGIN{RS="";FS="\n"}
    { p=v=f=s=""
      for(i=1;i<=NF;i++){
        if($i~/^Package: /){p=substr($i,10)} else if($i~/^Version: /){v=substr($i,10)}
        else if($i~/^Filename: /){f=substr($i,11)} else if($i~/^SHA256: /){s=substr($i,9)} }
      if(p ~ re) print p, v, f, s }' "$DIR/Packages" | sort -V -k1,1 -k2,2 | tail -1
}

# Downloads (or reuses) one .deb, checks its sha256 and unpacks it into $KDIR.
fetch_deb() {
  local name version file sha deb
  read -r name version file sha <<<"$1"
  [ -n "$file" ] || die "package not found"
  deb="$DIR/debs/${file##*/}"
  if ! echo "$sha  $deb" | sha256sum -c --quiet >/dev/null 2>&1; then
    log "downloading $name $version"
    curl -fsS --retry 3 -o "$deb" "$MIRROR/$file" || die "cannot download $file"
    echo "$sha  $deb" | sha256sum -c --quiet || die "$file sha256 mismatch"
  fi
  log "$name $version sha256 OK"
  dpkg-deb -x "$deb" "$KDIR"
  echo "$name $version" >> "$KDIR/packages"
}

# Newer suites split the kernel into linux-binary/-modules/-base; trixie ships one linux-image.
split_re="^linux-binary-[0-9.]+[+]deb[0-9]+-${FLAVOUR}\$"
if grep -qE "^Package: linux-binary-[0-9.]+[+]deb[0-9]+-${FLAVOUR}\$" "$DIR/Packages"; then
  main=$(newest "$split_re")
else
  main=$(newest "^linux-image-[0-9.]+[+]deb[0-9]+-${FLAVOUR}\$")
fi
[ -n "$main" ] || die "no kernel package for flavour $FLAVOUR in $SUITE"
read -r main_name main_version _ <<<"$main"
KDIR="$DIR/kernel-${main_name}-${main_version}"
if [ ! -f "$KDIR/.complete" ]; then
  rm -rf "$KDIR"; mkdir -p "$KDIR"
  fetch_deb "$main"
  if [[ $main_name == linux-binary-* ]]; then
    abi=${main_name#linux-binary-}
    # linux-modules holds the .ko files; linux-base holds modules.builtin/.order for depmod.
    fetch_deb "$(newest "^linux-modules-${abi//+/[+]}\$")"
    fetch_deb "$(newest "^linux-base-${abi//+/[+]}\$")"
  fi
  kver=$(ls "$KDIR/usr/lib/modules")
  # The .deb ships no modules.dep: build it so modprobe can list dependencies.
  depmod -b "$KDIR/usr" "$kver" 2>&1 | grep -v WARNING >&2 || true
  touch "$KDIR/.complete"
fi
echo "$KDIR" > "$DIR/kernel.dir"
echo "$KDIR"
