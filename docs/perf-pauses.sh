#!/usr/bin/env bash
# The parts of a snapshot-vm pause, one line per VMM: for A/B runs of two builds and for
# finding outliers (issue 16 item 3; docs/perf-vm.md, "The pause's hand-offs").
#
# Usage: PMSNAP=target/release/pmsnap docs/perf-pauses.sh SIZE [RUNS]
#   (RUNS=8 by default; WAIT=6 seconds between boot and the first snapshot)
#
# Each run boots the pattern payload (vmm/tests/payload/pattern.S: 2 vCPUs rewriting
# guest RAM at full speed) on a new pool with `pmsnap run --payload`, waits WAIT s, takes
# two `ctl snapshot-vm` and prints, for each, the API's pause_us stop_us capture_us
# store_us and what is left (the resume). Ends with the medians of the two pauses.
. "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/scripts/lib.sh"
pmsnap_init perf-pauses
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${PMSNAP:-target/release/pmsnap}
SIZE=${1:?usage: docs/perf-pauses.sh SIZE [RUNS]}
RUNS=${2:-8}
WAIT=${WAIT:-6}
W=$(mktemp -d /tmp/pmsnap-perf-pauses.XXXXXX)
POOL=/dev/shm/pmsnap-perf-pauses-$$.pool
VMM=
cleanup() {
  if [ -n "$VMM" ]; then kill -9 "$VMM" 2>/dev/null || true; wait "$VMM" 2>/dev/null || true; fi
  rm -rf "$W" "$POOL"
}
trap cleanup EXIT
as --64 -o "$W/p.o" "$root/vmm/tests/payload/pattern.S"
objcopy -O binary "$W/p.o" "$W/p.bin"
echo "load: $(uptime)"
echo "size first: pause stop capture store rest | second: pause stop capture store rest (us)"
for _ in $(seq "$RUNS"); do
  rm -f "$POOL" "$W/api"
  "$BIN" run --payload "$W/p.bin" --mem "$SIZE" --vcpus 2 --pool "$POOL" \
    --api-sock "$W/api" < /dev/null > "$W/out" 2> "$W/err" & VMM=$!
  for _ in $(seq 600); do "$BIN" ctl --api-sock "$W/api" status > /dev/null 2>&1 && break; sleep 0.1; done
  sleep "$WAIT"
  a=$("$BIN" ctl --api-sock "$W/api" --json snapshot-vm s1) || { tail -5 "$W/err"; die "snapshot failed"; }
  b=$("$BIN" ctl --api-sock "$W/api" --json snapshot-vm s2) || { tail -5 "$W/err"; die "snapshot failed"; }
  python3 -c '
import json, sys
parts = []
for x in map(json.loads, sys.argv[2:]):
    v = [x[k] for k in ("pause_us", "stop_us", "capture_us", "store_us")]
    parts.append(" ".join(map(str, v + [v[0] - sum(v[1:])])))
print(sys.argv[1], " | ".join(parts))' "$SIZE" "$a" "$b" | tee -a "$W/lines"
  kill -9 "$VMM"; wait "$VMM" 2>/dev/null || true; VMM=
done
python3 - "$W/lines" << 'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
first = [int(r[1]) for r in rows]
second = [int(r[7]) for r in rows]
print(f"median first pause {statistics.median(first):.0f} us, second {statistics.median(second):.0f} us ({len(rows)} VMMs)")
PY
echo "load: $(uptime)"
