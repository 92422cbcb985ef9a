# Scenario: the upstream CSI conformance suite, csi-sanity (kubernetes-csi/csi-test, built by
# e2e/csi-sanity/build.sh), against both of our CSI plugins at once: csi-driver as the
# controller (static discovery of the enbd-server in the guest) and enbd-node daemon as the node
# plugin (real ublk devices, ext4 on them). Every spec must pass or be skipped; a skip is either
# csi-sanity's own (a capability we do not advertise, printed with its reason) or one listed in
# SKIPS below, each with the reason it does not apply.
. /scenarios/lib/common.sh

CTL_SOCK=/run/enbd-csi/controller.sock
NODE_SOCK=/run/enbd-csi/node.sock
CTL_PID=""
# 64 MiB volumes: big enough for ext4, small enough for the emulated CPU (csi-sanity's default
# is 10 GiB). Expansion grows them to 96 MiB.
VOLUME_SIZE=$((64 << 20))
EXPAND_SIZE=$((96 << 20))

# Specs that do not apply, one per line: "<regular expression on the spec text> | <reason>".
# (csi-sanity's own capability skips need no entry: it prints their reasons itself.)
SKIPS=$(cat <<'EOF'
EOF
)
# ublk's UPDATE_SIZE (online resize of a live device) arrived in Linux 6.16: before it,
# NodeExpandVolume is FAILED_PRECONDITION by design (see the README), so the spec that grows a
# published volume cannot pass; from 6.16 on it must.
kver=$(uname -r | awk -F. '{print $1 * 1000 + $2}')
if [ "$kver" -lt 6016 ]; then
  SKIPS="$SKIPS
NodeExpandVolume should work if node-expand is called after node-publish | this kernel's ublk driver has no UPDATE_SIZE (Linux < 6.16): NodeExpandVolume is FAILED_PRECONDITION by design"
fi

sanity_cleanup() {
  # Whatever a failed spec left mounted under this scenario's directory goes first (deepest
  # first), so that the shared cleanup can detach the devices.
  for m in $(awk -v w="$PWD/" 'index($2, w) == 1 {print $2}' /proc/self/mounts | sort -r); do
    umount "$m" 2>/dev/null || echo "could not unmount $m"
  done
  [ -n "$CTL_PID" ] && { kill "$CTL_PID" 2>/dev/null; wait "$CTL_PID" 2>/dev/null; }
  CTL_PID=""
}
# The shared cleanup reads the scenario's status from $?: hand it on past sanity_cleanup.
trap 'st=$?; sanity_cleanup; (exit $st); cleanup' EXIT

controller_sees_server() {
  wget -q -O - http://127.0.0.1:9811/metrics | grep -q 'enbd_csi_controller_server_up{server="vm"} 1'
}

start_server
# --nodes: the one node that exists here (a publish to any other is NOT_FOUND).
csi-driver --endpoint "unix://$CTL_SOCK" --discovery static --servers vm=http://127.0.0.1:10810 \
  --nodes vm-node --metrics-listen 127.0.0.1:9811 >> controller.log 2>&1 &
CTL_PID=$!
# The controller grants access at every publish and hands the node a token; this server
# speaks plain text, so the node must be allowed to send it so (the chart does the same
# when TLS is off).
enbd-node daemon --node-id vm-node --csi-endpoint "unix://$NODE_SOCK" \
  --state-dir "$STATE_DIR" --metrics-listen 127.0.0.1:9812 --access-token-plaintext \
  >> daemon.log 2>&1 &
DAEMON_PID=$!
wait_until 30 test -S "$CTL_SOCK"
wait_until 30 controller_sees_server
wait_until 30 daemon_ready
wait_until 30 test -S "$NODE_SOCK"
log "csi-driver (pid $CTL_PID) and enbd-node daemon (pid $DAEMON_PID) up"

# StorageClass parameters of the volumes csi-sanity creates (each one checked by csi-driver).
# Two channels per volume instead of four: fewer connections for the emulated CPU to serve.
printf 'fsType: ext4\nchannels: "2"\n' > params.yaml

set -- --csi.endpoint "unix://$NODE_SOCK" --csi.controllerendpoint "unix://$CTL_SOCK" \
  --csi.stagingdir "$PWD/staging" --csi.mountdir "$PWD/mount" \
  --csi.testvolumeparameters params.yaml \
  --csi.testvolumesize "$VOLUME_SIZE" --csi.testvolumeexpandsize "$EXPAND_SIZE" \
  --ginkgo.no-color --ginkgo.junit-report "$PWD/junit.xml"
printf '%s\n' "$SKIPS" | grep -v '^ *$' > skips.txt || true
while IFS= read -r line; do
  set -- "$@" --ginkgo.skip "$(echo "${line%%|*}" | sed 's/ *$//')"
done < skips.txt

start=$(now)
rc=0
csi-sanity "$@" > sanity.log 2>&1 || rc=$?
log "csi-sanity exited $rc after $(elapsed "$start")s"

# One line per spec that did not pass, from the JUnit report: FAILED with the first line of
# its message, SKIPPED with csi-sanity's reason or the reason from SKIPS.
awk '
  function unxml(s) {
    gsub(/&lt;/, "<", s); gsub(/&gt;/, ">", s); gsub(/&#34;/, "\"", s); gsub(/&#39;/, "\047", s)
    gsub(/&amp;/, "\\&", s); gsub(/^[ \t]+|[ \t]+$/, "", s); return s
  }
  function attr(key,   v) { match($0, key "=\"[^\"]*\""); v = substr($0, RSTART + length(key) + 2, RLENGTH - length(key) - 3); return v }
  # A failure message is several lines (&#xA;): its first, plus the first later line that
  # says something (gomega prints an error as "<*type | 0x...>:", its text, then a dump).
  function brief(m,   n, p, i, out, line) {
    n = split(m, p, "&#xA;"); out = unxml(p[1])
    for (i = 2; i <= n; i++) {
      line = unxml(p[i])
      if (line != "" && (line !~ /^[<{]/ || line ~ /^<nil>/)) { out = out " " line; break }
    }
    return substr(out, 1, 300)
  }
  /<testcase / { name = unxml(attr("name")); sub(/^\[It\] /, "", name) }
  /<failure / { print "FAILED  " name ": " brief(attr("message")) }
  /<skipped message="skipped - / { m = attr("message"); sub(/^skipped - /, "", m); print "SKIPPED " name " (csi-sanity: " unxml(m) ")" }
  /<skipped message="skipped">/ { print "SKIPPED " name }
' junit.xml > outcome.txt || true
while IFS= read -r line; do
  case "$line" in
    "SKIPPED "*"(csi-sanity: "*|FAILED*) echo "$line" ;;
    "SKIPPED "*)
      # A skip from SKIPS: name the reason that matched.
      reason=$(while IFS= read -r s; do
        if echo "$line" | grep -qE "$(echo "${s%%|*}" | sed 's/ *$//')"; then echo "${s#*| }"; fi
        done < skips.txt)
      echo "$line (not applicable: ${reason:-?})" ;;
  esac
done < outcome.txt

# Ginkgo's own summary: "Ran N of M Specs ..." and "SUCCESS!|FAIL! -- P Passed | F Failed | ...".
summary=$(grep -E '^(Ran [0-9]+ of [0-9]+ Specs|SUCCESS!|FAIL!)' sanity.log || true)
echo "$summary"
if [ $rc -ne 0 ] || ! echo "$summary" | grep -q 'SUCCESS!'; then
  echo "---- csi-sanity failures in full (first lines of each)"
  awk '/<testcase / { match($0, /name="[^"]*"/); name = substr($0, RSTART + 6, RLENGTH - 7) }
    /<failure / { match($0, /message="[^"]*"/); m = substr($0, RSTART + 9, RLENGTH - 10)
      gsub(/&lt;/, "<", m); gsub(/&gt;/, ">", m); gsub(/&#34;/, "\"", m); gsub(/&amp;/, "\\&", m)
      n = split(m, p, "&#xA;"); print "== " name; for (i = 1; i <= n && i <= 14; i++) print "   " p[i] }' junit.xml || true
  grep -E ' 0 Passed' sanity.log >/dev/null && tail -n 40 sanity.log
  echo "---- controller.log (tail)"; tail -n 20 controller.log
  fail "csi-sanity: $(grep -c '^FAILED' outcome.txt) specs failed (rc=$rc)"
fi
passed=$(echo "$summary" | sed -nE 's/.* ([0-9]+) Passed.*/\1/p')
[ "${passed:-0}" -gt 0 ] || fail "csi-sanity passed no spec"
log "csi-sanity: every applicable spec passed"
