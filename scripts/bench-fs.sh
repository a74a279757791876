#!/usr/bin/env bash
# make bench, part 2: the lazy filesystem on test/big:1 (~550 MB: Debian minbase + 2 x 10 x
# 25 MiB random files + 1000 small files), in one run beside the Go stargz-snapshotter
# (../shared/peer/06-stargz-grpc.sh, measured by the peer's 07-bench.sh) and a full overlayfs
# pull through the same private containerd. Each mode runs REPS times, cold every time (fresh
# state, page cache dropped); the median goes to docs/benchmarks.md.
#
# Workload as in the peer script: read every file of /data1 and /data2 (500 MiB) once cold and
# once more warm. lazypull is measured on `lazypull mount` (one FUSE mount per layer under a
# read-only overlayfs, no containerd: the filesystem alone; bench-coldstart.sh measures it
# through containerd); the peers inside `ctr run`,
# whose container start (their run_echo, also reported) is part of their read times.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
PEER=${PEER:-$root/../shared/peer}
REG=${REG:-127.0.0.1:5000}
SOCK=${CTD_SOCK:-/run/containerd-test/containerd.sock}
REPS=${REPS:-3}
work=${BENCH_DIR:-$root/.work/bench-fs}
out_md=${BENCH_OUT:-$root/docs/benchmarks.md}
RLOG=${RUN:-/tmp/peer-run}/registry.log
mkdir -p "$work"

[ -d "$PEER" ] || { echo "bench-fs: needs the peer scripts (PEER=$PEER)" >&2; exit 1; }
"$PEER/01-registry.sh" start >/dev/null
curl -fsS "http://$REG/v2/test/big/tags/list" | grep -q '"1"' || "$PEER/02-build-images.sh" big
"$PEER/04-containerd.sh" start >/dev/null
"$PEER/06-stargz-grpc.sh" start >/dev/null
cargo build --release --locked -p lazypull 2>&1 | tail -1
bin=$root/target/release/lazypull

tags=$(curl -fsS "http://$REG/v2/test/big/tags/list")
# Our conversion and the reference's, of the same image.
if ! grep -q '"1-lazypull"' <<<"$tags"; then "$bin" image convert "$REG/test/big:1" "$REG/test/big:1-lazypull"; fi
if ! grep -q '"1-esgz"' <<<"$tags"; then
  ctr-remote -a "$SOCK" -n bench-conv image pull --plain-http "$REG/test/big:1" >/dev/null
  ctr-remote -a "$SOCK" -n bench-conv image convert --oci --estargz "$REG/test/big:1" "$REG/test/big:1-esgz" >/dev/null
  ctr-remote -a "$SOCK" -n bench-conv image push --plain-http "$REG/test/big:1-esgz" >/dev/null
fi
blob_total() { curl -fsS -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$REG/v2/test/big/manifests/$1" | jq '[.layers[].size] | add'; }
lp_blobs=$(blob_total 1-lazypull)
ref_blobs=$(blob_total 1-esgz)
plain_blobs=$(blob_total 1)

now() { date +%s.%N; }
el() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f", b-a}'; }
mark() { wc -l < "$RLOG" 2>/dev/null || echo 0; }
bytes_since() { tail -n +"$(( $1 + 1 ))" "$RLOG" 2>/dev/null | awk '$7 ~ /\/blobs\// && $6 ~ /GET/ {b+=$10} END{printf "%d", b}'; }
cold_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
median() { sort -g | awk '{a[NR]=$1} END{print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

mnt=$work/mnt
state=$work/state
umount_all() { "$bin" umount "$mnt" --state-dir "$state" >/dev/null 2>&1 || true; }
trap umount_all EXIT

: > "$work/lazypull.txt"
for r in $(seq 1 "$REPS"); do
  umount_all; rm -rf "$state"; mkdir -p "$mnt"; cold_caches
  m0=$(mark); t0=$(now)
  "$bin" mount "$REG/test/big:1-lazypull" "$mnt" --state-dir "$state" >/dev/null
  t1=$(now)
  cat "$mnt/etc/os-release" > /dev/null
  t2=$(now)
  b_first=$(bytes_since "$m0")
  cat "$mnt"/data1/* "$mnt"/data2/* > /dev/null
  t3=$(now)
  cat "$mnt"/data1/* "$mnt"/data2/* > /dev/null
  t4=$(now)
  b_all=$(bytes_since "$m0")
  cat "$mnt"/data1/* "$mnt"/data2/* > /dev/null
  t5=$(now)
  cat "$mnt"/data1/* "$mnt"/data2/* > /dev/null
  t6=$(now)
  echo "mount=$(el "$t0" "$t1") first_file=$(el "$t1" "$t2") cold_read=$(el "$t2" "$t3") warm_read=$(el "$t3" "$t4") warm3_read=$(el "$t5" "$t6") bytes_first=$b_first bytes_all=$b_all" | tee -a "$work/lazypull.txt"
done
# Local-disk baseline: the same files copied to this machine's disk, read the same way.
rm -rf "$work/local"; mkdir -p "$work/local"; cp -a "$mnt/data1" "$mnt/data2" "$work/local/"
: > "$work/local.txt"
for r in $(seq 1 "$REPS"); do
  cold_caches; t0=$(now)
  cat "$work/local"/data1/* "$work/local"/data2/* > /dev/null
  t1=$(now)
  cat "$work/local"/data1/* "$work/local"/data2/* > /dev/null
  t2=$(now)
  cat "$work/local"/data1/* "$work/local"/data2/* > /dev/null
  t3=$(now)
  cat "$work/local"/data1/* "$work/local"/data2/* > /dev/null
  t4=$(now)
  echo "cold_read=$(el "$t0" "$t1") warm_read=$(el "$t1" "$t2") warm3_read=$(el "$t3" "$t4")" | tee -a "$work/local.txt"
done
# Warm store, cold page cache: the chunk store (and passthrough) instead of the kernel cache.
cold_caches; t0=$(now); cat "$mnt"/data1/* "$mnt"/data2/* > /dev/null; t1=$(now)
store_read=$(el "$t0" "$t1")
status_json=$("$bin" status "$mnt" --state-dir "$state" --json)
umount_all

REPS=$REPS "$PEER/07-bench.sh" stargz "$REG/test/big:1-esgz" | tee "$work/stargz.txt"
REPS=$REPS "$PEER/07-bench.sh" overlayfs "$REG/test/big:1" | tee "$work/overlayfs.txt"

# --- report ------------------------------------------------------------------------------------
col() { grep -o "$2=[0-9.]*" "$1" | cut -d= -f2 | median; }
mib() { grep -o "$2=[0-9.]*MiB" "$1" | sed 's/.*=//; s/MiB//' | median; }
lp_mount=$(col "$work/lazypull.txt" mount); lp_first=$(col "$work/lazypull.txt" first_file)
lp_cold=$(col "$work/lazypull.txt" cold_read); lp_warm=$(col "$work/lazypull.txt" warm_read)
lp_bytes_first=$(col "$work/lazypull.txt" bytes_first); lp_bytes=$(col "$work/lazypull.txt" bytes_all)
loc_cold=$(col "$work/local.txt" cold_read); loc_warm=$(col "$work/local.txt" warm_read)
lp_warm3=$(col "$work/lazypull.txt" warm3_read); loc_warm3=$(col "$work/local.txt" warm3_read)
sz_pull=$(col "$work/stargz.txt" pull); sz_echo=$(col "$work/stargz.txt" run_echo)
sz_cold=$(col "$work/stargz.txt" run_read_500MiB); sz_warm=$(col "$work/stargz.txt" rerun_read_500MiB_warm)
sz_mib=$(grep -o 'fetched_total=[0-9.]*MiB' "$work/stargz.txt" | sed 's/.*=//; s/MiB//' | median)
ov_pull=$(col "$work/overlayfs.txt" pull); ov_echo=$(col "$work/overlayfs.txt" run_echo)
ov_cold=$(col "$work/overlayfs.txt" run_read_500MiB); ov_warm=$(col "$work/overlayfs.txt" rerun_read_500MiB_warm)
ov_mib=$(grep -o 'fetched_total=[0-9.]*MiB' "$work/overlayfs.txt" | sed 's/.*=//; s/MiB//' | median)
f() { awk -v x="$1" 'BEGIN{printf "%.2f", x}'; }
r() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'; }
mb() { awk -v b="$1" 'BEGIN{printf "%.1f", b/1e6}'; }
sz_bytes=$(awk -v m="$sz_mib" 'BEGIN{printf "%d", m*1048576}')
ov_bytes=$(awk -v m="$ov_mib" 'BEGIN{printf "%d", m*1048576}')
ov_total=$(awk -v a="$ov_pull" -v b="$ov_cold" 'BEGIN{printf "%.3f", a+b}')
lp_total=$(awk -v a="$lp_mount" -v b="$lp_first" -v c="$lp_cold" 'BEGIN{printf "%.3f", a+b+c}')
"$root/scripts/md-section.sh" "$out_md" fs <<EOF
## Lazy filesystem: test/big:1, read everything (\`scripts/bench-fs.sh\`, REPS=$REPS, medians)

Measured by \`make bench\` on $(date -u +%Y-%m-%d), $(nproc) cores, loopback registry
(Debian's docker-registry). Cold = fresh state/cache and page cache dropped before each run.
Workload: \`cat /data1/* /data2/*\` (500 MiB in 20 files), then the same again (warm).
lazypull: \`lazypull mount\` (4 FUSE layers under overlayfs, background fill on, prefetch of
prioritized files), reads from the host. Peers (the peer's \`07-bench.sh\`): the same workload
inside \`ctr run\` on containerd 1.6; their read times include starting the container
(their \`run echo\` column shows what that alone costs).

| mode | pull / mount (s) | run echo or first file (s) | cold read all (s) | warm re-read (s) | registry bytes (MB) | bytes / blob sizes |
| --- | ---: | ---: | ---: | ---: | ---: | ---: |
| lazypull (\`mount\`, eStargz by lazypull) | $(f "$lp_mount") | $(f "$lp_first") | $(f "$lp_cold") | $(f "$lp_warm") | $(mb "$lp_bytes") | $(r "$lp_bytes" "$lp_blobs") |
| Go stargz-snapshotter 0.12 (eStargz by ctr-remote) | $(f "$sz_pull") | $(f "$sz_echo") | $(f "$sz_cold") | $(f "$sz_warm") | $(mb "$sz_bytes") | $(r "$sz_bytes" "$ref_blobs") |
| containerd overlayfs, full pull (gzip) | $(f "$ov_pull") | $(f "$ov_echo") | $(f "$ov_cold") | $(f "$ov_warm") | $(mb "$ov_bytes") | $(r "$ov_bytes" "$plain_blobs") |
| local disk (the same files copied to ext4) | – | – | $(f "$loc_cold") | $(f "$loc_warm") | – | – |

Targets of issue #4 and where they stand in this run:

| target | measured | ratio |
| --- | --- | ---: |
| cold read of every file ≤ 0.5× the Go peer's | lazypull $(f "$lp_cold") s vs stargz-snapshotter $(f "$sz_cold") s | $(r "$lp_cold" "$sz_cold")x |
| no slower than a full overlayfs pull plus read | lazypull mount + first file + read $(f "$lp_total") s vs pull + read $(f "$ov_total") s | $(r "$lp_total" "$ov_total")x |
| warm re-read ≤ 1.1× local disk (page cache warm in both) | $(f "$lp_warm") s vs $(f "$loc_warm") s | $(r "$lp_warm" "$loc_warm")x |
| (same, third read: steady state) | $(f "$lp_warm3") s vs $(f "$loc_warm3") s | $(r "$lp_warm3" "$loc_warm3")x |
| bytes fetched ≤ 1.02× the blob sizes | $(mb "$lp_bytes") MB of $(mb "$lp_blobs") MB (stargz-snapshotter: $(mb "$sz_bytes") of $(mb "$ref_blobs")) | $(r "$lp_bytes" "$lp_blobs")x |

How warm reads reach local-disk speed: while a file is incomplete it is opened with direct I/O
(mmap still allowed), so the kernel keeps no FUSE page-cache copy; once every chunk is in the
store the file's object (an ordinary ext4 file) is complete and the next open passes through to
it, so re-reads hit ext4's page cache exactly as a local file would.

Also measured: page cache dropped but chunk store warm (reads served by the daemon from its
disk cache, or by the kernel through FUSE passthrough): $(f "$store_read") s, against
$(f "$loc_cold") s from local disk with a cold page cache. Registry bytes to mount and read the
first file: $(mb "$lp_bytes_first") MB (stargz-snapshotter after \`run echo\`: see its log line in
\`.work/bench-fs/stargz.txt\`).

Raw lines: \`.work/bench-fs/{lazypull,local,stargz,overlayfs}.txt\`. Last lazypull status:

\`\`\`json
$(echo "$status_json" | jq -c '.layers[] | {index, blob_bytes, fetched_bytes, requests, present_percent, errors, passthrough_opens}')
\`\`\`
EOF
echo "== wrote $out_md"
