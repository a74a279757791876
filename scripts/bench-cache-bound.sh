#!/usr/bin/env bash
# make bench, issue 17's cache bound at full size: `cache_size = 200 MiB` in the default
# per-layer-daemon mode, and every file of two ~550 MB images read through containerd — test/big:1
# converted twice by `lazypull image convert` with different chunk sizes (4 MiB and 1 MiB: other
# layer and chunk digests, so nothing of one is reused by the other). The shared store's
# allocated bytes are sampled every 100 ms while the containers run; each container prints the
# sha256 of every file of its rootfs, compared with the same command on containerd's overlayfs
# (full pull of the original image). Pass: peak ≤ 220 MiB, identical listings, no read error in
# any layer daemon's log.
# Output: the figures on stdout (also .work/bench-cache-bound/result.txt).
# Knobs: CACHE_MIB (200), LIMIT_MIB (220).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
PEER=${PEER:-$root/../shared/peer}
REG=127.0.0.1:5000
SOCK=${CTD_SOCK:-/run/containerd-test/containerd.sock}
RUN=${RUN:-/tmp/peer-run}
CACHE_MIB=${CACHE_MIB:-200}
LIMIT_MIB=${LIMIT_MIB:-220}
work=${BENCH_DIR:-$root/.work/bench-cache-bound}
NS=lpbound
LP_SOCK=/run/containerd-test/lazypull/lazypull.sock
LP_ROOT=$work/snapshotter
mkdir -p "$work"
[ -d "$PEER" ] || { echo "bench-cache-bound: needs the peer scripts (PEER=$PEER)" >&2; exit 1; }
cargo build --release --locked -p lazypull 2>&1 | tail -1
bin=$root/target/release/lazypull
ctr_() { ctr -a "$SOCK" -n "$NS" "$@"; }

cat > "$work/snapshotter.toml" <<TOML
root = "$LP_ROOT"
address = "$LP_SOCK"
cache_size = $((CACHE_MIB << 20))
background_fetch = false
small_layer_prefetch_bytes = 0
TOML
. "$root/scripts/lib/peer-snapshotter.sh"
cleanup() {
  lp_cleanup
  [ -n "${sampler:-}" ] && kill "$sampler" 2>/dev/null || true
}
trap cleanup EXIT

"$PEER/01-registry.sh" start >/dev/null
tags() { curl -fsS "http://$REG/v2/$1/tags/list" 2>/dev/null || true; }
tags test/big | grep -q '"1"' || "$PEER/02-build-images.sh" big
for v in a:4194304 b:1048576; do
  tag=1-bound-${v%%:*}
  tags test/big | grep -q "\"$tag\"" || "$bin" image convert --chunk-size "${v#*:}" "$REG/test/big:1" "$REG/test/big:$tag" >/dev/null
done
lp_start_fresh

LIST='find / -xdev -type f -print0 | sort -z | xargs -0 sha256sum'
# The reference: containerd's own full pull of the original image.
ctr_ image pull --plain-http "$REG/test/big:1" >/dev/null
ctr_ run --rm --snapshotter overlayfs "$REG/test/big:1" lpb-ref /bin/sh -c "$LIST" > "$work/want.txt"
ctr_ image rm --sync "$REG/test/big:1" >/dev/null

# Allocated bytes of the shared store, every 100 ms, while the lazy containers read.
cache=$LP_ROOT/layers/cache
: > "$work/samples.txt"
( set +e +o pipefail; while true; do [ -d "$cache" ] && du -s -B1 "$cache" 2>/dev/null | cut -f1 >> "$work/samples.txt"; sleep 0.1; done ) &
sampler=$!
ok=1
for tag in 1-bound-a 1-bound-b; do
  ref=$REG/test/big:$tag
  "$bin" rpull --address "$SOCK" --namespace "$NS" "$ref" | tail -1
  t0=$(date +%s.%N)
  ctr_ run --rm --snapshotter lazypull "$ref" "lpb-$tag" /bin/sh -c "$LIST" > "$work/got-$tag.txt"
  t1=$(date +%s.%N)
  if cmp -s "$work/want.txt" "$work/got-$tag.txt"; then same=identical; else same=DIFFERENT; ok=0; fi
  echo "$tag: $(wc -l < "$work/got-$tag.txt") files read in $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}') s, sha256 listing $same to overlayfs; store now $(du -s -B1 "$cache" | cut -f1) bytes"
done
kill "$sampler"; sampler=
peak=$(sort -n "$work/samples.txt" | tail -1)
# A reply the kernel no longer waits for (its request was interrupted: ENOENT from /dev/fuse)
# is not a read error; counted apart.
logs=$(cat "$LP_ROOT"/layers/mounts/*/daemon.log)
gone=$(grep -c "Failed to send FUSE reply: No such file or directory" <<<"$logs" || true)
errors=$(grep -i "read failed\| ERROR " <<<"$logs" | grep -vc "Failed to send FUSE reply: No such file or directory" || true)
{
  echo "cache_size = $CACHE_MIB MiB ($((CACHE_MIB << 20)) bytes), layer daemons (default mode)"
  echo "peak store: $peak bytes ($(awk -v p="$peak" -v c="$((CACHE_MIB << 20))" 'BEGIN{printf "%.1f", p*100/c}')% of the bound) over $(wc -l < "$work/samples.txt") samples; limit $LIMIT_MIB MiB"
  echo "error lines in the layer daemons' logs: $errors (besides $gone replies to requests the kernel had dropped)"
} | tee "$work/result.txt"
[ "$peak" -le $((LIMIT_MIB << 20)) ] || { echo "FAIL: the store exceeded $LIMIT_MIB MiB" >&2; ok=0; }
[ "$errors" = 0 ] || { echo "FAIL: layer daemons logged errors" >&2; ok=0; }
[ "$ok" = 1 ]
