#!/usr/bin/env bash
# make bench, issue 17's dedup across layer daemons at full size: after every file of
# test/big:1-lazypull was read through containerd (default per-layer-daemon mode, one node
# store), the same image converted again at another compression level (`--level 1`: the same
# chunks and chunk digests, every layer blob and digest different) reads its big files
# (/data1, /data2: 500 MiB) fetching ≤ 5% of their bytes from the registry — the chunks are
# found in the store that other daemons filled. Registry bytes come from its access log.
# Output: the figures on stdout (also .work/bench-dedup/result.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
PEER=${PEER:-$root/../shared/peer}
REG=127.0.0.1:5000
SOCK=${CTD_SOCK:-/run/containerd-test/containerd.sock}
RUN=${RUN:-/tmp/peer-run}
RLOG=$RUN/registry.log
work=${BENCH_DIR:-$root/.work/bench-dedup}
NS=lpdedup
LP_SOCK=/run/containerd-test/lazypull/lazypull.sock
LP_ROOT=$work/snapshotter
mkdir -p "$work"
[ -d "$PEER" ] || { echo "bench-dedup: needs the peer scripts (PEER=$PEER)" >&2; exit 1; }
cargo build --release --locked -p lazypull 2>&1 | tail -1
bin=$root/target/release/lazypull
ctr_() { ctr -a "$SOCK" -n "$NS" "$@"; }
cat > "$work/snapshotter.toml" <<TOML
root = "$LP_ROOT"
address = "$LP_SOCK"
background_fetch = false
TOML
. "$root/scripts/lib/peer-snapshotter.sh"
trap lp_cleanup EXIT

"$PEER/01-registry.sh" start >/dev/null
tags() { curl -fsS "http://$REG/v2/$1/tags/list" 2>/dev/null || true; }
tags test/big | grep -q '"1"' || "$PEER/02-build-images.sh" big
tags test/big | grep -q '"1-lazypull"' || "$bin" image convert "$REG/test/big:1" "$REG/test/big:1-lazypull" >/dev/null
tags test/big | grep -q '"1-lazypull-l1"' || "$bin" image convert --level 1 "$REG/test/big:1" "$REG/test/big:1-lazypull-l1" >/dev/null
layers() { curl -fsS -H "Accept: application/vnd.oci.image.manifest.v1+json" "http://$REG/v2/test/big/manifests/$1" | jq -r '.layers[] | "\(.digest) \(.size)"'; }
layers 1-lazypull > "$work/layers-a.txt"; layers 1-lazypull-l1 > "$work/layers-b.txt"
if [ -n "$(comm -12 <(cut -d' ' -f1 "$work/layers-a.txt" | sort) <(cut -d' ' -f1 "$work/layers-b.txt" | sort))" ]; then
  echo "bench-dedup: the two conversions share a layer digest; nothing to show" >&2; exit 1
fi
lp_start_fresh

mark() { wc -l < "$RLOG" 2>/dev/null || echo 0; }
# Bytes of GETs of the given blobs since line $1 of the access log.
blob_bytes_since() { # mark layers-file
  tail -n +"$(( $1 + 1 ))" "$RLOG" | awk -v list="$(cut -d' ' -f1 "$2" | tr '\n' ' ')" '
    BEGIN { n = split(list, d, " "); for (i = 1; i <= n; i++) want[d[i]] = 1 }
    $6 ~ /GET/ && $9 ~ /^2/ { for (k in want) if (index($7, k)) b += $10 } END { printf "%d", b }'
}
READ='cat /data1/* /data2/* > /dev/null'
"$bin" rpull --address "$SOCK" --namespace "$NS" "$REG/test/big:1-lazypull" | tail -1
m0=$(mark)
ctr_ run --rm --snapshotter lazypull "$REG/test/big:1-lazypull" lpd-a /bin/sh -c "$READ"
sleep 0.5
a=$(blob_bytes_since "$m0" "$work/layers-a.txt")
"$bin" rpull --address "$SOCK" --namespace "$NS" "$REG/test/big:1-lazypull-l1" | tail -1
m1=$(mark)
ctr_ run --rm --snapshotter lazypull "$REG/test/big:1-lazypull-l1" lpd-b /bin/sh -c "$READ"
sleep 0.5
b=$(blob_bytes_since "$m1" "$work/layers-b.txt")
data=$(( 500 << 20 ))
{
  echo "test/big:1-lazypull: read /data1 and /data2 ($data bytes), $a bytes of its blobs fetched"
  echo "test/big:1-lazypull-l1 (same files, other layer digests) afterwards: $b bytes of its blobs fetched ($(awk -v b="$b" -v d="$data" 'BEGIN{printf "%.2f", b*100/d}')% of the files' bytes)"
} | tee "$work/result.txt"
[ "$b" -le $(( data / 20 )) ] || { echo "FAIL: more than 5% fetched again" >&2; exit 1; }
