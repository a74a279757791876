#!/usr/bin/env bash
# `make test`: the whole suite (interop with the Go reference library and the real runtime
# required: a missing tool fails the run instead of skipping), then one summary line:
#   make test: N passed, N failed, N skipped (ignored) in N test binaries, wall T s — PASS|FAIL
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
log=$(mktemp /tmp/lazypull-test.XXXXXX.log)
trap 'rm -f "$log"' EXIT
LAZYPULL_INTEROP=required ${CARGO:-cargo} test --workspace --locked "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
wall=$(( $(date +%s) - start ))
# libtest prints one "test result:" line per test binary (and doc-test run).
read -r passed failed ignored binaries < <(awk '
  /^test result:/ {
    for (i = 1; i <= NF; i++) {
      if ($(i) ~ /^passed;?$/) p += $(i-1);
      if ($(i) ~ /^failed;?$/) f += $(i-1);
      if ($(i) ~ /^ignored;?$/) g += $(i-1);
    }
    n++
  }
  END { printf "%d %d %d %d\n", p, f, g, n }' "$log")
verdict=PASS
[ "$rc" -eq 0 ] || verdict=FAIL
echo "make test: $passed passed, $failed failed, $ignored skipped (ignored) in $binaries test binaries, wall ${wall} s — $verdict"
exit "$rc"
