# A lazypull snapshotter of one bench script, registered with the peer's private containerd
# (../shared/peer/04-containerd.sh). Sourced after setting: work (the script's work dir, holding
# snapshotter.toml), bin, LP_ROOT (the snapshotter's root), LP_SOCK, PEER, RUN, and ctr_ (ctr
# on the script's namespace).

# Stops our snapshotter and its layer daemons (they outlive it by design) and detaches what
# they left mounted under LP_ROOT.
lp_stop() {
  if [ -f "$work/snapshotter.pid" ]; then
    kill "$(cat "$work/snapshotter.pid")" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$(cat "$work/snapshotter.pid")" 2>/dev/null || break; sleep 0.1; done
    rm -f "$work/snapshotter.pid"
  fi
  pkill -f "lazypull mount .*--serve-config $LP_ROOT" 2>/dev/null || true
  for _ in $(seq 1 100); do pgrep -f "lazypull mount .*--serve-config $LP_ROOT" >/dev/null || break; sleep 0.05; done
  awk -v r="$LP_ROOT" '$2 ~ "^"r {print $2}' /proc/self/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
}

# Starts it afresh (empty root), then containerd with it as a proxy plugin, and returns once a
# real call gets through (containerd's proxy client redials with backoff).
lp_start_fresh() {
  lp_stop; rm -rf "$LP_ROOT"; mkdir -p "$(dirname "$LP_SOCK")"; rm -f "$LP_SOCK"
  setsid "$bin" snapshotter --config "$work/snapshotter.toml" > "$work/snapshotter.log" 2>&1 < /dev/null &
  echo $! > "$work/snapshotter.pid"
  for _ in $(seq 1 100); do [ -S "$LP_SOCK" ] && break; sleep 0.05; done
  "$PEER/04-containerd.sh" start >/dev/null
  grep -q lazypull "$RUN/containerd.toml" || "$PEER/04-containerd.sh" restart >/dev/null
  for _ in $(seq 1 100); do
    ctr_ snapshot --snapshotter lazypull prepare lp-probe >/dev/null 2>&1 && { ctr_ snapshot --snapshotter lazypull rm lp-probe >/dev/null 2>&1; return 0; }
    sleep 0.2
  done
  echo "the lazypull snapshotter does not answer through containerd" >&2; return 1
}

# Removes the script's containers and images, then stops the snapshotter (an EXIT trap).
lp_cleanup() {
  for c in $(ctr_ c ls -q 2>/dev/null); do ctr_ task rm -f "$c" >/dev/null 2>&1 || true; ctr_ c rm "$c" >/dev/null 2>&1 || true; done
  for i in $(ctr_ image ls -q 2>/dev/null); do ctr_ image rm --sync "$i" >/dev/null 2>&1 || true; done
  lp_stop
}
