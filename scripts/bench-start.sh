#!/usr/bin/env bash
# Issue 17: cold container start, lazypull vs the Go stargz-snapshotter, side by side through one
# private containerd (../shared/peer). For each image (test/big:1-esgz, 4 layers; and
# test/layers32:1-esgz, 32 layers, both converted by `ctr-remote image convert --estargz`) and each
# snapshotter (stargz = the Go peer, lazypull = `lazypull snapshotter`, default config, so
# layer_daemons = true), REPS cold runs, interleaved:
#   rpull  `ctr-remote image rpull --plain-http --snapshotter S REF`
#   run    `ctr run --rm --snapshotter S REF id /bin/echo hi`
# "cold": containers, images and snapshots of every snapshotter removed, both snapshotters
# restarted with wiped roots (caches), page cache dropped.
# For lazypull, a breakdown from its logs (LAZYPULL_LOG with timestamps): rpull start -> first
# "remote snapshot mounted lazily" (includes ctr-remote's manifest/config fetch and the first
# Prepare: resolve, TOC, daemon start, FUSE mount), each later layer's Prepare (gap between
# consecutive mount lines), last mount -> rpull end, and the registry reads the layer daemons
# made during `ctr run` (first reads; their "fetching" debug lines).
# Results: .work/bench-start/results.jsonl (one JSON line per run), markdown table on stdout
# (also .work/bench-start/table.md).
# Knobs: REPS (3), IMAGES, SNAPSHOTTERS, KEEP_UP=1 (leave the peer environment running).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
PEER=${PEER:-$root/../shared/peer}
REG=127.0.0.1:5000
SOCK=${CTD_SOCK:-/run/containerd-test/containerd.sock}
REPS=${REPS:-3}
IMAGES=${IMAGES:-"test/big:1-esgz test/layers32:1-esgz"}
SNAPSHOTTERS=${SNAPSHOTTERS:-"stargz lazypull"}
work=${BENCH_DIR:-$root/.work/bench-start}
RUN=${RUN:-/tmp/peer-run}
NS=lpstart
LP_SOCK=/run/containerd-test/lazypull/lazypull.sock
LP_ROOT=$work/snapshotter
mkdir -p "$work"
export CONTAINERD_NAMESPACE=$NS

[ -d "$PEER" ] || { echo "bench-start: needs the peer scripts (PEER=$PEER)" >&2; exit 1; }
cargo build --release --locked -p lazypull -p lazypull-linkem 2>&1 | tail -1
bin=$root/target/release/lazypull

ctr_() { ctr -a "$SOCK" -n "$NS" "$@"; }
now() { date +%s.%N; }
el() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f", b-a}'; }

# --- the lazypull snapshotter (default config), registered with the peer's containerd ----------
cat > "$work/snapshotter.toml" <<EOF
root = "$LP_ROOT"
address = "$LP_SOCK"
EOF
lp_daemons() { pgrep -f "lazypull mount .*--serve-config $LP_ROOT/layers/serve.json" || true; }
lp_stop() {
  local p
  if [ -f "$work/snapshotter.pid" ]; then
    p=$(cat "$work/snapshotter.pid")
    kill "$p" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    rm -f "$work/snapshotter.pid"
  fi
  # Layer daemons outlive the snapshotter by design: stop ours (by pid), and wait for them.
  for p in $(lp_daemons); do kill "$p" 2>/dev/null || true; done
  for _ in $(seq 1 100); do [ -z "$(lp_daemons)" ] && break; sleep 0.05; done
  awk -v r="$LP_ROOT" '$2 ~ "^"r {print $2}' /proc/self/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
}
lp_start() {
  mkdir -p "$(dirname "$LP_SOCK")"
  rm -f "$LP_SOCK"
  # info for the snapshotter; the layer daemons inherit it and also say what they fetch.
  LAZYPULL_LOG=${LAZYPULL_LOG:-info,store=debug} setsid "$bin" snapshotter --config "$work/snapshotter.toml" >> "$work/snapshotter.log" 2>&1 < /dev/null &
  echo $! > "$work/snapshotter.pid"
  for _ in $(seq 1 100); do [ -S "$LP_SOCK" ] && break; sleep 0.05; done
}
peer_down() {
  lp_stop
  "$PEER/06-stargz-grpc.sh" restart-clean >/dev/null 2>&1 || true
  "$PEER/06-stargz-grpc.sh" stop >/dev/null 2>&1 || true
  "$PEER/04-containerd.sh" stop >/dev/null 2>&1 || true
  "$PEER/01-registry.sh" stop >/dev/null 2>&1 || true
}
cleanup() { if [ "${KEEP_UP:-0}" = 1 ]; then lp_stop; else peer_down; fi; }
trap cleanup EXIT

# --- environment: registry, images, containerd with both proxy snapshotters ---------------------
"$PEER/01-registry.sh" start >/dev/null
tags() { curl -fsS "http://$REG/v2/$1/tags/list" 2>/dev/null || true; }
tags test/big | grep -q '"1"' || "$PEER/02-build-images.sh" big
lp_stop; rm -rf "$LP_ROOT"; : > "$work/snapshotter.log"; lp_start
if ! grep -q lazypull "$RUN/containerd.toml" 2>/dev/null || ! grep -q stargz "$RUN/containerd.toml" 2>/dev/null; then
  "$PEER/04-containerd.sh" stop >/dev/null || true
fi
"$PEER/06-stargz-grpc.sh" start >/dev/null || true # its closing `ctr plugins ls` fails while containerd is down
"$PEER/04-containerd.sh" start >/dev/null
grep -q lazypull "$RUN/containerd.toml" || "$PEER/04-containerd.sh" restart >/dev/null
for _ in $(seq 1 100); do ctr -a "$SOCK" version >/dev/null 2>&1 && break; sleep 0.1; done
grep -q 'proxy_plugins.stargz' "$RUN/containerd.toml" && grep -q 'proxy_plugins.lazypull' "$RUN/containerd.toml" \
  || { echo "bench-start: containerd lacks a proxy snapshotter" >&2; cat "$RUN/containerd.toml" >&2; exit 1; }

conv_push() { # src dst: ctr-remote's eStargz conversion, as 05-convert-estargz.sh
  ctr -a "$SOCK" -n bench-conv image pull --plain-http "$REG/$1" >/dev/null
  ctr-remote -a "$SOCK" -n bench-conv image convert --oci --estargz "$REG/$1" "$REG/$2" >/dev/null
  ctr-remote -a "$SOCK" -n bench-conv image push --plain-http "$REG/$2" >/dev/null
  ctr -a "$SOCK" -n bench-conv image rm --sync "$REG/$1" "$REG/$2" >/dev/null 2>&1 || true
}
tags test/big | grep -q '"1-esgz"' || conv_push test/big:1 test/big:1-esgz

# 32 layers: busybox rootfs + 31 layers of 16 files each (4 x 64 KiB random, 12 small text),
# built with umoci, pushed with skopeo (as 02-build-images.sh), converted by ctr-remote.
build_layers32() {
  local w=$work/img32 n i
  rm -rf "$w"; mkdir -p "$w/bb/bin" "$w/bb/etc" "$w/bb/tmp" "$w/bb/proc" "$w/bb/sys" "$w/bb/dev"
  cp /bin/busybox "$w/bb/bin/busybox"
  for a in $("$w/bb/bin/busybox" --list); do [ "$a" = busybox ] || ln -sf busybox "$w/bb/bin/$a"; done
  echo "root:x:0:0:root:/root:/bin/sh" > "$w/bb/etc/passwd"
  umoci init --layout "$w/oci"
  umoci new --image "$w/oci:1"
  umoci config --image "$w/oci:1" --os linux --architecture amd64 --config.cmd /bin/sh \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  umoci insert --image "$w/oci:1" "$w/bb" /
  for n in $(seq 2 32); do
    rm -rf "$w/l" && mkdir -p "$w/l/layer$n"
    for i in 1 2 3 4; do head -c 65536 /dev/urandom > "$w/l/layer$n/rand$i.bin"; done
    for i in $(seq 1 12); do seq 1 $((n * 40 + i)) > "$w/l/layer$n/f$i.txt"; done
    umoci insert --image "$w/oci:1" "$w/l" /
  done
  skopeo copy --dest-tls-verify=false "oci:$w/oci:1" "docker://$REG/test/layers32:1" >/dev/null
  rm -rf "$w"
}
tags test/layers32 | grep -q '"1"' || build_layers32
tags test/layers32 | grep -q '"1-esgz"' || conv_push test/layers32:1 test/layers32:1-esgz
layers_of() { curl -fsS -H "Accept: application/vnd.oci.image.manifest.v1+json" -H "Accept: application/vnd.docker.distribution.manifest.v2+json" "http://$REG/v2/${1%:*}/manifests/${1#*:}" | jq '.layers | length'; }
for img in $IMAGES; do echo "image $img: $(layers_of "$img") layers" >&2; done

# --- cold state ------------------------------------------------------------------------------------
cold() {
  local c i s k keys
  for c in $(ctr_ c ls -q); do ctr_ task kill -s KILL "$c" >/dev/null 2>&1 || true; ctr_ task rm -f "$c" >/dev/null 2>&1 || true; ctr_ c rm "$c" >/dev/null 2>&1 || true; done
  for i in $(ctr_ image ls -q); do ctr_ image rm --sync "$i" >/dev/null 2>&1 || true; done
  for s in overlayfs stargz lazypull; do
    for _ in 1 2 3 4 5 6 7 8; do
      keys=$(ctr_ snapshot --snapshotter "$s" ls 2>/dev/null | awk 'NR>1{print $1}')
      [ -z "$keys" ] && break
      for k in $keys; do ctr_ snapshot --snapshotter "$s" rm "$k" >/dev/null 2>&1 || true; done
    done
  done
  # Both lazy snapshotters restarted clean whatever the next run uses (a background fetch left by
  # the previous run would otherwise share the CPU and the registry with this one).
  "$PEER/06-stargz-grpc.sh" restart-clean >/dev/null
  lp_stop; rm -rf "$LP_ROOT"; lp_start
  for _ in $(seq 1 100); do
    if ctr_ snapshot --snapshotter lazypull prepare lps-probe >/dev/null 2>&1; then
      ctr_ snapshot --snapshotter lazypull rm lps-probe >/dev/null 2>&1 || true; break
    fi
    sleep 0.2
  done
  sync; echo 3 > /proc/sys/vm/drop_caches
}

# --- lazypull breakdown from its logs (timestamps are RFC 3339, UTC) ------------------------------
breakdown() { # log-offset t0 t1 t2 -> JSON object fields (without braces)
  /usr/bin/python3 - "$work/snapshotter.log" "$1" "$2" "$3" "$4" "$LP_ROOT/layers" <<'PY'
import sys, re, os, glob, json, datetime
log, off, t0, t1, t2, state = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
ts_re = re.compile(r'^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z')
def ts(line):
    m = ts_re.match(line)
    if not m: return None
    s = m.group(1)
    if '.' in s:
        a, b = s.split('.'); s = a + '.' + (b + '000000')[:6]
        fmt = '%Y-%m-%dT%H:%M:%S.%f'
    else:
        fmt = '%Y-%m-%dT%H:%M:%S'
    return datetime.datetime.strptime(s, fmt).replace(tzinfo=datetime.timezone.utc).timestamp()
with open(log, 'rb') as f:
    f.seek(off); lines = f.read().decode('utf-8', 'replace').splitlines()
mounts = [ts(l) for l in lines if 'remote snapshot mounted lazily' in l]
mounts = [m for m in mounts if m is not None]
fallbacks = sum(1 for l in lines if 'falling back to a normal snapshot' in l)
out = {"lp_mounted": len(mounts), "lp_fallbacks": fallbacks}
if mounts:
    out["lp_first_mount"] = round(mounts[0] - t0, 3)           # rpull start -> 1st layer mounted
    gaps = [round(b - a, 3) for a, b in zip(mounts, mounts[1:])]
    out["lp_layer_prepares"] = gaps                              # each later layer's Prepare
    out["lp_mount_span"] = round(mounts[-1] - mounts[0], 3)      # 1st -> last layer mounted
    out["lp_after_last_mount"] = round(t1 - mounts[-1], 3)       # last mount -> rpull returns
# Layer daemons: FUSE init times, and the registry reads ("fetching" debug lines) made while
# `ctr run` ran (the container's first reads) and during rpull (prefetch at mount).
fuse, run_fetch, run_bytes, pull_fetch, pull_bytes = [], 0, 0, 0, 0
for d in glob.glob(os.path.join(state, 'mounts', '*', 'daemon.log')):
    for l in open(d, errors='replace'):
        t = ts(l)
        if t is None or t < t0: continue
        if 'FUSE session initialised' in l: fuse.append(t)
        if 'fetching' in l:
            m = re.search(r'bytes=(\d+)', l); b = int(m.group(1)) if m else 0
            if t < t1: pull_fetch += 1; pull_bytes += b
            elif t <= t2 + 0.5: run_fetch += 1; run_bytes += b
out["lp_fuse_inits"] = len(fuse)
out["lp_fetches_during_rpull"] = pull_fetch; out["lp_fetch_bytes_during_rpull"] = pull_bytes
out["lp_fetches_during_run"] = run_fetch; out["lp_fetch_bytes_during_run"] = run_bytes
print(json.dumps(out)[1:-1])
PY
}

reg_bytes_since() { tail -n +"$(( $1 + 1 ))" "$RUN/registry.log" 2>/dev/null | awk '$7 ~ /\/blobs\// && $6 ~ /GET/ && $9 ~ /^2/ {n++; b+=$10} END{printf "\"blob_gets\":%d,\"blob_bytes\":%d", n, b}'; }

one_run() { # image snapshotter rep -> JSON line
  local img=$1 sn=$2 rep=$3 ref=$REG/$1 id off m0 t0 t1 t2 extra=""
  cold
  sleep 1 # let in-flight registry responses of the wipe be logged before the mark
  id=lps-$rep-$sn
  off=$(stat -c %s "$work/snapshotter.log")
  m0=$(wc -l < "$RUN/registry.log")
  t0=$(now)
  if ! ctr-remote -a "$SOCK" -n "$NS" image rpull --plain-http --snapshotter "$sn" "$ref" > "$work/pull.log" 2>&1; then
    echo "rpull failed: $sn $ref: $(tail -3 "$work/pull.log")" | tee -a "$work/failures.log" >&2; exit 1
  fi
  t1=$(now)
  if ! ctr_ run --rm --snapshotter "$sn" "$ref" "$id" /bin/echo hi > "$work/run.log" 2>&1; then
    echo "run failed: $sn $ref: $(cat "$work/run.log")" | tee -a "$work/failures.log" >&2; exit 1
  fi
  t2=$(now)
  grep -qx hi "$work/run.log" || { echo "run printed: $(cat "$work/run.log")" >&2; exit 1; }
  sleep 0.3 # the registry writes its access-log line after the response
  [ "$sn" = lazypull ] && extra=",$(breakdown "$off" "$t0" "$t1" "$t2")"
  printf '{"date":"%s","image":"%s","layers":%d,"snapshotter":"%s","rep":%d,"rpull":%s,"run":%s,"total":%s,%s%s}\n' \
    "$(date -u +%FT%TZ)" "$img" "$(layers_of "$img")" "$sn" "$rep" "$(el "$t0" "$t1")" "$(el "$t1" "$t2")" "$(el "$t0" "$t2")" \
    "$(reg_bytes_since "$m0")" "$extra"
}

# --- runs, interleaved ---------------------------------------------------------------------------
: > "$work/this-run.jsonl"
for rep in $(seq 1 "$REPS"); do
  for img in $IMAGES; do
    for sn in $SNAPSHOTTERS; do
      one_run "$img" "$sn" "$rep" | tee -a "$work/this-run.jsonl" >&2
    done
  done
done
cat "$work/this-run.jsonl" >> "$work/results.jsonl"
cold

# --- report ----------------------------------------------------------------------------------------
/usr/bin/python3 - "$work/this-run.jsonl" "$IMAGES" "$SNAPSHOTTERS" "$REPS" <<'PY' | tee "$work/table.md"
import sys, json, statistics as st
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
images, sns, reps = sys.argv[2].split(), sys.argv[3].split(), sys.argv[4]
med = lambda xs: st.median(xs) if xs else float('nan')
def sel(img, sn): return [r for r in rows if r["image"] == img and r["snapshotter"] == sn]
def m(img, sn, k): return med([r[k] for r in sel(img, sn) if k in r])
layers = {r["image"]: r["layers"] for r in rows}
print(f"Medians of {reps} cold runs (seconds; `ctr-remote image rpull` then `ctr run --rm … /bin/echo hi`):\n")
print("| image | layers | snapshotter | rpull | run echo | total | blob MiB fetched by end of run | lazypull / stargz (total) |")
print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
for img in images:
    for sn in sns:
        ratio = ""
        if sn == "lazypull" and "stargz" in sns:
            ratio = f"{m(img, 'lazypull', 'total') / m(img, 'stargz', 'total'):.2f}×"
        print(f"| {img} | {layers.get(img, '?')} | {sn} | {m(img, sn, 'rpull'):.3f} | {m(img, sn, 'run'):.3f} | {m(img, sn, 'total'):.3f} | {m(img, sn, 'blob_bytes') / 1048576:.1f} | {ratio} |")
if len(images) == 2:
    a, b = images
    print(f"\n32-layer vs 4-layer ({b} / {a}, median total):\n")
    print("| snapshotter | rpull ratio | run ratio | total ratio |")
    print("| --- | ---: | ---: | ---: |")
    for sn in sns:
        print(f"| {sn} | {m(b, sn, 'rpull') / m(a, sn, 'rpull'):.2f}× | {m(b, sn, 'run') / m(a, sn, 'run'):.2f}× | {m(b, sn, 'total') / m(a, sn, 'total'):.2f}× |")
if "lazypull" in sns:
    print("\nlazypull breakdown (medians; from its log timestamps):\n")
    print("| image | rpull start → 1st layer mounted | later layers' Prepare: median / max each | 1st → last mount | last mount → rpull done | run echo | registry reads during run (n / KiB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for img in images:
        rs = sel(img, "lazypull")
        each = [g for r in rs for g in r.get("lp_layer_prepares", [])]
        mx = med([max(r["lp_layer_prepares"]) for r in rs if r.get("lp_layer_prepares")])
        print(f"| {img} | {m(img, 'lazypull', 'lp_first_mount'):.3f} | {med(each):.3f} / {mx:.3f} | {m(img, 'lazypull', 'lp_mount_span'):.3f} | {m(img, 'lazypull', 'lp_after_last_mount'):.3f} | {m(img, 'lazypull', 'run'):.3f} | {m(img, 'lazypull', 'lp_fetches_during_run'):.0f} / {m(img, 'lazypull', 'lp_fetch_bytes_during_run') / 1024:.0f} |")
    bad = [r for r in rows if r["snapshotter"] == "lazypull" and (r.get("lp_fallbacks") or r.get("lp_mounted") != r["layers"])]
    if bad:
        print(f"\nWARNING: {len(bad)} lazypull run(s) did not mount every layer lazily: " + "; ".join(f"{r['image']} rep {r['rep']}: {r.get('lp_mounted')} mounted, {r.get('lp_fallbacks')} fallbacks" for r in bad))
PY
