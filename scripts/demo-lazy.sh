#!/usr/bin/env bash
# make demo, part 2: a container started after a full pull and lazily.
# Starts a local registry (Debian's docker-registry), `lazypull snapshotter` and a private
# containerd that uses it as a proxy plugin; builds a sample image (static busybox + DATA under
# /data), converts and pushes it with `lazypull image convert`, then starts a container once
# after `ctr image pull` (overlayfs) and once after `lazypull rpull` (pull through containerd
# with the remote-snapshot labels), and prints both times and the bytes fetched. Stops everything it started on exit.
#
#   scripts/demo-lazy.sh BIN DATA_DIR WORK_DIR
set -euo pipefail
bin=$(readlink -f "$1")
data=$(readlink -f "$2")
mkdir -p "$3"
work=$(readlink -f "$3")
run=/run/lazypull-demo
ref=""
pids=()

cleanup() {
  set +e
  if [ -n "$ref" ] && [ -S "$run/c.sock" ]; then
    ctr -a "$run/c.sock" -n demo-full image rm --sync "$ref" >/dev/null 2>&1
    ctr -a "$run/c.sock" -n demo-lazy image rm --sync "$ref" >/dev/null 2>&1
  fi
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  sleep 1
  # Anything still mounted below our directories (layer mounts, container rootfs).
  awk '{print $5}' /proc/self/mountinfo | grep -E "^($work|$run)/" | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
  rm -rf "$run"
}
trap cleanup EXIT
rm -rf "$run" "$work/registry" "$work/snapshotter" "$work/containerd"
mkdir -p "$run"

. "$(dirname "$0")/lib/wait.sh"

# --- registry ------------------------------------------------------------------------------------
printf 'version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:0\nlog:\n  level: error\n' \
  "$work/registry" > "$work/registry.yml"
docker-registry serve "$work/registry.yml" > "$work/registry.log" 2>&1 &
pids+=($!)
registry_pid=$!
wait_for "the registry to listen" listen_port "$registry_pid"
port=$(listen_port "$registry_pid")
wait_for "the registry to answer GET /v2/" curl -fs "http://127.0.0.1:$port/v2/"
ref="127.0.0.1:$port/demo/sample:esgz"

# --- the sample image ---------------------------------------------------------------------------
img="$work/image"
rm -rf "$img" && mkdir -p "$img/l1/bin" "$img/layout/blobs/sha256"
cp /bin/busybox "$img/l1/bin/busybox"
for a in sh echo cat ls wc sha256sum; do ln -sf busybox "$img/l1/bin/$a"; done
mkdir -p "$img/l1/etc" "$img/l1/proc" "$img/l1/sys" "$img/l1/dev" "$img/l1/tmp"
echo "hello from the lazypull demo" > "$img/l1/etc/hello.txt"
tar -C "$img/l1" -cf "$img/l1.tar" .
mkdir -p "$img/l2/data" && cp -a "$data/." "$img/l2/data/"
tar -C "$img/l2" -cf "$img/l2.tar" .
put() { local d; d=$(sha256sum "$1" | cut -d' ' -f1); cp "$1" "$img/layout/blobs/sha256/$d"; echo "$d"; }
layers=()
diffs=()
for t in l1 l2; do
  diffs+=("sha256:$(sha256sum "$img/$t.tar" | cut -d' ' -f1)")
  gzip -1 -c "$img/$t.tar" > "$img/$t.tar.gz"
  layers+=("$(put "$img/$t.tar.gz")")
done
jq -n --arg a "$(dpkg --print-architecture)" --arg d1 "${diffs[0]}" --arg d2 "${diffs[1]}" \
  '{architecture:$a, os:"linux", config:{Cmd:["/bin/sh"]}, rootfs:{type:"layers", diff_ids:[$d1,$d2]}}' > "$img/config.json"
cfg=$(put "$img/config.json")
jq -n --arg c "$cfg" --argjson cs "$(stat -c %s "$img/config.json")" \
  --arg l1 "${layers[0]}" --argjson s1 "$(stat -c %s "$img/l1.tar.gz")" \
  --arg l2 "${layers[1]}" --argjson s2 "$(stat -c %s "$img/l2.tar.gz")" \
  '{schemaVersion:2, mediaType:"application/vnd.oci.image.manifest.v1+json",
    config:{mediaType:"application/vnd.oci.image.config.v1+json", digest:("sha256:"+$c), size:$cs},
    layers:[{mediaType:"application/vnd.oci.image.layer.v1.tar+gzip", digest:("sha256:"+$l1), size:$s1},
            {mediaType:"application/vnd.oci.image.layer.v1.tar+gzip", digest:("sha256:"+$l2), size:$s2}]}' > "$img/manifest.json"
man=$(put "$img/manifest.json")
jq -n --arg m "$man" --argjson ms "$(stat -c %s "$img/manifest.json")" \
  '{schemaVersion:2, manifests:[{mediaType:"application/vnd.oci.image.manifest.v1+json", digest:("sha256:"+$m), size:$ms,
    annotations:{"org.opencontainers.image.ref.name":"v1"}}]}' > "$img/layout/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' > "$img/layout/oci-layout"
echo "  converting the sample image ($(( $(stat -c %s "$img/l2.tar") / 1000000 )) MB of data) and pushing it to $ref"
"$bin" image convert "oci:$img/layout:v1" "$ref" > "$work/image-convert.log" 2>&1
# The pods' sandbox ("pause") image: the busybox layer, sleeping.
mkdir -p "$img/pause/blobs/sha256"
jq -n --arg a "$(dpkg --print-architecture)" --arg d1 "${diffs[0]}" \
  '{architecture:$a, os:"linux", config:{Cmd:["/bin/busybox","sleep","2147483647"]}, rootfs:{type:"layers", diff_ids:[$d1]}}' > "$img/pause-config.json"
pcfg=$(put "$img/pause-config.json")
jq -n --arg c "$pcfg" --argjson cs "$(stat -c %s "$img/pause-config.json")" --arg l1 "${layers[0]}" --argjson s1 "$(stat -c %s "$img/l1.tar.gz")" \
  '{schemaVersion:2, mediaType:"application/vnd.oci.image.manifest.v1+json",
    config:{mediaType:"application/vnd.oci.image.config.v1+json", digest:("sha256:"+$c), size:$cs},
    layers:[{mediaType:"application/vnd.oci.image.layer.v1.tar+gzip", digest:("sha256:"+$l1), size:$s1}]}' > "$img/pause-manifest.json"
pman=$(put "$img/pause-manifest.json")
cp -a "$img/layout/blobs" "$img/layout/oci-layout" "$img/pause/"
jq -n --arg m "$pman" --argjson ms "$(stat -c %s "$img/pause-manifest.json")" \
  '{schemaVersion:2, manifests:[{mediaType:"application/vnd.oci.image.manifest.v1+json", digest:("sha256:"+$m), size:$ms,
    annotations:{"org.opencontainers.image.ref.name":"v1"}}]}' > "$img/pause/index.json"
pause_ref="127.0.0.1:$port/demo/pause:1"
"$bin" image convert "oci:$img/pause:v1" "$pause_ref" > "$work/pause-convert.log" 2>&1
image_bytes=$(curl -fs -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
  "http://127.0.0.1:$port/v2/demo/sample/manifests/esgz" | jq '[.layers[].size] | add')

# --- lazypull snapshotter and containerd ---------------------------------------------------------
printf 'background_delay_secs = 30.0\nmetrics_address = "127.0.0.1:0"\n' > "$work/snapshotter.toml"
LAZYPULL_LOG=info "$bin" snapshotter --config "$work/snapshotter.toml" --root "$work/snapshotter" \
  --address "$run/lp.sock" > "$work/snapshotter.log" 2>&1 &
pids+=($!)
snap_pid=$!
wait_for "the snapshotter's metrics endpoint" listen_port "$snap_pid"
mport=$(listen_port "$snap_pid")
{
  echo 'version = 2'
  echo "root = \"$work/containerd\""
  echo "state = \"$run/state\""
  echo 'disabled_plugins = ["io.containerd.grpc.v1.cri"]'
  echo '[grpc]'
  echo "  address = \"$run/c.sock\""
  echo '[ttrpc]'
  echo "  address = \"$run/c.sock.ttrpc\""
  echo '[plugins."io.containerd.metadata.v1.bolt"]'
  echo '  content_sharing_policy = "isolated"'
  echo '[proxy_plugins.lazypull]'
  echo '  type = "snapshot"'
  echo "  address = \"$run/lp.sock\""
} > "$work/containerd.toml"
containerd --config "$work/containerd.toml" > "$work/containerd.log" 2>&1 &
pids+=($!)
c() { ctr -a "$run/c.sock" "$@"; }
wait_for "containerd to answer" c version
# Ready means: a call through containerd reaches the snapshotter.
wait_for "the lazypull snapshotter to answer through containerd" c snapshot --snapshotter lazypull ls

# --- the two starts ------------------------------------------------------------------------------
sync; echo 3 > /proc/sys/vm/drop_caches
echo "== full pull (containerd overlayfs): pull, then run"
t0=$(date +%s%N); c -n demo-full image pull --plain-http "$ref" > /dev/null; full_pull=$(ms_since "$t0")
t0=$(date +%s%N); out=$(c -n demo-full run --rm "$ref" demo-full /bin/cat /etc/hello.txt); full_run=$(ms_since "$t0")
echo "  container says: $out"

sync; echo 3 > /proc/sys/vm/drop_caches
echo "== lazy pull (lazypull snapshotter): rpull, then run"
t0=$(date +%s%N)
"$bin" rpull --address "$run/c.sock" --namespace demo-lazy --snapshotter lazypull "$ref" > /dev/null
lazy_pull=$(ms_since "$t0")
t0=$(date +%s%N); out=$(c -n demo-lazy run --rm --snapshotter lazypull "$ref" demo-lazy /bin/cat /etc/hello.txt); lazy_run=$(ms_since "$t0")
echo "  container says: $out"
# Layer daemons rewrite their status (which /metrics reads) every 250 ms: wait until two
# readings half a second apart agree.
fetched() { curl -fs "http://127.0.0.1:$mport/metrics" | awk '/^lazypull_fetched_bytes_total/ {s += $2} END {printf "%d", s}'; }
lazy_bytes=$(fetched)
for _ in $(seq 1 20); do
  sleep 0.5
  now=$(fetched)
  if [ "$now" -gt 0 ] && [ "$now" = "$lazy_bytes" ]; then break; fi
  lazy_bytes=$now
done

mb() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1e6}'; }
echo
echo "== starting a container from a $(mb "$image_bytes") MB image"
printf '  %-30s %9s %9s %10s %12s\n' mode "pull ms" "run ms" "total ms" "MB fetched"
printf '  %-30s %9s %9s %10s %12s\n' "full pull (overlayfs)" "$full_pull" "$full_run" "$((full_pull + full_run))" "$(mb "$image_bytes")"
printf '  %-30s %9s %9s %10s %12s\n' "lazypull (eStargz, lazy)" "$lazy_pull" "$lazy_run" "$((lazy_pull + lazy_run))" "$(mb "$lazy_bytes")"

echo
"$(dirname "$0")/demo-pods.sh" "$bin" "$ref" "$pause_ref" "$work/pods"
