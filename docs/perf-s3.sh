#!/usr/bin/env bash
# Measure a repository in an S3 bucket (docs/perf-s3.md), against one SeaweedFS of its own
# (scripts/objstore.sh, data in DIR):
#  A. a synthetic VM snapshot of MEM whose pages are all distinct and non-zero
#     (repo/examples/s3bench.rs): full upload and full download (through a fresh pack
#     cache, and again without one) against curl moving the same pack bytes to and from
#     the same server, 8 at once; the incremental upload after 1% of the pages changed.
#  B. a booted guest of MEM (mostly zero pages): `pmsnap export` to the bucket, the
#     incremental export after the guest wrote 1% of RAM, `pmsnap import` cold and warm.
# Usage: PMSNAP=target/release/pmsnap S3BENCH=target/release/examples/s3bench
#        PMSNAP_IMAGE_DIR=... docs/perf-s3.sh [MEM] [FILL%] [DIR]
#   MEM: RAM (default 1G); FILL%: share of the guest's RAM it fills before s1 (default 0:
#   filling is slow under kvm_pvm, whose guest kernel code is emulated); DIR: where the
#   object store keeps its data (default /var/tmp, a disk).
#   PERF_S3_ONLY_A=1: run part A only (no guest; PMSNAP and PMSNAP_IMAGE_DIR unused).
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$root/scripts/lib.sh"
pmsnap_init perf-s3
BIN=${PMSNAP:-target/release/pmsnap}
BENCH=${S3BENCH:-target/release/examples/s3bench}
MEM=${1:-1G}
FILL=${2:-0}
DISK=${3:-/var/tmp}
W=$(mktemp -d /tmp/pmsnap-perf-s3.XXXXXX)
OS=$DISK/pmsnap-perf-s3-objstore.$$
PAR=8
cleanup() {
  if [ -n "${VMM:-}" ]; then kill -9 "$VMM" 2>/dev/null || true; fi
  if [ -n "${HOLD:-}" ]; then kill "$HOLD" 2>/dev/null || true; fi
  "$root/scripts/objstore.sh" stop "$OS" 2>/dev/null || true
  rm -rf "$W" "$OS" /dev/shm/pmsnap-perf-s3-*.pool /dev/shm/pmsnap-perf-s3-dl.$$
}
trap cleanup EXIT
echo "load: $(uptime)"
MIB=$(( $(numfmt --from=iec "$MEM") >> 20 )); PAGES=$(( MIB * 256 ))
json() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
wait_out() { # file needle timeout_s
  for _ in $(seq 1 $(( $3 * 10 ))); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; return 1; }
ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
ratio() { python3 -c "print(round(($1)/($2), 3))"; }
mibs() { python3 -c "print(round($1/1048576/($2/1000), 1))"; } # bytes ms
jl() { python3 -c "import json,sys; [print(json.loads(l)['$2']) for l in sys.stdin if json.loads(l)['step']=='$1']"; }

step "object store"
"$root/scripts/objstore.sh" start "$OS" 2>/dev/null
eval "$("$root/scripts/objstore.sh" env "$OS")"
export PMSNAP_CACHE_DIR=$W/cache
S3="s3://pmsnap/perf"
sign=(--aws-sigv4 "aws:amz:$AWS_REGION:s3" --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY")
put_all() { # local repository dir, key prefix
  (cd "$1" && find packs index snapshots -type f) |
    xargs -P "$PAR" -I{} curl -sf "${sign[@]}" -T "$1/{}" "$AWS_ENDPOINT_URL/pmsnap/$2/{}"
}
get_packs() { # local repository dir (names), key prefix, target dir
  (cd "$1" && find packs -type f) |
    xargs -P "$PAR" -I{} sh -c 'curl -sf "$@" -o "$0/$(basename {})" "$AWS_ENDPOINT_URL/pmsnap/'"$2"'/{}"' "$3" "${sign[@]}"
}

step "A. synthetic $MEM snapshot, every page distinct (s3bench)"
OUT=$("$BENCH" "s3://pmsnap/bench" "$MIB" "$W/bench-cache")
echo "$OUT"
B_UP_MS=$(echo "$OUT" | jl "full export" ms); B_UP_B=$(echo "$OUT" | jl "full export" bytes_written)
B_RD_MS=$(echo "$OUT" | jl "full read" ms); B_RD_B=$(echo "$OUT" | jl "full read" fetched_bytes)
B_NC_MS=$(echo "$OUT" | jl "full read, no cache" ms); B_NC_B=$(echo "$OUT" | jl "full read, no cache" fetched_bytes)
B_INC_MS=$(echo "$OUT" | jl "incremental export" ms); B_INC_B=$(echo "$OUT" | jl "incremental export" bytes_written)
"$BENCH" "$W/bench-dir" "$MIB" "$W/bench-cache2" > "$W/bench-dir.out"
echo "the same to a directory on /tmp (no network): $(cat "$W/bench-dir.out" | tr '\n' ' ')"
T0=$(date +%s%N); put_all "$W/bench-dir" bench-curl; C_UP_MS=$(ms_since "$T0")
C_UP_B=$(cd "$W/bench-dir" && du -cb packs index snapshots | tail -1 | cut -f1)
mkdir -p "/dev/shm/pmsnap-perf-s3-dl.$$"
T0=$(date +%s%N); get_packs "$W/bench-dir" bench-curl "/dev/shm/pmsnap-perf-s3-dl.$$"; C_DN_MS=$(ms_since "$T0")
C_DN_B=$(du -sb "/dev/shm/pmsnap-perf-s3-dl.$$" | cut -f1); rm -rf "/dev/shm/pmsnap-perf-s3-dl.$$"
echo "A full upload: pmsnap $B_UP_MS ms for $B_UP_B bytes ($(mibs "$B_UP_B" "$B_UP_MS") MiB/s); curl PUT x$PAR $C_UP_MS ms for $C_UP_B bytes ($(mibs "$C_UP_B" "$C_UP_MS") MiB/s)"
echo "RATIO A upload throughput pmsnap/curl = $(ratio "$B_UP_B/$B_UP_MS" "$C_UP_B/$C_UP_MS")"
echo "A full download: pmsnap $B_RD_MS ms for $B_RD_B bytes ($(mibs "$B_RD_B" "$B_RD_MS") MiB/s, every page read and checked); curl GET x$PAR of the packs $C_DN_MS ms for $C_DN_B bytes ($(mibs "$C_DN_B" "$C_DN_MS") MiB/s)"
echo "RATIO A download throughput pmsnap/curl = $(ratio "$B_RD_B/$B_RD_MS" "$C_DN_B/$C_DN_MS")"
if [ -n "$B_NC_MS" ]; then # (an s3bench from before 2026-12-07 has no such step)
  echo "A full download without a pack cache (import --cache-mib 0): pmsnap $B_NC_MS ms for $B_NC_B bytes of pages ($(mibs "$B_NC_B" "$B_NC_MS") MiB/s)"
  echo "RATIO A download throughput, no cache, pmsnap/curl = $(ratio "$B_NC_B/$B_NC_MS" "$C_DN_B/$C_DN_MS")"
fi
echo "A incremental upload (1% of pages changed): $B_INC_MS ms, $B_INC_B bytes"
echo "RATIO A incremental/full bytes = $(ratio "$B_INC_B" "$B_UP_B"), time = $(ratio "$B_INC_MS" "$B_UP_MS")"

if [ -n "${PERF_S3_ONLY_A:-}" ]; then
  echo "load: $(uptime)"
  exit 0
fi

step "B. a booted guest of $MEM"

step "B guest: boot, fill $FILL% of RAM, snapshot s1, write 1% of RAM, snapshot s2"
A=/dev/shm/pmsnap-perf-s3-a.pool
rm -f "$A" "$W/in" "$W/out"; mkfifo "$W/in"; sleep 100000 > "$W/in" & HOLD=$!
"$BIN" run --no-template --mem "$MEM" --pool "$A" --api-sock "$W/api" < "$W/in" > "$W/out" 2> "$W/err" & VMM=$!
wait_out "$W/out" "pmsnap-guest: ready" 600 || { echo "no boot"; cat "$W/err"; exit 1; }
sleep 2
if [ "$FILL" -gt 0 ]; then
  # Distinct pages without the guest kernel's random generator (guest kernel code is
  # slow under kvm_pvm): the decimal numbers from 1 up, FILL% of RAM of them.
  echo "mount -t tmpfs -o size=95% tmpfs /mnt && seq 1 999999999 | head -c $(( MIB * FILL / 100 * 1048576 )) > /mnt/fill; echo FILLED-\$((1+0))" > "$W/in"
  wait_out "$W/out" "FILLED-1" 900 || { echo "fill timed out"; tail "$W/out"; exit 1; }
fi
"$BIN" ctl --api-sock "$W/api" snapshot-vm s1 > /dev/null
echo "dd if=/dev/urandom of=/tmp/one bs=4096 count=$(( PAGES / 100 )) 2>/dev/null; echo FILLED-\$((1+1))" > "$W/in"
wait_out "$W/out" "FILLED-2" 900 || { echo "1% write timed out"; exit 1; }
"$BIN" ctl --api-sock "$W/api" snapshot-vm s2 > /dev/null
kill -9 "$VMM"; wait "$VMM" 2>/dev/null || true; VMM=
kill "$HOLD"; HOLD=

step "B full upload"
T0=$(date +%s%N)
R1=$("$BIN" export s1 --pool "$A" --to "$S3" --json)
UP_MS=$(ms_since "$T0")
UP_B=$(echo "$R1" | json bytes_written)
echo "mem=$MEM fill=$FILL% full upload of s1: $UP_MS ms, $UP_B bytes written ($(echo "$R1" | json zero_pages) zero pages of $PAGES), $(python3 -c "print(round($UP_B/1048576/($UP_MS/1000), 1))") MiB/s"

echo "RATIO B upload throughput pmsnap/curl(A) = $(ratio "$UP_B/$UP_MS" "$C_UP_B/$C_UP_MS") (fixed costs dominate: few bytes)"

step "B incremental upload"
T0=$(date +%s%N)
R2=$("$BIN" export s2 --pool "$A" --to "$S3" --json)
INC_MS=$(ms_since "$T0")
INC_B=$(echo "$R2" | json bytes_written)
echo "mem=$MEM incremental upload of s2 (1% of RAM written after s1): $INC_MS ms, $INC_B bytes written"
echo "RATIO B incremental/full bytes = $(ratio "$INC_B" "$UP_B"), time = $(ratio "$INC_MS" "$UP_MS")"

step "B second guest of the same image"
# Another boot of the same image (what a second host or a second guest of it exports):
# what it adds to the bucket beside the first.
G=/dev/shm/pmsnap-perf-s3-g.pool
rm -f "$G" "$W/in" "$W/out"; mkfifo "$W/in"; sleep 100000 > "$W/in" & HOLD=$!
"$BIN" run --no-template --mem "$MEM" --pool "$G" --api-sock "$W/api" < "$W/in" > "$W/out" 2> "$W/err" & VMM=$!
wait_out "$W/out" "pmsnap-guest: ready" 600 || { echo "no boot"; cat "$W/err"; exit 1; }
sleep 2
"$BIN" ctl --api-sock "$W/api" snapshot-vm s1 > /dev/null
kill -9 "$VMM"; wait "$VMM" 2>/dev/null || true; VMM=
kill "$HOLD"; HOLD=
R5=$("$BIN" export s1 --as g-s1 --pool "$G" --to "$S3" --json)
rm -f "$G"
echo "mem=$MEM second guest of the same image into the same bucket: $(echo "$R5" | json bytes_written) bytes written vs $UP_B for the first"
echo "RATIO B second guest/first bytes = $(ratio "$(echo "$R5" | json bytes_written)" "$UP_B")"

step "B full download (import)"
C=/dev/shm/pmsnap-perf-s3-c.pool
T0=$(date +%s%N)
R3=$("$BIN" import s1 --from "$S3" --pool "$C" --json)
DOWN_MS=$(ms_since "$T0")
DOWN_B=$(echo "$R3" | json fetched_bytes)
echo "mem=$MEM import of s1 from the bucket into a new pool (cold cache): $DOWN_MS ms, $DOWN_B bytes fetched, $(python3 -c "print(round($DOWN_B/1048576/($DOWN_MS/1000), 1))") MiB/s"
rm -f "$C"
T0=$(date +%s%N)
R4=$("$BIN" import s1 --from "$S3" --pool "$C" --json)
echo "second import of s1 on this host (warm pack cache): $(ms_since "$T0") ms, $(echo "$R4" | json fetched_bytes) bytes fetched"
echo "load: $(uptime)"
