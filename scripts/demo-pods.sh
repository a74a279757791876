#!/usr/bin/env bash
# make demo, part 3: the sample image as a pod, started the way kubelet starts one (CRI
# RunPodSandbox, PullImage, CreateContainer, StartContainer, until the container's script has
# run: `lazypull cri time-pod`), once on containerd's overlayfs (full pull) and once on the
# lazypull snapshotter; prints both times side by side. Each mode gets a fresh containerd (CRI
# on, host-network pods, no CNI needed) and, for lazypull, a fresh snapshotter: both cold.
#
#   scripts/demo-pods.sh BIN IMAGE_REF PAUSE_REF WORK_DIR
set -euo pipefail
bin=$(readlink -f "$1")
ref=$2
pause=$3
mkdir -p "$4"
work=$(readlink -f "$4")
host=${ref%%/*}
run=/run/lazypull-demo-pods
. "$(dirname "$0")/lib/wait.sh"
pids=()

stop_all() {
  set +e
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.05; done; done
  pids=()
  # Layer mounts and container rootfs left below our directories; a layer daemon exits when
  # its mount goes away.
  awk '{print $5}' /proc/self/mountinfo | grep -E "^($work|$run)/" | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
  set -e
}
trap 'stop_all; rm -rf "$run"' EXIT

# One cold pod with SNAPSHOTTER; prints time-pod's JSON.
pod() {
  local mode=$1 dir=$work/$1
  trap stop_all EXIT
  rm -rf "$dir" "$run" && mkdir -p "$dir" "$run"
  if [ "$mode" = lazypull ]; then
    printf 'background_delay_secs = 30.0\n' > "$dir/snapshotter.toml"
    LAZYPULL_LOG=info "$bin" snapshotter --config "$dir/snapshotter.toml" --root "$dir/snapshotter" \
      --address "$run/lp.sock" > "$dir/snapshotter.log" 2>&1 &
    pids+=($!)
  fi
  {
    echo 'version = 2'
    echo "root = \"$dir/containerd\""
    echo "state = \"$run/state\""
    echo '[grpc]'
    echo "  address = \"$run/c.sock\""
    echo '[ttrpc]'
    echo "  address = \"$run/c.sock.ttrpc\""
    if [ "$mode" = lazypull ]; then
      echo '[proxy_plugins.lazypull]'
      echo '  type = "snapshot"'
      echo "  address = \"$run/lp.sock\""
    fi
    echo '[plugins."io.containerd.grpc.v1.cri"]'
    echo "  sandbox_image = \"$pause\""
    # Keeps the sandbox's oom_score_adj no lower than containerd's own: some sandboxes (this
    # demo's CI among them) refuse the -998 CRI asks for.
    echo '  restrict_oom_score_adj = true'
    echo '  [plugins."io.containerd.grpc.v1.cri".containerd]'
    echo "    snapshotter = \"$mode\""
    echo '    disable_snapshot_annotations = false'
    echo "  [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"$host\"]"
    echo "    endpoint = [\"http://$host\"]"
  } > "$dir/containerd.toml"
  containerd --config "$dir/containerd.toml" > "$dir/containerd.log" 2>&1 &
  pids+=($!)
  wait_for "containerd ($mode) to answer" ctr -a "$run/c.sock" version
  if [ "$mode" = lazypull ]; then
    wait_for "the lazypull snapshotter to answer through containerd" ctr -a "$run/c.sock" snapshot --snapshotter lazypull ls
  fi
  # The pause image is on a node before any pod.
  wait_for "CRI to pull the pause image" "$bin" cri pull --cri "$run/c.sock" "$pause"
  sync; echo 3 > /proc/sys/vm/drop_caches
  "$bin" cri time-pod --json --cri "$run/c.sock" --name "demo-$mode" "$ref" 'cat /etc/hello.txt' \
    || { echo "demo: the $mode pod failed; containerd log:" >&2; tail -20 "$dir/containerd.log" >&2; exit 1; }
  stop_all
}

echo "== the same image as a pod (CRI, as kubelet starts it): full pull, then lazy"
full=$(pod overlayfs)
lazy=$(pod lazypull)
row() { jq -r --arg m "$1" '[$m, (.sandbox_ms|round), (.pull_ms|round), ((.create_ms + .start_ms)|round), (.ready_ms|round), (.total_ms|round)] | @tsv' <<<"$2" |
  awk -F'\t' '{printf "  %-26s %9s %9s %15s %9s %10s\n", $1, $2, $3, $4, $5, $6}'; }
printf '  %-26s %9s %9s %15s %9s %10s\n' mode "sandbox ms" "pull ms" "create+start ms" "ready ms" "total ms"
row "full pull (overlayfs)" "$full"
row "lazypull (eStargz, lazy)" "$lazy"
awk -v f="$(jq .total_ms <<<"$full")" -v l="$(jq .total_ms <<<"$lazy")" 'BEGIN {printf "  pod running: %.1f s with a full pull, %.1f s lazily (%.0fx faster)\n", f/1000, l/1000, f/l}'
