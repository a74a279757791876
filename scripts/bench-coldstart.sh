#!/usr/bin/env bash
# make bench, part 3: hello-bench-style cold starts through one private containerd, side by side:
#   overlayfs      containerd's full pull of the original gzip image (`ctr image pull`)
#   stargz         the Go stargz-snapshotter (../shared/peer/06-stargz-grpc.sh), image converted
#                  by `ctr-remote image convert --estargz`, pulled with `ctr-remote image rpull`
#   lazypull       `lazypull snapshotter`, image converted by `lazypull image convert`, pulled
#                  with `lazypull rpull`
#   lazypull-prio  the same, image rebuilt with the files the workload opened prioritized (the
#                  list comes from a recording run: the layer daemons' `opened_files`)
#   lazypull-soci  `lazypull snapshotter` on the *unmodified* gzip image, made lazy by a SOCI index
#                  (`lazypull soci create`, v1 behind the OCI fallback tag), pulled with
#                  `lazypull rpull` (not in the default MODES: `make bench` runs it in a second
#                  pass with RESULTS=results-soci.jsonl REPORT=soci, see the Makefile)
# Workloads: busybox `echo`, a small script on Debian, and on test/big:1 (~550 MB) a read of ≈5%
# and a read of everything. Networks: loopback, and two shaped links (registry in a network
# namespace whose lo has a tbf qdisc; `lazypull-linkem` relays into it adding the round trip).
# Every run is cold: images, snapshots and snapshotter caches wiped, page cache dropped.
# Results: .work/bench-cold/results.jsonl; report: docs/benchmarks.md section "coldstart" and
# docs/bench-coldstart.png (scripts/bench-coldstart-report.py).
#
# Knobs: REPS (3), NETS ("loopback 1gbit-2ms 100mbit-20ms"), WORKLOADS, MODES, APPEND, RESULTS
# (file name under the work dir), REPORT (report | soci: which section is written), SOCI_SPAN
# (span size of the SOCI indexes, default upstream's 4 MiB), and
# LP_CONFIG_EXTRA (lines added to the lazypull snapshotter's TOML, e.g. "readahead_bytes = 0"),
# and LP_BIN_BASE: another lazypull binary (e.g. built from an earlier commit) for the mode
# `lazypull-base`, which runs the `lazypull` mode's images through it — a before/after
# comparison in one run (REPORT=none leaves docs/benchmarks.md alone).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
PEER=${PEER:-$root/../shared/peer}
REG=127.0.0.1:5000
SOCK=${CTD_SOCK:-/run/containerd-test/containerd.sock}
REPS=${REPS:-3}
NETS=${NETS:-"loopback 1gbit-2ms 100mbit-20ms"}
WORKLOADS=${WORKLOADS:-"busybox-echo debian-script big-5pct big-all"}
MODES=${MODES:-"overlayfs stargz lazypull lazypull-prio"}
work=${BENCH_DIR:-$root/.work/bench-cold}
RESULTS=${RESULTS:-results.jsonl}
REPORT=${REPORT:-report}
RUN=${RUN:-/tmp/peer-run}
NS=lpbench
NETNS=lpbench-link
LINK_PORT=5101
LP_SOCK=/run/containerd-test/lazypull/lazypull.sock
LP_ROOT=$work/snapshotter
mkdir -p "$work"
export CONTAINERD_NAMESPACE=$NS

[ -d "$PEER" ] || { echo "bench-coldstart: needs the peer scripts (PEER=$PEER)" >&2; exit 1; }
cargo build --release --locked -p lazypull -p lazypull-linkem 2>&1 | tail -1
bin=$root/target/release/lazypull
linkem=$root/target/release/lazypull-linkem

ctr_() { ctr -a "$SOCK" -n "$NS" "$@"; }
now() { date +%s.%N; }
el() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f", b-a}'; }

# --- the lazypull snapshotter, registered with the peer's containerd ----------------------------
cat > "$work/snapshotter.toml" <<EOF
root = "$LP_ROOT"
address = "$LP_SOCK"
${LP_CONFIG_EXTRA:-}
EOF
lp_stop() {
  if [ -f "$work/snapshotter.pid" ]; then
    kill "$(cat "$work/snapshotter.pid")" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$(cat "$work/snapshotter.pid")" 2>/dev/null || break; sleep 0.1; done
    rm -f "$work/snapshotter.pid"
  fi
  # Layer daemons outlive the snapshotter by design; a wipe stops them too.
  pkill -f "lazypull mount .*(--state-dir|--serve-config) $LP_ROOT" 2>/dev/null || true
  # ... and wait for them: one still writing its cache would make the wipe that follows fail.
  for _ in $(seq 1 100); do pgrep -f "lazypull mount .*(--state-dir|--serve-config) $LP_ROOT" >/dev/null || break; sleep 0.05; done
  awk -v r="$LP_ROOT" '$2 ~ "^"r {print $2}' /proc/self/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
}
lp_start() {
  mkdir -p "$(dirname "$LP_SOCK")"
  rm -f "$LP_SOCK"
  setsid "${run_bin:-$bin}" snapshotter --config "$work/snapshotter.toml" >> "$work/snapshotter.log" 2>&1 < /dev/null &
  echo $! > "$work/snapshotter.pid"
  for _ in $(seq 1 100); do [ -S "$LP_SOCK" ] && break; sleep 0.05; done
}

# --- the shaped link: registry in a netns with tbf on its lo, linkem relay adding latency -------
. "$root/scripts/lib/shaped-link.sh"
cleanup() { link_down; lp_stop; }
trap cleanup EXIT

# --- images --------------------------------------------------------------------------------------
"$PEER/01-registry.sh" start >/dev/null
tags() { curl -fsS "http://$REG/v2/$1/tags/list" 2>/dev/null || true; }
tags test/busybox | grep -q '"1"' || "$PEER/02-build-images.sh" small
tags test/debian | grep -q '"12"' || "$PEER/02-build-images.sh" debian
tags test/big | grep -q '"1"' || "$PEER/02-build-images.sh" big
lp_stop; rm -rf "$LP_ROOT"; lp_start
if ! grep -q lazypull "$RUN/containerd.toml" 2>/dev/null || ! grep -q stargz "$RUN/containerd.toml" 2>/dev/null; then
  "$PEER/04-containerd.sh" stop >/dev/null || true
fi
"$PEER/06-stargz-grpc.sh" start >/dev/null
"$PEER/04-containerd.sh" start >/dev/null
grep -q lazypull "$RUN/containerd.toml" || { "$PEER/04-containerd.sh" restart >/dev/null; }
for _ in $(seq 1 100); do ctr -a "$SOCK" version >/dev/null 2>&1 && break; sleep 0.1; done
ctr -a "$SOCK" version >/dev/null 2>&1 || "$PEER/04-containerd.sh" start >/dev/null

declare -A SRC=([busybox-echo]=test/busybox:1 [debian-script]=test/debian:12 [big-5pct]=test/big:1 [big-all]=test/big:1)
declare -A CMD=(
  [busybox-echo]='/bin/echo hello'
  [debian-script]='/bin/sh -c "dpkg -l >/dev/null; apt-get --version >/dev/null; gzip --version >/dev/null; ls -lR /usr/share/doc >/dev/null; cat /etc/os-release"'
  [big-5pct]='/bin/sh -c "cat /data1/rand1.bin /etc/os-release >/dev/null"'
  [big-all]='/bin/sh -c "cat /data1/* /data2/* >/dev/null"'
)
# Converted variants (kept in the registry between runs of the bench).
for src in test/busybox:1 test/debian:12 test/big:1; do
  repo=${src%:*}; tag=${src#*:}
  t=$(tags "$repo")
  grep -q "\"$tag-lazypull\"" <<<"$t" || "$bin" image convert "$REG/$src" "$REG/$repo:$tag-lazypull" >/dev/null
  if ! grep -q "\"$tag-esgz\"" <<<"$t"; then
    ctr -a "$SOCK" -n bench-conv image pull --plain-http "$REG/$src" >/dev/null
    ctr-remote -a "$SOCK" -n bench-conv image convert --oci --estargz "$REG/$src" "$REG/$repo:$tag-esgz" >/dev/null
    ctr-remote -a "$SOCK" -n bench-conv image push --plain-http "$REG/$repo:$tag-esgz" >/dev/null
  fi
done

# SOCI indexes of the unmodified images (the index is pushed behind the fallback tag; the image
# digest does not change, so the overlayfs mode pulls exactly the same image).
if [[ " $MODES " == *" lazypull-soci "* ]]; then
  for src in test/busybox:1 test/debian:12 test/big:1; do
    "$bin" soci create --span-size "${SOCI_SPAN:-4194304}" "$REG/$src" >/dev/null
  done
fi

ref_of() { # mode workload host -> reference
  local src=${SRC[$2]} repo tag
  repo=${src%:*}; tag=${src#*:}
  case "$1" in
    overlayfs) echo "$3/$repo:$tag" ;;
    stargz) echo "$3/$repo:$tag-esgz" ;;
    lazypull|lazypull-base) echo "$3/$repo:$tag-lazypull" ;;
    lazypull-prio) echo "$3/$repo:$tag-prio-$2" ;;
    lazypull-soci) echo "$3/$repo:$tag" ;;
  esac
}
snapshotter_of() { case "$1" in overlayfs) echo overlayfs ;; stargz) echo stargz ;; *) echo lazypull ;; esac; }

cold() { # $1 = snapshotter
  local c i s k keys
  for c in $(ctr_ c ls -q); do ctr_ task kill -s KILL "$c" >/dev/null 2>&1 || true; ctr_ task rm -f "$c" >/dev/null 2>&1 || true; ctr_ c rm "$c" >/dev/null 2>&1 || true; done
  for i in $(ctr_ image ls -q); do ctr_ image rm --sync "$i" >/dev/null 2>&1 || true; done
  for s in overlayfs stargz lazypull; do
    for _ in 1 2 3 4 5 6; do
      keys=$(ctr_ snapshot --snapshotter "$s" ls 2>/dev/null | awk 'NR>1{print $1}')
      [ -z "$keys" ] && break
      for k in $keys; do ctr_ snapshot --snapshotter "$s" rm "$k" >/dev/null 2>&1 || true; done
    done
  done
  # Both lazy snapshotters are restarted clean whatever the next run uses: a background fetch
  # left running by the previous run (the Go peer keeps fetching a removed image's layers) would
  # otherwise share the link with this run and be counted in its registry bytes.
  "$PEER/06-stargz-grpc.sh" restart-clean >/dev/null
  lp_stop; rm -rf "$LP_ROOT"; lp_start
  # containerd's proxy client redials with backoff after the socket went away: wait until a
  # real call gets through (as the peer's restart-clean does for stargz).
  for _ in $(seq 1 100); do
    if ctr_ snapshot --snapshotter lazypull prepare lpb-probe >/dev/null 2>&1; then
      ctr_ snapshot --snapshotter lazypull rm lpb-probe >/dev/null 2>&1 || true; break
    fi
    sleep 0.2
  done
  sync; echo 3 > /proc/sys/vm/drop_caches
}

reglog() { if [ "$1" = loopback ]; then echo "$RUN/registry.log"; else echo "$work/netreg.log"; fi; }
mark() { wc -l < "$1" 2>/dev/null || echo 0; }
bytes_since() { tail -n +"$(( $2 + 1 ))" "$1" 2>/dev/null | awk '$6 ~ /GET/ && $9 ~ /^2/ {b+=$10} END{printf "%d", b}'; }

pull() { # mode ref
  case "$1" in
    overlayfs) ctr_ image pull --plain-http --snapshotter overlayfs "$2" ;;
    stargz) ctr-remote -a "$SOCK" -n "$NS" image rpull --plain-http "$2" ;;
    *) "${run_bin:-$bin}" rpull --address "$SOCK" --namespace "$NS" "$2" ;;
  esac
}

# One cold run; prints a JSON line.
one_run() { # net workload mode host rep
  local net=$1 wl=$2 mode=$3 host=$4 rep=$5 ref sn log m0 t0 t1 t2 t3 id
  ref=$(ref_of "$mode" "$wl" "$host"); sn=$(snapshotter_of "$mode"); log=$(reglog "$net")
  run_bin=$bin
  if [ "$mode" = lazypull-base ]; then run_bin=${LP_BIN_BASE:?the lazypull-base mode needs LP_BIN_BASE}; fi
  cold "$sn"
  # Let responses still in flight for the previous run (e.g. a background fill cut short by
  # the wipe) finish and be logged, so they are not counted here.
  sleep 1
  id=lpb-$wl-$rep
  m0=$(mark "$log")
  t0=$(now)
  if ! pull "$mode" "$ref" > "$work/pull.log" 2>&1; then
    # Seen once with the Go peer right after its restart: Prepare fell back to a normal
    # snapshot whose blob rpull never fetches. Count it, start cold again, retry once.
    echo "pull failed (retrying cold): $mode $ref: $(tail -1 "$work/pull.log")" | tee -a "$work/failures.log" >&2
    cold "$sn"; m0=$(mark "$log"); t0=$(now)
    pull "$mode" "$ref" > "$work/pull.log" 2>&1 || { echo "pull failed: $mode $ref" >&2; tail -20 "$work/pull.log" >&2; exit 1; }
  fi
  t1=$(now)
  eval "ctr_ container create --snapshotter $sn $ref $id -- ${CMD[$wl]}"
  t2=$(now)
  ctr_ task start "$id" > "$work/task.log" 2>&1 || { echo "workload failed: $mode $wl" >&2; cat "$work/task.log" >&2; exit 1; }
  t3=$(now)
  sleep 0.3 # the registry writes its access log line after the response
  printf '{"net":"%s","workload":"%s","mode":"%s","rep":%d,"pull":%s,"create":%s,"run":%s,"bytes":%s}\n' \
    "$net" "$wl" "$mode" "$rep" "$(el "$t0" "$t1")" "$(el "$t1" "$t2")" "$(el "$t2" "$t3")" "$(bytes_since "$log" "$m0")"
  ctr_ task rm -f "$id" >/dev/null 2>&1 || true
  ctr_ container rm "$id" >/dev/null 2>&1 || true
}

# Warm floor: the same create + run with the image present and the page cache warm (overlayfs).
warm_floor() { # workload
  local ref id t0 t1 t2
  ref=$(ref_of overlayfs "$1" "$REG"); id=lpb-warm-$1
  ctr_ image pull --plain-http "$ref" >/dev/null
  for pass in 1 2; do
    t0=$(now); eval "ctr_ container create --snapshotter overlayfs $ref $id -- ${CMD[$1]}"; t1=$(now)
    ctr_ task start "$id" >/dev/null 2>&1; t2=$(now)
    ctr_ task rm -f "$id" >/dev/null 2>&1 || true; ctr_ container rm "$id" >/dev/null 2>&1 || true
  done
  printf '{"workload":"%s","warm_create":%s,"warm_run":%s}\n' "$1" "$(el "$t0" "$t1")" "$(el "$t1" "$t2")"
}

# Recording run + prioritized rebuild (once per workload; the images stay in the registry).
record_and_rebuild() { # workload
  local wl=$1 ref src repo tag list id
  src=${SRC[$wl]}; repo=${src%:*}; tag=${src#*:}
  list=$work/prio-$wl.txt
  if ! tags "$repo" | grep -q "\"$tag-prio-$wl\"" || [ ! -s "$list" ]; then
    cold lazypull
    ref=$(ref_of lazypull "$wl" "$REG"); id=lpb-rec-$wl
    pull lazypull "$ref" >/dev/null
    eval "ctr_ container create --snapshotter lazypull $ref $id -- ${CMD[$wl]}"
    ctr_ task start "$id" >/dev/null
    sleep 1.5 # status.json is rewritten every second
    cat "$LP_ROOT"/layers/mounts/*/status.json | jq -r '.layers[].opened_files[]?' | awk '!seen[$0]++' > "$list"
    ctr_ task rm -f "$id" >/dev/null 2>&1 || true; ctr_ container rm "$id" >/dev/null 2>&1 || true
    echo "recorded $(wc -l < "$list") opened files for $wl" >&2
    "$bin" image convert --prioritize "$list" "$REG/$src" "$REG/$repo:$tag-prio-$wl" >/dev/null
  fi
}

# Bound inputs: bytes of manifest + config + TOCs + the chunks of the opened files (from the
# lazypull image's TOCs), written by the report helper.
if [[ " $MODES " == *" lazypull-prio "* ]]; then
  for wl in $WORKLOADS; do record_and_rebuild "$wl"; done
fi
# (Only the main report uses them; the soci report compares modes of one run.)
if [ "$REPORT" = report ]; then
  : > "$work/bound.jsonl"
  for wl in $WORKLOADS; do
    /usr/bin/python3 "$root/scripts/bench-coldstart-report.py" bound "$REG" "$(ref_of lazypull "$wl" "$REG")" "$work/prio-$wl.txt" "$wl" >> "$work/bound.jsonl"
  done
  cold overlayfs
  : > "$work/warm.jsonl"
  for wl in $WORKLOADS; do warm_floor "$wl" >> "$work/warm.jsonl"; done
fi

# APPEND=1 adds to the previous results (e.g. NETS=100mbit-20ms APPEND=1 after a cut-short run).
[ "${APPEND:-0}" = 1 ] || : > "$work/$RESULTS"
for net in $NETS; do
  case "$net" in
    loopback) link_down; host=$REG ;;
    *) rate=${net%-*}; rtt=${net#*-}; link_up "$rate" "${rtt%ms}"; host=127.0.0.1:$LINK_PORT ;;
  esac
  for wl in $WORKLOADS; do
    for mode in $MODES; do
      for rep in $(seq 1 "$REPS"); do
        one_run "$net" "$wl" "$mode" "$host" "$rep" | tee -a "$work/$RESULTS"
      done
    done
  done
done
cold overlayfs; cold lazypull
link_down
case "$REPORT" in
  report) /usr/bin/python3 "$root/scripts/bench-coldstart-report.py" report "$work" "$root/docs/benchmarks.md" "$root/docs/bench-coldstart.png" "$REPS" ;;
  soci) /usr/bin/python3 "$root/scripts/bench-coldstart-report.py" soci "$work" "$root/docs/benchmarks.md" "$REPS" ;;
esac
