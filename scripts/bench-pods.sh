#!/usr/bin/env bash
# make bench, issue 20: pods started the way kubelet starts them (CRI RunPodSandbox with a local
# pause image, PullImage, CreateContainer, StartContainer, until the container reports ready),
# side by side in one run: containerd's full pull (overlayfs), the Go stargz-snapshotter and
# lazypull, cold, for the scripts/bench-coldstart.sh images, on loopback and on a shaped link.
# The work is the test `pods_start_side_by_side_with_the_peers` (crates/lazypull/tests/
# containerd.rs), which starts its own containerd and snapshotters per run; this script points it
# at the peer registry directly or through the shaped link (scripts/lib/shaped-link.sh).
# Output: one table per link on stdout (also .work/bench-pods/<link>.md) and per-run phase lines.
# Knobs: LINKS ("loopback 1gbit-2ms"), LAZYPULL_POD_WORKLOADS (comma-separated subset).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
PEER=${PEER:-$root/../shared/peer}
REG=127.0.0.1:5000
LINKS=${LINKS:-"loopback 1gbit-2ms"}
RUN=${RUN:-/tmp/peer-run}
NETNS=lppods-link
LINK_PORT=5102
work=${BENCH_DIR:-$root/.work/bench-pods}
mkdir -p "$work"

[ -d "$PEER" ] || { echo "bench-pods: needs the peer scripts (PEER=$PEER)" >&2; exit 1; }
cargo build --release --locked -p lazypull-linkem 2>&1 | tail -1
linkem=$root/target/release/lazypull-linkem
. "$root/scripts/lib/shaped-link.sh"
trap link_down EXIT

"$PEER/01-registry.sh" start >/dev/null
[ -x "${STARGZ_BIN:-/tmp/peer-build/containerd-stargz-grpc}" ] || "$PEER/06-stargz-grpc.sh" build >/dev/null
for ref in test/busybox:1 test/debian:12 test/big:1; do
  repo=${ref%:*}; tag=${ref#*:}
  for suffix in "" -esgz -lazypull; do
    curl -fsS "http://$REG/v2/$repo/tags/list" | grep -q "\"$tag$suffix\"" ||
      { echo "bench-pods: $REG/$repo:$tag$suffix is missing (scripts/bench-coldstart.sh makes it)" >&2; exit 1; }
  done
done

for link in $LINKS; do
  host=$(link_for "$link")
  LAZYPULL_PEER_REGISTRY=$host LAZYPULL_POD_LINK=$link LAZYPULL_INTEROP=required \
    cargo test --release --locked -p lazypull --test containerd pods_start_side_by_side -- --nocapture 2>&1 |
    tee "$work/$link.log" | grep -E '^(pod |\||test result)' || true
  grep -q '^test result: ok' "$work/$link.log" || { echo "bench-pods: the run on $link failed, see $work/$link.log" >&2; exit 1; }
  grep '^|' "$work/$link.log" > "$work/$link.md"
done
