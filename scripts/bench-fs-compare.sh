#!/usr/bin/env bash
# Before/after of the lazy filesystem alone (the `lazypull` rows of scripts/bench-fs.sh), for
# two lazypull binaries in one run, their repetitions interleaved: `lazypull mount` of
# test/big:1-lazypull (made by bench-fs.sh), first file, `cat /data1/* /data2/*` cold (500 MiB),
# and again warm. Every repetition cold: fresh state dir, page cache dropped.
# Usage: scripts/bench-fs-compare.sh BASE_BIN [NEW_BIN]   (NEW_BIN: target/release/lazypull)
# Output: one line per run and the medians per binary (.work/bench-fs-compare/runs.txt).
# Knobs: REPS (3).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
base=${1:?usage: bench-fs-compare.sh BASE_BIN [NEW_BIN]}
new=${2:-$root/target/release/lazypull}
REG=${REG:-127.0.0.1:5000}
REPS=${REPS:-3}
work=${BENCH_DIR:-$root/.work/bench-fs-compare}
RLOG=${RUN:-/tmp/peer-run}/registry.log
mkdir -p "$work"
curl -fsS "http://$REG/v2/test/big/tags/list" | grep -q '"1-lazypull"' || { echo "bench-fs-compare: run scripts/bench-fs.sh first (needs test/big:1-lazypull)" >&2; exit 1; }
now() { date +%s.%N; }
el() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f", b-a}'; }
mark() { wc -l < "$RLOG" 2>/dev/null || echo 0; }
bytes_since() { tail -n +"$(( $1 + 1 ))" "$RLOG" 2>/dev/null | awk '$7 ~ /\/blobs\// && $6 ~ /GET/ {b+=$10} END{printf "%d", b}'; }
median() { sort -g | awk '{a[NR]=$1} END{print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
mnt=$work/mnt
state=$work/state
umount_all() { "$new" umount "$mnt" --state-dir "$state" >/dev/null 2>&1 || "$base" umount "$mnt" --state-dir "$state" >/dev/null 2>&1 || true; }
trap umount_all EXIT
: > "$work/runs.txt"
for r in $(seq 1 "$REPS"); do
  for which in base new; do
    bin=$base; [ "$which" = new ] && bin=$new
    umount_all; rm -rf "$state"; mkdir -p "$mnt"; sync; echo 3 > /proc/sys/vm/drop_caches
    m0=$(mark); t0=$(now)
    "$bin" mount "$REG/test/big:1-lazypull" "$mnt" --state-dir "$state" >/dev/null
    t1=$(now); cat "$mnt/etc/os-release" > /dev/null
    t2=$(now); cat "$mnt"/data1/* "$mnt"/data2/* > /dev/null
    t3=$(now); cat "$mnt"/data1/* "$mnt"/data2/* > /dev/null
    t4=$(now)
    sleep 0.3 # the registry writes its access log line after the response
    echo "$which rep=$r mount=$(el "$t0" "$t1") first_file=$(el "$t1" "$t2") cold_read=$(el "$t2" "$t3") warm_read=$(el "$t3" "$t4") bytes=$(bytes_since "$m0")" | tee -a "$work/runs.txt"
    umount_all
  done
done
echo "medians of $REPS (seconds; bytes from the registry):"
for which in base new; do
  line="$which"
  for k in mount first_file cold_read warm_read bytes; do
    line="$line $k=$(grep "^$which " "$work/runs.txt" | grep -o " $k=[0-9.]*" | cut -d= -f2 | median)"
  done
  echo "$line"
done
