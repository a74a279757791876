#!/usr/bin/env bash
# make demo: converts a sample layer to eStargz, inspects it, verifies every chunk, reads it
# back by extraction and compares with the source tree; then starts a local registry, a private
# containerd and `lazypull snapshotter`, and starts a sample image's container once after a
# full pull and once lazily, printing both times and the bytes fetched. Everything it starts
# is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

work="${DEMO_DIR:-.work/demo}"
rm -rf "$work" && mkdir -p "$work"

echo "== building lazypull (release)"
cargo build --release --locked -p lazypull 2>&1 | tail -1
bin=target/release/lazypull

echo "== sample layer: /usr/share/doc and /usr/bin of this machine"
src="$work/src"
mkdir -p "$src"
cp -a /usr/share/doc "$src/doc"
cp -a /usr/bin "$src/bin" 2>/dev/null || true
tar -C "$src" -cf "$work/layer.tar" .
gzip -1 -c "$work/layer.tar" > "$work/layer.tar.gz"
printf '  layer.tar %s bytes, layer.tar.gz %s bytes\n' "$(stat -c %s "$work/layer.tar")" "$(stat -c %s "$work/layer.tar.gz")"
printf '{"path":"bin/bash"}\n{"path":"bin/ls"}\n' > "$work/prioritized.jsonl"

echo "== lazypull layer convert (gzip input, prioritized bin/bash, bin/ls)"
start=$(date +%s%N)
$bin layer convert --json --prioritize "$work/prioritized.jsonl" "$work/layer.tar.gz" "$work/layer.esgz" > "$work/convert.json"
jq -r '"  toc digest \(.tocDigest)\n  diff id    \(.diffID)\n  \(.uncompressedSize) bytes -> \(.blobSize) bytes, \(.entries) entries"' "$work/convert.json"
toc=$(jq -r .tocDigest "$work/convert.json")
conv_ms=$(( ($(date +%s%N) - start) / 1000000 ))

echo "== lazypull layer convert --zstd"
$bin layer convert --zstd "$work/layer.tar" "$work/layer.zstdchunked" | grep -E "toc digest|time"

echo "== lazypull layer inspect"
$bin layer inspect "$work/layer.esgz"

echo "== lazypull layer verify"
start=$(date +%s%N)
$bin layer verify --toc-digest "$toc" "$work/layer.esgz"
verify_ms=$(( ($(date +%s%N) - start) / 1000000 ))

echo "== lazypull layer extract + compare with the source tree"
start=$(date +%s%N)
$bin layer extract "$work/layer.esgz" "$work/out"
extract_ms=$(( ($(date +%s%N) - start) / 1000000 ))
rm -f "$work/out/.prefetch.landmark"
diff -r --no-dereference "$src" "$work/out" && echo "  extracted tree is identical to the source"

echo "== a corrupted blob is refused"
cp "$work/layer.esgz" "$work/bad.esgz"
printf '\x00\x00\x00\x00' | dd of="$work/bad.esgz" bs=1 seek=5000 conv=notrunc status=none
$bin layer verify "$work/bad.esgz" || echo "  (refused, as it must be)"

echo
echo "== lazy container start: local registry + private containerd + lazypull snapshotter"
if [ "$(id -u)" -eq 0 ]; then
  scripts/demo-lazy.sh "$bin" "$src" "$work/lazy"
else
  echo "  (skipped: needs root for containerd, FUSE and overlay mounts)"
fi

echo
echo "== timings (format)"
printf '  convert %s MB tar.gz -> eStargz: %s ms\n' "$(( $(stat -c %s "$work/layer.tar") / 1000000 ))" "$conv_ms"
printf '  verify every chunk:            %s ms\n' "$verify_ms"
printf '  extract:                       %s ms\n' "$extract_ms"
