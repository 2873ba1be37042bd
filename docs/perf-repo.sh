#!/usr/bin/env bash
# Measure exports to a repository (docs/performance.md, "Repository"): full export
# throughput against cp of the same RAM bytes to the same disk, an incremental export
# after writing 1% of RAM, and a second guest of the same image.
# Usage: PMSNAP=target/release/pmsnap PMSNAP_IMAGE_DIR=... docs/perf-repo.sh [MEM] [DIR]
#   MEM: guest RAM (default 1G); DIR: where the repository goes (default /var/tmp, a disk).
. "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/scripts/lib.sh"
pmsnap_init perf-repo
BIN=${PMSNAP:-target/release/pmsnap}
MEM=${1:-1G}
DISK=${2:-/var/tmp}
W=$(mktemp -d /tmp/pmsnap-perf-repo.XXXXXX)
REPO=$DISK/pmsnap-perf-repo.$$
cleanup() {
  if [ -n "${VMM:-}" ]; then kill -9 "$VMM" 2>/dev/null || true; fi
  if [ -n "${HOLD:-}" ]; then kill "$HOLD" 2>/dev/null || true; fi
  rm -rf "$W" "$REPO" "$DISK/pmsnap-perf-cp.$$" /dev/shm/pmsnap-perf-repo-*.pool
}
trap cleanup EXIT
echo "load: $(uptime)"
MIB=$(( $(numfmt --from=iec "$MEM") >> 20 )); PAGES=$(( MIB * 256 ))
json() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
wait_out() { # file needle timeout_s
  for _ in $(seq 1 $(( $3 * 10 ))); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; return 1; }
ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
# Boot a guest on pool $1, snapshot `s1`; with a second argument also write 1% of RAM in
# the guest and snapshot `s2`; then kill the VMM (the pool keeps the snapshots).
guest() {
  local pool=$1
  rm -f "$pool" "$W/in" "$W/out"; mkfifo "$W/in"; sleep 100000 > "$W/in" & HOLD=$!
  "$BIN" run --no-template --mem "$MEM" --pool "$pool" --api-sock "$W/api" < "$W/in" > "$W/out" 2> "$W/err" & VMM=$!
  wait_out "$W/out" "pmsnap-guest: ready" 600 || { echo "no boot"; cat "$W/err"; exit 1; }
  sleep 2
  "$BIN" ctl --api-sock "$W/api" snapshot-vm s1 > /dev/null
  if [ -n "${2:-}" ]; then
    echo "dd if=/dev/urandom of=/tmp/fill bs=4096 count=$(( PAGES / 100 )) 2>/dev/null; echo FILLED-\$((1+1))" > "$W/in"
    wait_out "$W/out" "FILLED-2" 900 || { echo "fill timed out"; exit 1; }
    "$BIN" ctl --api-sock "$W/api" snapshot-vm s2 > /dev/null
  fi
  kill -9 "$VMM"; wait "$VMM" 2>/dev/null || true; VMM=
  kill "$HOLD"; HOLD=
}
A=/dev/shm/pmsnap-perf-repo-a.pool; B=/dev/shm/pmsnap-perf-repo-b.pool
guest "$A" with-fill
# Baseline: cp of the RAM bytes (the pool's RAM area) to the same disk, synced.
T0=$(date +%s%N)
# The RAM area's offset: superblock field ram_offset (bytes 40..48, docs/pool-format.md).
RAM_MIB=$(python3 -c "import struct; f=open('$A','rb'); f.seek(40); print(struct.unpack('<Q', f.read(8))[0] >> 20)")
dd if="$A" of="$DISK/pmsnap-perf-cp.$$" bs=1M skip="$RAM_MIB" count="$MIB" status=none conv=fsync
CP_MS=$(ms_since "$T0"); rm -f "$DISK/pmsnap-perf-cp.$$"
T0=$(date +%s%N)
R1=$("$BIN" export s1 --pool "$A" --to "$REPO" --json)
FULL_MS=$(ms_since "$T0")
sync
echo "mem=$MEM full export of s1: $FULL_MS ms ($(echo "$R1" | json bytes_written) bytes written, $(echo "$R1" | json zero_pages) zero pages of $PAGES); cp of $MIB MiB to the same disk: $CP_MS ms; throughput ratio export/cp = $(python3 -c "print(round($CP_MS/$FULL_MS, 2))")"
T0=$(date +%s%N)
R2=$("$BIN" export s2 --pool "$A" --to "$REPO" --json)
INC_MS=$(ms_since "$T0")
echo "mem=$MEM incremental export of s2 (1% of RAM written after s1): $INC_MS ms, $(echo "$R2" | json bytes_written) bytes written vs $(echo "$R1" | json bytes_written) for the full export: ratio $(python3 -c "print(round($(echo "$R2" | json bytes_written)/$(echo "$R1" | json bytes_written), 4))")"
guest "$B"
R3=$("$BIN" export s1 --as b-s1 --pool "$B" --to "$REPO" --json)
echo "mem=$MEM second guest of the same image: $(echo "$R3" | json bytes_written) bytes written vs $(echo "$R1" | json bytes_written) for the first: ratio $(python3 -c "print(round($(echo "$R3" | json bytes_written)/$(echo "$R1" | json bytes_written), 3))")"
T0=$(date +%s%N)
"$BIN" import s1 --from "$REPO" --pool /dev/shm/pmsnap-perf-repo-c.pool --json > /dev/null
echo "mem=$MEM import of s1 into a new pool: $(ms_since "$T0") ms"
du -sh "$REPO"
# A guest whose RAM is in use: the pattern payload (vmm/tests/payload/pattern.S) writes
# every page of its region with distinct content. p1 is taken, the vCPUs run for a few
# milliseconds (the payload writes about 1% of RAM), p2 is taken; p1 exported in full,
# then p2 incrementally.
as --64 -o "$W/p.o" "$(dirname "${BASH_SOURCE[0]}")/../vmm/tests/payload/pattern.S"
objcopy -O binary "$W/p.o" "$W/p.bin"
P=/dev/shm/pmsnap-perf-repo-p.pool
"$BIN" run --payload "$W/p.bin" --mem "$MEM" --pool "$P" --api-sock "$W/p.api" < /dev/null > /dev/null 2> "$W/p.err" & VMM=$!
# PAYLOAD_WARMUP (s, default 20): until every page of RAM holds distinct content;
# PAYLOAD_WINDOW (s, default 0.3): how long the vCPUs run between p1 and p2 (the pages
# written then are counted and printed; about 1% of RAM on an idle machine).
sleep "${PAYLOAD_WARMUP:-20}"
"$BIN" ctl --api-sock "$W/p.api" pause > /dev/null
"$BIN" ctl --api-sock "$W/p.api" snapshot-vm p1 > /dev/null
"$BIN" ctl --api-sock "$W/p.api" resume > /dev/null; sleep "${PAYLOAD_WINDOW:-0.3}"
"$BIN" ctl --api-sock "$W/p.api" pause > /dev/null
"$BIN" ctl --api-sock "$W/p.api" snapshot-vm p2 > /dev/null
DIRTY=$("$BIN" ctl --api-sock "$W/p.api" --json dirty p1 | json pages)
kill -9 "$VMM"; wait "$VMM" 2>/dev/null || true; VMM=
P1=$("$BIN" export p1 --pool "$P" --to "$REPO" --json)
P2=$("$BIN" export p2 --pool "$P" --to "$REPO" --json)
rm -f "$P"
echo "mem=$MEM payload guest (RAM in use): full export of p1 $(echo "$P1" | json bytes_written) bytes; p2 after $DIRTY pages ($(python3 -c "print(round(100*$DIRTY/$PAGES, 2))")% of RAM) were written: $(echo "$P2" | json bytes_written) bytes, ratio $(python3 -c "print(round($(echo "$P2" | json bytes_written)/$(echo "$P1" | json bytes_written), 4))")"
echo "load: $(uptime)"
