# Sourced by the demo scripts: waiting for servers without fixed sleeps.

# Servers bind port 0 themselves; their port is read back from the kernel: the TCP socket in
# LISTEN state (0A) owned by the process (no probe-then-bind race with other programs).
listen_port() {
  local inode hex
  for inode in $(find "/proc/$1/fd" -lname 'socket:*' -printf '%l\n' 2>/dev/null | tr -dc '0-9\n'); do
    hex=$(awk -v i="$inode" '$4 == "0A" && $10 == i { split($2, a, ":"); print a[2]; exit }' "/proc/$1/net/tcp")
    if [ -n "$hex" ]; then printf '%d\n' "0x$hex"; return 0; fi
  done
  return 1
}
# Waits (up to 20 s) for a command to succeed; fails naming what was awaited.
wait_for() {
  local what=$1; shift
  for _ in $(seq 1 200); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "demo: timed out waiting for $what" >&2; return 1
}
ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
