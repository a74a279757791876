#!/usr/bin/env bash
# make fuzz: runs each cargo-fuzz target (FUZZ_TARGETS, default all four) for FUZZ_SECONDS
# (default 120) from a seed corpus of real tars and blobs (and, for layer_read, the hostile
# blobs of the estargz tests; for ztoc_read, the SOCI reference zTOCs, read in place, and the
# zTOCs of the soci hostile tests). Works on the stable toolchain (no sanitizer; libFuzzer's coverage
# instrumentation only). Crashes land in fuzz/artifacts/<target>/ and fail the run.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${FUZZ_SECONDS:-120}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

cargo build --release --locked -p lazypull 2>&1 | tail -1
bin=target/release/lazypull
seeds=fuzz/seeds
rm -rf "$seeds" && mkdir -p "$seeds/convert" "$seeds/toc_parse" "$seeds/layer_read" "$seeds/ztoc_read"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/t/dir/sub"
printf 'hello\n' > "$tmp/t/dir/a"; head -c 300 /dev/urandom > "$tmp/t/dir/sub/b"
ln -s a "$tmp/t/dir/link"; ln "$tmp/t/dir/a" "$tmp/t/dir/hard"; : > "$tmp/t/empty"; mkfifo "$tmp/t/fifo"
tar -C "$tmp/t" --format=gnu -cf "$seeds/convert/gnu.tar" .
tar -C "$tmp/t" --format=pax -cf "$seeds/convert/pax.tar" .
tar -C "$tmp/t" --format=ustar -cf "$seeds/convert/ustar.tar" .
for f in gnu pax; do
  $bin layer convert --chunk-size 128 "$seeds/convert/$f.tar" "$seeds/toc_parse/$f.esgz" >/dev/null
  $bin layer convert --zstd --chunk-size 128 "$seeds/convert/$f.tar" "$seeds/toc_parse/$f.zst" >/dev/null
done

# Inputs that once crashed a target (fixed since) stay in its seeds.
for t in convert layer_read toc_parse ztoc_read; do
  [ -d "fuzz/regressions/$t" ] && cp "fuzz/regressions/$t/"* "$seeds/$t/"
done
# layer_read: the real blobs plus every hostile blob the tests build (issue 16's cases).
cp "$seeds/toc_parse/"*.esgz "$seeds/toc_parse/"*.zst "$seeds/layer_read/"
LAZYPULL_FUZZ_SEEDS="$PWD/$seeds/layer_read" cargo test --locked -p lazypull-estargz --test hostile_names --test hostile_numbers >/dev/null 2>&1
# ztoc_read: the zTOCs the soci hostile tests build (well-formed and lying ones).
LAZYPULL_FUZZ_SEEDS="$PWD/$seeds/ztoc_read" cargo test --locked -p lazypull-soci --test hostile >/dev/null 2>&1

status=0
for target in ${FUZZ_TARGETS:-toc_parse convert layer_read ztoc_read}; do
  echo "== fuzzing $target for ${secs}s"
  mkdir -p "fuzz/corpus/$target"
  # New inputs go to the first directory only; the others are read. The reference zTOCs are
  # up to 511 KiB, so ztoc_read takes longer inputs.
  extra=() max_len=65536
  if [ "$target" = ztoc_read ]; then extra=(../crates/soci/tests/fixtures); max_len=$((1 << 20)); fi
  start=$(date +%s)
  if ! (cd fuzz && cargo fuzz run -s none "$target" "corpus/$target" "seeds/$target" "${extra[@]}" -- \
        -max_total_time="$secs" -max_len="$max_len" -timeout=10 -rss_limit_mb=4096 2>&1 | tail -n 15); then
    status=1
  fi
  echo "   $target ran $(( $(date +%s) - start ))s; corpus: $(ls "fuzz/corpus/$target" | wc -l) inputs; crashes: $(ls "fuzz/artifacts/$target" 2>/dev/null | wc -l)"
done
exit $status
