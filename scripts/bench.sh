#!/usr/bin/env bash
# make bench: eStargz conversion throughput and size against the reference converter
# (`ctr-remote image convert --estargz --oci`, Debian's stargz-snapshotter 0.12.0) and against
# `gzip -9` / `pigz -9` of the same layer tars; then random 4 KiB reads from a local blob.
# Results (with the command and machine) go to docs/benchmarks.md.
#
# The ~550 MB test image (Debian minbase + 2 x 10 x 25 MiB random + 1000 small files) and the
# registry/containerd the reference converter needs come from ../shared/peer (PEER=...).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
PEER=${PEER:-$root/../shared/peer}
REG=${REG:-127.0.0.1:5000}
SOCK=${CTD_SOCK:-/run/containerd-test/containerd.sock}
IMG_WORK=${IMG_WORK:-/tmp/peer-img}
work=${BENCH_DIR:-$root/.work/bench}
out_md=${BENCH_OUT:-$root/docs/benchmarks.md}
mkdir -p "$work"

[ -d "$PEER" ] || { echo "bench: needs the peer scripts (PEER=$PEER) for the reference converter and test image" >&2; exit 1; }
"$PEER/01-registry.sh" start >/dev/null
[ -f "$IMG_WORK/oci-big/index.json" ] || "$PEER/02-build-images.sh" big
"$PEER/04-containerd.sh" start >/dev/null

cargo build --release --locked -p lazypull 2>&1 | tail -1
cargo build --release --locked -p lazypull-estargz --example random_reads 2>&1 | tail -1
bin=$root/target/release/lazypull

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", b-a}'; }

# --- the image's layers (gzip blobs, as pushed) ---------------------------------------------
layout=$IMG_WORK/oci-big
mdigest=$(jq -r '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"]=="1") | .digest' "$layout/index.json")
mapfile -t layers < <(jq -r '.layers[].digest' "$layout/blobs/sha256/${mdigest#sha256:}")
echo "== image test/big:1: ${#layers[@]} layers"
tars=()
uncompressed=0
for d in "${layers[@]}"; do
  t=$work/${d#sha256:}.tar
  [ -f "$t" ] || gzip -dc "$layout/blobs/sha256/${d#sha256:}" > "$t"
  tars+=("$t")
  uncompressed=$((uncompressed + $(stat -c %s "$t")))
done
mb() { awk -v b="$1" 'BEGIN{printf "%.1f", b/1e6}'; }
echo "   uncompressed: $(mb $uncompressed) MB"

# --- lazypull ----------------------------------------------------------------------------
echo "== lazypull layer convert (level 9, 4 MiB chunks, 2 threads)"
lp_size=0
t0=$(now)
for d in "${layers[@]}"; do
  "$bin" layer convert --json "$layout/blobs/sha256/${d#sha256:}" "$work/${d#sha256:}.esgz" > "$work/${d#sha256:}.json"
  lp_size=$((lp_size + $(jq .blobSize "$work/${d#sha256:}.json")))
done
t1=$(now)
lp_secs=$(elapsed "$t0" "$t1")
echo "   ${lp_secs}s, $(mb $lp_size) MB"
# Every blob verifies and thread count does not change bytes.
for d in "${layers[@]}"; do "$bin" layer verify "$work/${d#sha256:}.esgz" >/dev/null; done
d0=${layers[0]}
"$bin" layer convert --threads 1 "$layout/blobs/sha256/${d0#sha256:}" "$work/t1.esgz" >/dev/null
cmp -s "$work/t1.esgz" "$work/${d0#sha256:}.esgz" && same_bytes=yes || same_bytes=NO

# --- ctr-remote (reference) ------------------------------------------------------------------
echo "== ctr-remote image convert --estargz --oci"
ns=lazypull-bench
# Fresh repositories each run, so no push finds blobs a previous run left.
stamp=$(date +%s)
ref_dst="$REG/test/bench-ref-$stamp:esgz"
lp_dst="$REG/test/bench-lp-$stamp:esgz"
c() { ctr-remote -a "$SOCK" -n "$ns" "$@"; }
c image pull --plain-http "$REG/test/big:1" >/dev/null
t0=$(now)
c image convert --oci --estargz "$REG/test/big:1" "$ref_dst" >/dev/null
t1=$(now)
ref_secs=$(elapsed "$t0" "$t1")
t2=$(now)
c image push --plain-http "$ref_dst" >/dev/null
t3=$(now)
ref_push_secs=$(elapsed "$t2" "$t3")
ref_total=$(awk -v a="$ref_secs" -v b="$ref_push_secs" 'BEGIN{printf "%.2f", a+b}')
ref_size=$(curl -fsS -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
  "http://$REG/v2/test/bench-ref-$stamp/manifests/esgz" | jq '[.layers[].size] | add')
echo "   ${ref_secs}s, $(mb $ref_size) MB"

# --- whole image, registry to registry, including push ------------------------------------------
echo "== lazypull image convert (registry -> registry, includes pull and push)"
t0=$(now)
"$bin" image convert "$REG/test/big:1" "$lp_dst" > "$work/image-convert.log" 2>&1
t1=$(now)
lp_image_secs=$(elapsed "$t0" "$t1")
echo "   ${lp_image_secs}s (ctr-remote: ${ref_secs}s convert + ${ref_push_secs}s push = ${ref_total}s, after a separate pull)"

# --- gzip / pigz -----------------------------------------------------------------------------
echo "== gzip -9 / pigz -9 of the same tars"
gz_size=0; t0=$(now)
for t in "${tars[@]}"; do gzip -9 -c "$t" > "$work/x.gz"; gz_size=$((gz_size + $(stat -c %s "$work/x.gz"))); done
t1=$(now); gz_secs=$(elapsed "$t0" "$t1")
pz_size=0; t0=$(now)
for t in "${tars[@]}"; do pigz -9 -p "$(nproc)" -c "$t" > "$work/x.gz"; pz_size=$((pz_size + $(stat -c %s "$work/x.gz"))); done
t1=$(now); pz_secs=$(elapsed "$t0" "$t1")
rm -f "$work/x.gz"
echo "   gzip ${gz_secs}s $(mb $gz_size) MB; pigz ${pz_secs}s $(mb $pz_size) MB"

# --- random reads ------------------------------------------------------------------------------
echo "== random 4 KiB reads"
# The largest layer (random data, 4 MiB chunks) and the Debian rootfs layer (many small files);
# and the rootfs layer re-chunked at 64 KiB to show the chunk-size trade-off.
big_layer=$(for d in "${layers[@]}"; do echo "$(stat -c %s "$work/${d#sha256:}.esgz") ${d#sha256:}"; done | sort -n | tail -1 | cut -d' ' -f2)
rootfs_layer=${layers[0]#sha256:}
"$bin" layer convert --chunk-size 65536 "$work/$rootfs_layer.tar" "$work/rootfs-64k.esgz" >/dev/null
rr() { "$root/target/release/examples/random_reads" "$1" "${2:-2000}" 4096; }
rr_big=$(rr "$work/$big_layer.esgz" 500)
rr_rootfs=$(rr "$work/$rootfs_layer.esgz" 2000)
rr_rootfs64=$(rr "$work/rootfs-64k.esgz" 5000)
echo "   $rr_big"; echo "   $rr_rootfs"; echo "   $rr_rootfs64"

# --- report ------------------------------------------------------------------------------------
tput() { awk -v b="$uncompressed" -v s="$1" 'BEGIN{printf "%.1f", b/1e6/s}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'; }
j() { echo "$1" | jq -r "$2"; }
cpu=$(lscpu | awk -F: '/Model name/{gsub(/^ +/,"",$2); print $2; exit}')
"$root/scripts/md-section.sh" "$out_md" convert <<EOF
## Conversion (\`scripts/bench.sh\`)

Measured by \`make bench\` (\`scripts/bench.sh\`) on $(date -u +%Y-%m-%d), $(nproc) cores ($cpu).
Nothing here is typed in: the script rewrites this section from its own measurements.

### Layer conversion: test/big:1 ($(mb $uncompressed) MB uncompressed, ${#layers[@]} layers)

Debian bookworm minbase + 2 layers of 10 x 25 MiB random files + 1 layer of 1000 small text
files (\`../shared/peer/02-build-images.sh big\`). Input: the image's gzip layer blobs.
Wall time for all layers, sequentially; throughput is uncompressed MB per second.

| converter | time (s) | throughput (MB/s) | output (MB) | vs ctr-remote speed | vs ctr-remote size |
| --- | ---: | ---: | ---: | ---: | ---: |
| \`lazypull layer convert\` (gzip 9, 4 MiB chunks) | $lp_secs | $(tput "$lp_secs") | $(mb $lp_size) | $(ratio "$ref_secs" "$lp_secs")x | $(ratio "$lp_size" "$ref_size")x |
| \`ctr-remote image convert --estargz --oci\` 0.12.0 | $ref_secs | $(tput "$ref_secs") | $(mb $ref_size) | 1.00x | 1.00x |
| \`gzip -9\` of the tars (not eStargz) | $gz_secs | $(tput "$gz_secs") | $(mb $gz_size) | $(ratio "$ref_secs" "$gz_secs")x | $(ratio "$gz_size" "$ref_size")x |
| \`pigz -9 -p $(nproc)\` of the tars (not eStargz) | $pz_secs | $(tput "$pz_secs") | $(mb $pz_size) | $(ratio "$ref_secs" "$pz_secs")x | $(ratio "$pz_size" "$ref_size")x |

ctr-remote's time covers conversion inside containerd's content store (no push); the image was
pulled into the store beforehand.

lazypull's output with \`--threads 1\` is byte-identical to the 2-thread output: **$same_bytes**.
ctr-remote's push reuses blobs of earlier bench runs by cross-repository mount (containerd's
distribution-source labels), so its push time is close to zero; lazypull uploads every converted blob.

#### Whole image, registry to registry

| command | wall time (s) | vs ctr-remote |
| --- | ---: | ---: |
| \`lazypull image convert 127.0.0.1:5000/test/big:1 …/bench-lp-N:esgz\` (pull + convert + push) | $lp_image_secs | $(ratio "$ref_total" "$lp_image_secs")x |
| \`ctr-remote image convert --estargz --oci\` + \`ctr-remote image push\` (pull not counted) | $ref_total | 1.00x |

### Random 4 KiB reads from a local blob

\`target/release/examples/random_reads BLOB OPS 4096\`: offsets uniformly over the layer's file
bytes, each read through \`Reader::read_file_at\` with sha256 verification and **no chunk
cache** (the lazy filesystem caches decompressed chunks; this is the format's raw cost). A read
must decompress its chunk's member from the start up to the end of the chunk, so the cost per
read is the chunk size, not 4 KiB.

| blob | chunks | ops/s | decompressed bytes per read |
| --- | ---: | ---: | ---: |
| random-data layer, 4 MiB chunks | $(j "$rr_big" .chunks) | $(j "$rr_big" .opsPerSec) | $(j "$rr_big" .decompressedBytesPerRead) |
| Debian rootfs layer, 4 MiB chunks | $(j "$rr_rootfs" .chunks) | $(j "$rr_rootfs" .opsPerSec) | $(j "$rr_rootfs" .decompressedBytesPerRead) |
| Debian rootfs layer, 64 KiB chunks | $(j "$rr_rootfs64" .chunks) | $(j "$rr_rootfs64" .opsPerSec) | $(j "$rr_rootfs64" .decompressedBytesPerRead) |
EOF
echo "== wrote $out_md"
