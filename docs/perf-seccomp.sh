#!/usr/bin/env bash
# Cost of the per-thread seccomp filters (docs/security.md): snapshot-vm pause, the fault
# handler's first-write fault cost and restore to running vCPUs, with the filters on and
# off (--no-seccomp), alternating in one run so both see the same machine load.
# Usage: PMSNAP=target/release/pmsnap docs/perf-seccomp.sh [ROUNDS]
set -euo pipefail
trap 'echo "perf-seccomp.sh: line $LINENO: \`$BASH_COMMAND\` failed" >&2' ERR
BIN=${PMSNAP:-target/release/pmsnap}
ROUNDS=${1:-3}
W=$(mktemp -d /tmp/pmsnap-seccomp.XXXXXX)
POOL=/dev/shm/pmsnap-perf-seccomp.pool
VMM=
cleanup() { [ -n "$VMM" ] && kill -9 "$VMM" 2>/dev/null; rm -rf "$W" "$POOL"; }
trap cleanup EXIT
as --64 -o "$W/p.o" "$(dirname "$0")/../vmm/tests/payload/pattern.S"
objcopy -O binary "$W/p.o" "$W/p.bin"
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval('d' + sys.argv[1]))" "$1"; }
wait_api() { for _ in $(seq 300); do "$BIN" ctl --api-sock "$W/api" status >/dev/null 2>&1 && return 0; sleep 0.1; done; return 1; }
echo "load: $(uptime)"
printf '%-4s %-8s %12s %14s %10s %14s\n' round seccomp pause_us fault_mean_ns faults restore_ms
for r in $(seq "$ROUNDS"); do
  # Alternate which mode runs first, so neither always meets the machine first.
  order="on off"; [ $((r % 2)) -eq 0 ] && order="off on"
  for mode in $order; do
    flag=(); [ "$mode" = off ] && flag=(--no-seccomp)
    rm -f "$POOL" "$W/api"
    "$BIN" run --payload "$W/p.bin" --mem 256M --vcpus 2 --pool "$POOL" --api-sock "$W/api" \
      "${flag[@]}" </dev/null >"$W/out" 2>"$W/err" & VMM=$!
    wait_api
    sleep 1
    CTL=("$BIN" ctl --api-sock "$W/api" --json)
    pause=$("${CTL[@]}" snapshot-vm s1 | json "['pause_us']")
    sleep 2 # the payload rewrites every page: each first write is one fault
    stats=$("${CTL[@]}" stats)
    mean=$(echo "$stats" | json "['fault_handler']['mean_ns']")
    faults=$(echo "$stats" | json "['faults']")
    kill -9 "$VMM"; wait "$VMM" 2>/dev/null || true; VMM=
    rm -f "$W/api"
    t0=$(date +%s%N)
    RUST_LOG=info "$BIN" restore --pool "$POOL" --snapshot s1 --api-sock "$W/api" "${flag[@]}" \
      </dev/null >"$W/rout" 2>"$W/rerr" & VMM=$!
    for _ in $(seq 600); do grep -q "vCPUs running" "$W/rerr" && break; sleep 0.05; done
    ts=$(grep 'vCPUs running' "$W/rerr" | sed -E 's/^\[([^ ]+) .*/\1/')
    t1=$(date -d "$ts" +%s%N)
    kill -9 "$VMM"; wait "$VMM" 2>/dev/null || true; VMM=
    printf '%-4s %-8s %12s %14s %10s %14s\n' "$r" "$mode" "$pause" "$mean" "$faults" "$(( (t1 - t0) / 1000000 ))"
  done
done
echo "load: $(uptime)"
