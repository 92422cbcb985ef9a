# Scenario: the CSI node plugin, end to end on real ublk devices. enbd-node daemon serves
# CSI on a unix socket; csi-node-conformance drives every Node RPC through it (positive and
# negative, exact gRPC codes) against volumes it creates on enbd-server, and checks the
# mounts, files and device flags that result. The server runs `--access published`: the suite
# grants each volume to the node as ControllerPublishVolume would (with the controller's
# certificate) and stages it with the token; a volume never granted cannot be staged.
. /scenarios/lib/common.sh

CSI_SOCK=/run/enbd-csi/csi.sock
WORK=$PWD/csi

# Unmount whatever the suite left under its work directory (deepest first) before the shared
# cleanup detaches the devices: a device cannot go while a filesystem on it is mounted.
csi_cleanup() {
  for m in $(awk -v w="$WORK" 'index($2, w) == 1 {print $2}' /proc/self/mounts | sort -r); do
    umount "$m" 2>/dev/null || echo "could not unmount $m"
  done
}

ACCESS=published
start_server
# shellcheck disable=SC2086 # NODE_TLS is a list of flags
enbd-node daemon --node-id vm-node --csi-endpoint "unix://$CSI_SOCK" \
  --state-dir "$STATE_DIR" --metrics-listen 127.0.0.1:9812 $NODE_TLS >> daemon.log 2>&1 &
DAEMON_PID=$!
wait_until 30 daemon_ready
wait_until 30 test -S "$CSI_SOCK"
log "enbd-node daemon with CSI up (pid $DAEMON_PID)"

# ublk's UPDATE_SIZE arrived in Linux 6.16: from there the suite expects NodeExpandVolume
# to grow the device and the filesystem online; before it, FAILED_PRECONDITION.
resize_flag=
kver=$(uname -r | awk -F. '{print $1 * 1000 + $2}')
[ "$kver" -ge 6016 ] && resize_flag=--online-resize
rc=0
# shellcheck disable=SC2086 # CONTROLLER_TLS is a list of flags
csi-node-conformance --endpoint "unix://$CSI_SOCK" --mgmt "$MGMT" $CONTROLLER_TLS --grant-access \
  --node-id vm-node --work-dir "$WORK" $resize_flag || rc=$?

left=$(awk -v w="$WORK" 'index($2, w) == 1' /proc/self/mounts)
if [ -n "$left" ]; then
  echo "mounts left behind by the suite:"; echo "$left"
  csi_cleanup
  rc=1
fi
attached=$(enbd-node list | awk 'NR>1' )
if [ -n "$attached" ]; then
  echo "devices left attached by the suite:"; echo "$attached"
  rc=1
fi
if grep -q "do-not-log-me" daemon.log; then
  echo "a secret reached the daemon log"; rc=1
fi
[ $rc -eq 0 ] || fail "csi-node-conformance failed (rc=$rc)"
log "csi node conformance passed"
