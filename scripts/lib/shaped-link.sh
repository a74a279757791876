# Sourced by the benchmarks: a shaped link to the peer registry's storage. The registry runs in a
# network namespace whose lo has a tbf qdisc (bandwidth); `lazypull-linkem` relays into it from
# the host's 127.0.0.1:$LINK_PORT adding the round trip (latency). All traffic stays on loopback.
# Needs: $work (scratch dir), $NETNS, $RUN (the peer run dir with registry.yml), $linkem (the
# relay binary), $LINK_PORT.

link_down() {
  [ -f "$work/linkem.pid" ] && { kill "$(cat "$work/linkem.pid")" 2>/dev/null || true; rm -f "$work/linkem.pid"; }
  [ -f "$work/netreg.pid" ] && { kill "$(cat "$work/netreg.pid")" 2>/dev/null || true; rm -f "$work/netreg.pid"; }
  ip netns del "$NETNS" 2>/dev/null || true
}

link_up() { # $1 = rate (e.g. 100mbit), $2 = rtt ms
  link_down
  ip netns add "$NETNS"
  ip netns exec "$NETNS" ip link set lo up
  # burst: enough for the rate at HZ granularity and at least a 64 KiB loopback packet.
  ip netns exec "$NETNS" tc qdisc replace dev lo root tbf rate "$1" burst 1mb latency 200ms
  sed -e "s#addr: .*#addr: 127.0.0.1:5000#" "$RUN/registry.yml" > "$work/netreg.yml"
  ip netns exec "$NETNS" setsid docker-registry serve "$work/netreg.yml" > "$work/netreg.log" 2>&1 < /dev/null &
  echo $! > "$work/netreg.pid"
  setsid "$linkem" --listen "127.0.0.1:$LINK_PORT" --upstream 127.0.0.1:5000 --netns "$NETNS" --rtt-ms "$2" > "$work/linkem.log" 2>&1 < /dev/null &
  echo $! > "$work/linkem.pid"
  for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$LINK_PORT/v2/" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "shaped link did not come up" >&2; cat "$work/netreg.log" "$work/linkem.log" >&2; exit 1
}

# "loopback" | "<rate>-<rtt>ms" (e.g. 1gbit-2ms) -> the registry host to use, bringing the link up.
link_for() {
  case "$1" in
    loopback) link_down; echo "$REG" ;;
    *-*ms) local rate=${1%-*} rtt=${1##*-}; link_up "$rate" "${rtt%ms}" >&2; echo "127.0.0.1:$LINK_PORT" ;;
    *) echo "unknown link $1" >&2; exit 2 ;;
  esac
}
