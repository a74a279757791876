#!/usr/bin/env bash
# Issue 18: zTOC build speed vs `gzip -dc > /dev/null` over the same layers, side by side in one
# run. Layers: test/big:1's from the peer registry (REG, default 127.0.0.1:5000, started by
# ../shared/peer/run-all.sh) when it answers, else an image of the same shape built here (a
# Debian-files layer from this machine, 2 layers of 10 x 25 MiB random files, 1 layer of 3000
# small files). Both sides read the layers from the page cache (one warm-up read first); the zTOC
# side builds all layers in parallel (as `soci create` does), gzip runs one process per layer in
# parallel too. REPS runs each, the median is reported; output: section "soci-build" of docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
REG=${REG:-127.0.0.1:5000}
REPS=${REPS:-3}
work=${BENCH_DIR:-$root/.work/bench-soci}
mkdir -p "$work"
cargo build --release --locked -p lazypull 2>&1 | tail -1
bin=$root/target/release/lazypull
layers=$work/layers
rm -rf "$layers" && mkdir -p "$layers"

if curl -sf "http://$REG/v2/test/big/manifests/1" -H 'Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json' >/dev/null; then
  source_desc="test/big:1 from $REG"
  "$bin" image copy "$REG/test/big:1" "oci:$work/big:1" >/dev/null
  for d in $(jq -r '.layers[].digest' "$work/big/blobs/sha256/$(jq -r '.manifests[0].digest' "$work/big/index.json" | cut -d: -f2)"); do
    cp "$work/big/blobs/sha256/${d#sha256:}" "$layers/${d#sha256:}"
  done
else
  source_desc="a test/big:1-shaped image built here (no peer registry at $REG)"
  tmp=$work/src && rm -rf "$tmp" && mkdir -p "$tmp"
  tar -C / -czf "$layers/debian.tar.gz" etc usr/bin usr/lib/x86_64-linux-gnu 2>/dev/null || true
  for l in 1 2; do
    mkdir -p "$tmp/r$l"
    for i in $(seq 10); do head -c $((25 << 20)) /dev/urandom > "$tmp/r$l/f$i.bin"; done
    tar -C "$tmp" -czf "$layers/random$l.tar.gz" "r$l"
  done
  mkdir -p "$tmp/small"
  for i in $(seq 3000); do printf 'file %d %s\n' "$i" "$(head -c 300 /dev/urandom | base64 -w0)" > "$tmp/small/s$i.txt"; done
  tar -C "$tmp" -czf "$layers/small.tar.gz" small
fi
total=$(du -cb "$layers"/* | tail -1 | cut -f1)
cat "$layers"/* > /dev/null

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
t_gzip=(); t_ztoc=()
for r in $(seq "$REPS"); do
  s=$(date +%s.%N); for f in "$layers"/*; do gzip -dc "$f" > /dev/null & done; wait; e=$(date +%s.%N)
  t_gzip+=("$(awk -v a="$s" -v b="$e" 'BEGIN{print b-a}')")
  s=$(date +%s.%N); "$bin" soci ztoc "$layers"/* -o "$work/ztocs" > "$work/ztoc.out"; e=$(date +%s.%N)
  t_ztoc+=("$(awk -v a="$s" -v b="$e" 'BEGIN{print b-a}')")
done
g=$(printf '%s\n' "${t_gzip[@]}" | median); z=$(printf '%s\n' "${t_ztoc[@]}" | median)
ratio=$(awk -v a="$z" -v b="$g" 'BEGIN{printf "%.2f", a/b}')
met=$(awk -v r="$ratio" 'BEGIN{print (r <= 1.5) ? "met" : "**missed**"}')
{
  echo "## zTOC build speed (\`scripts/bench-soci-build.sh\`, REPS=$REPS, medians)"
  echo
  echo "Measured by \`make bench\` on $(date -u +%F), $(nproc) cores: $source_desc, $(ls "$layers" | wc -l) layers,"
  echo "$total compressed bytes, read from the page cache. Target of issue 18: within 1.5x of gzip -dc ($met)."
  echo
  echo "| | seconds | vs gzip -dc |"
  echo "| --- | ---: | ---: |"
  echo "| \`gzip -dc > /dev/null\` (one process per layer, in parallel) | $g | 1.00x |"
  echo "| \`lazypull soci ztoc\` (4 MiB spans, layers in parallel) | $z | ${ratio}x |"
  echo
  echo '```'
  cat "$work/ztoc.out"
  echo '```'
} | tee /dev/stderr | scripts/md-section.sh docs/benchmarks.md soci-build
