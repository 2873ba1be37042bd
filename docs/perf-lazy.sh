#!/usr/bin/env bash
# Measure lazy restore (docs/performance.md, "Lazy restore"): process start to running
# vCPUs at 1 GiB and 4 GiB, first-touch page fetches, time until every page is in against
# `pmsnap import`, and 8 clones of a 256 MiB guest side by side.
# Usage: PMSNAP=target/release/pmsnap PMSNAP_IMAGE_DIR=... docs/perf-lazy.sh [MEMS] [DIR] [PARTS]
#   MEMS: guest sizes (default "1G 4G"); DIR: where repositories go (default /var/tmp);
#   PARTS: which parts run (default "restore template clones").
. "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/scripts/lib.sh"
pmsnap_init perf-lazy
BIN=${PMSNAP:-target/release/pmsnap}
MEMS=${1:-1G 4G}
DISK=${2:-/var/tmp}
PARTS=" ${3:-restore template clones} "
part() { [[ $PARTS == *" $1 "* ]]; }
W=$(mktemp -d /tmp/pmsnap-perf-lazy.XXXXXX)
REPO=$DISK/pmsnap-perf-lazy.$$
SHM=/dev/shm/pmsnap-perf-lazy.$$
mkdir -p "$SHM"
cleanup() {
  pkill -9 -f "$SHM/" 2>/dev/null || true
  if [ -n "${HOLD:-}" ]; then kill "$HOLD" 2>/dev/null || true; fi
  rm -rf "$W" "$REPO" "$SHM"
}
trap cleanup EXIT
echo "load: $(uptime)"
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print(d$1)"; }
wait_out() { # file needle timeout_s
  for _ in $(seq 1 $(( $3 * 10 ))); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; return 1; }
ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
# Boot a guest of $1 RAM, snapshot it as s1 once it is ready, export s1 live to
# $REPO/$1, kill the VMM and remove its pool.
exported_guest() {
  local mem=$1 pool=$SHM/boot.pool
  rm -f "$W/in" "$W/out"; mkfifo "$W/in"; sleep 100000 > "$W/in" & HOLD=$!
  "$BIN" run --no-template --mem "$mem" --block-area 64M --pool "$pool" --api-sock "$W/boot.sock" \
    < "$W/in" > "$W/out" 2> "$W/boot.err" & local vmm=$!
  wait_out "$W/out" "pmsnap-guest: ready" 900 || { echo "no boot"; cat "$W/boot.err"; exit 1; }
  sleep 2
  "$BIN" ctl --api-sock "$W/boot.sock" snapshot-vm s1 > /dev/null
  local t0; t0=$(date +%s%N)
  "$BIN" ctl --api-sock "$W/boot.sock" --json export s1 --to "$REPO/$mem" > "$W/export.json"
  echo "mem=$mem live export of s1: $(ms_since "$t0") ms, $(json "['bytes_written']" < "$W/export.json") bytes written"
  kill -9 "$vmm"; wait "$vmm" 2>/dev/null || true
  kill "$HOLD"; HOLD=
  rm -f "$pool"
}
# Lazy restore of s1 from $REPO/$1 into a new pool; prints the start-to-running time and,
# once every page is in, the fill's figures.
lazy_restore() {
  local mem=$1 pool=$SHM/lazy.pool
  rm -f "$pool" "$pool.filling"
  "$BIN" restore s1 --from "$REPO/$mem" --pool "$pool" --block-area 64M \
    --api-sock "$W/lazy.sock" < /dev/null > /dev/null 2> "$W/lazy.err" & local vmm=$!
  wait_out "$W/lazy.err" "vCPUs running" 60 || { echo "no restore"; cat "$W/lazy.err"; exit 1; }
  local run; run=$(grep -o 'vCPUs running [0-9.]*[mµ]*s after start' "$W/lazy.err" | awk '{print $3}')
  for _ in $(seq 1 600); do
    "$BIN" ctl --api-sock "$W/lazy.sock" --json status > "$W/status.json" 2>/dev/null || true
    [ "$(json "['lazy_fill']['complete']" < "$W/status.json" 2>/dev/null)" = True ] && break
    sleep 0.1
  done
  echo "mem=$mem lazy restore: vCPUs running $run after process start; every page in after $(json "['lazy_fill']['elapsed_ms']" < "$W/status.json") ms; $(json "['lazy_fill']['demanded']" < "$W/status.json") pages on first touch, p50 $(json "['lazy_fill']['first_touch_p50_us']" < "$W/status.json") us, p99 $(json "['lazy_fill']['first_touch_p99_us']" < "$W/status.json") us"
  kill -9 "$vmm"; wait "$vmm" 2>/dev/null || true
  rm -f "$pool" "$pool.filling"
}
part restore || MEMS=""
for MEM in $MEMS; do
  exported_guest "$MEM"
  T0=$(date +%s%N)
  "$BIN" import s1 --from "$REPO/$MEM" --pool "$SHM/import.pool" --json > /dev/null
  echo "mem=$MEM import of s1 into a new pool (every page, eager): $(ms_since "$T0") ms"
  rm -f "$SHM/import.pool"
  for _ in 1 2 3; do lazy_restore "$MEM"; done
  rm -rf "${REPO:?}/$MEM"
done
# `pmsnap run` to a shell that answers: a cold boot (which keeps the ready template)
# against a run from that template.
to_shell() { # tag; prints ms from start to the shell's answer
  local tag=$1 t0; rm -f "$W/$tag.in" "$W/$tag.out"; mkfifo "$W/$tag.in"
  sleep 100000 > "$W/$tag.in" & local hold=$!
  t0=$(date +%s%N)
  PMSNAP_TEMPLATE_DIR=$W/templates "$BIN" run --mem 256M < "$W/$tag.in" > "$W/$tag.out" 2> "$W/$tag.err" & local vmm=$!
  exec 9> "$W/$tag.in"
  # One probe line per 0.5 s, the answer looked for every 20 ms: faster typing floods the
  # guest's console (each echoed byte is a VM exit) and delays the answer it measures.
  for _ in $(seq 1 1200); do
    echo 'echo shell-$((40+2))' >&9
    for _ in $(seq 1 25); do
      grep -q "shell-42" "$W/$tag.out" && break 2
      sleep 0.02
    done
  done
  echo "$(ms_since "$t0")"
  if [ "$tag" = cold ]; then wait_out "$W/$tag.err" "kept the guest's ready state" 300 || true; fi
  echo 'poweroff -f' >&9; exec 9>&-
  wait "$vmm" 2>/dev/null || true; kill "$hold" 2>/dev/null || true
}
if part template; then
  COLD_MS=$(to_shell cold)
  for run in 1 2 3; do
    WARM_MS=$(to_shell warm)
    grep -q "starting from the ready template" "$W/warm.err" || { echo "the second run did not start from the template"; cat "$W/warm.err"; exit 1; }
    echo "pmsnap run, 256 MiB, start to a shell that answers: cold boot $COLD_MS ms, from the ready template $WARM_MS ms (ratio $(python3 -c "print(round($WARM_MS/$COLD_MS, 3))"), run $run)"
  done
fi
part clones || { echo "load: $(uptime)"; exit 0; }
# 8 clones of a 256 MiB guest, on demand only, side by side.
exported_guest 256M
PIDS=()
for i in $(seq 1 8); do
  "$BIN" restore s1 --from "$REPO/256M" --pool "$SHM/clone$i.pool" --fill on-demand \
    --block-area 16M --api-sock "$W/clone$i.sock" < /dev/null > /dev/null 2> "$W/clone$i.err" &
  PIDS+=($!)
done
sleep 20
TOTAL=0
for i in $(seq 1 8); do
  "$BIN" ctl --api-sock "$W/clone$i.sock" --json status > "$W/c.json"
  PRESENT=$(json "['lazy_fill']['present']" < "$W/c.json")
  ANON=$(awk '/RssAnon/ {print $2}' "/proc/${PIDS[$((i-1))]}/status")
  FILE=$(( $(stat -c '%b * %B' "$SHM/clone$i.pool") ))
  echo "clone $i: $PRESENT of 65536 pages present ($(( PRESENT * 4 / 1024 )) MiB), pool file $(( FILE >> 20 )) MiB allocated (16 MiB block area and metadata included), VMM anonymous memory $(( ANON / 1024 )) MiB"
  TOTAL=$(( TOTAL + FILE + ANON * 1024 ))
done
echo "8 clones of a 256 MiB guest: host memory $(( TOTAL >> 20 )) MiB in all, $(( (TOTAL >> 20) / 8 )) MiB per clone (a full copy each would be 8 x 256 MiB of RAM alone)"
for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
echo "load: $(uptime)"
