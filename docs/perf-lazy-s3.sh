#!/usr/bin/env bash
# Lazy restore of a payload guest from a bucket (docs/perf-lazy.md, "Touch order" and
# "8 clones from one bucket"), against one SeaweedFS of its own (scripts/objstore.sh):
#  A. touch order: the pattern payload (vmm/tests/payload/pattern.S, every vCPU rewrites
#     its slice of RAM page by page, round after round) runs, `snapshot-vm s1`, runs on
#     for a moment, then s1 is exported live to s3://pmsnap/order (the manifest records
#     the order the guest wrote pages in after s1). RUNS lazy restores with the touch
#     order and RUNS with --ignore-touch-order, alternating, each with a fresh pack cache:
#     first-touch stalls (pages fetched because a vCPU waited for them), their p50/p99,
#     the time of the last stall (the guest's working set resident: it waits no more)
#     and the time until every page is in, from the VMM's status polled every 20 ms.
#  B. 8 clones at once: 8 lazy restores of s1 (--fill background) from the bucket,
#     started together and sharing one pack cache directory, run until every page of
#     every clone is in; then the bytes the S3 gateway sent (its metric
#     SeaweedFS_s3_bucket_traffic_sent_bytes_total, before and after), the bytes each
#     clone says it fetched (lazy_fill.fetched_bytes) and the snapshot's stored size.
# Usage: PMSNAP=target/release/pmsnap [PARTS="A B"] docs/perf-lazy-s3.sh [MEM] [RUNS] [DIR]
#   MEM: guest RAM (default 256M); RUNS: restores per mode in A (default 3); DIR: where
#   the object store keeps its data (default /var/tmp, a disk). PARTS: which parts to
#   run (B alone works with a build older than the touch order, to compare).
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$root/scripts/lib.sh"
pmsnap_init perf-lazy-s3
BIN=$(readlink -f "${PMSNAP:-target/release/pmsnap}")
MEM=${1:-256M}
RUNS=${2:-3}
DISK=${3:-/var/tmp}
W=$(mktemp -d /tmp/pmsnap-perf-lazy-s3.XXXXXX)
OS=$DISK/pmsnap-perf-lazy-s3-objstore.$$
SHM=/dev/shm/pmsnap-perf-lazy-s3.$$
mkdir -p "$SHM"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  "$root/scripts/objstore.sh" stop "$OS" >/dev/null 2>&1 || true
  rm -rf "$W" "$OS" "$SHM"
}
trap cleanup EXIT
echo "load: $(uptime)"
"$root/scripts/objstore.sh" start "$OS" >/dev/null 2>&1 || { echo "no object store"; exit 1; }
eval "$("$root/scripts/objstore.sh" env "$OS")"
wait_out() { # file needle timeout_s
  for _ in $(seq 1 $(( $3 * 10 ))); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; return 1; }
sent() { # bytes the S3 gateway sent for bucket pmsnap so far
  curl -s "$PMSNAP_OBJSTORE_METRICS" | python3 -c '
import sys
for l in sys.stdin:
    if l.startswith("SeaweedFS_s3_bucket_traffic_sent_bytes_total{bucket=\"pmsnap\"}"):
        print(int(float(l.split()[-1]))); break
else: print(0)'; }
# GET /v1/status on API socket $1 every 20 ms until lazy_fill.complete (at most $2 s);
# prints one line of figures.
poll() {
  python3 - "$1" "$2" <<'EOF'
import json, socket, sys, time
sock, limit = sys.argv[1], float(sys.argv[2])
def status():
    s = socket.socket(socket.AF_UNIX); s.connect(sock)
    s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    d = b""
    while True:
        b = s.recv(65536)
        if not b: break
        d += b
    s.close()
    return json.loads(d.split(b"\r\n\r\n", 1)[1])["lazy_fill"]
t0 = time.monotonic(); last, last_stall_ms, f = 0, 0, None
while time.monotonic() - t0 < limit:
    try: f = status()
    except Exception: time.sleep(0.02); continue
    stalls = f.get("faults", f["demanded"])
    if stalls > last:
        last, last_stall_ms = stalls, f["elapsed_ms"]
    if f["complete"]: break
    time.sleep(0.02)
print(f"stalls {f.get('faults')} ({f['demanded']} read on demand, p50 {f['first_touch_p50_us']} us, p99 {f['first_touch_p99_us']} us), "
      f"last stall at {last_stall_ms} ms, every page in after {f['elapsed_ms']} ms; "
      f"touch order {f.get('hint_pages', 0)} pages, {f.get('hinted_pages', 0)} read by it; "
      f"fetched {f.get('fetched_bytes')} bytes; complete={f['complete']}")
EOF
}
# The pattern payload, assembled.
as --64 -o "$W/p.o" "$root/vmm/tests/payload/pattern.S" && objcopy -O binary "$W/p.o" "$W/p.bin"
# A payload guest, snapshot s1, the guest runs on for a moment, live export to the bucket.
"$BIN" run --payload "$W/p.bin" --mem "$MEM" --block-area "$MEM" --pool "$SHM/a.pool" \
  --api-sock "$W/a.sock" --no-template < /dev/null > /dev/null 2> "$W/a.err" & VMM=$!
PIDS+=("$VMM")
for _ in $(seq 1 100); do [ -S "$W/a.sock" ] && break; sleep 0.1; done
sleep 1
"$BIN" ctl --api-sock "$W/a.sock" snapshot-vm s1 > /dev/null
sleep 0.5
"$BIN" ctl --api-sock "$W/a.sock" --json export s1 --to s3://pmsnap/order > "$W/export.json" ||
  { echo "export failed"; cat "$W/a.err"; exit 1; }
kill -9 "$VMM"; wait "$VMM" 2>/dev/null || true
STORED=$(python3 -c "import json; print(json.load(open('$W/export.json'))['bytes_written'])")
echo "mem=$MEM payload guest: s1 exported live to s3://pmsnap/order, $STORED bytes stored"

restore() { # tag extra...; prints the figures once complete
  local tag=$1; shift
  rm -rf "$W/cache-$tag"
  "$BIN" restore s1 --from s3://pmsnap/order --pool "$SHM/$tag.pool" --block-area "$MEM" \
    --cache-dir "$W/cache-$tag" --api-sock "$W/$tag.sock" "$@" \
    < /dev/null > /dev/null 2> "$W/$tag.err" & local vmm=$!
  wait_out "$W/$tag.err" "vCPUs running" 60 || { echo "no restore"; cat "$W/$tag.err"; exit 1; }
  echo "$(poll "$W/$tag.sock" 300)"
  kill -9 "$vmm"; wait "$vmm" 2>/dev/null || true
  rm -f "$SHM/$tag.pool" "$SHM/$tag.pool.filling"
}
PARTS=${PARTS:-A B}
[[ $PARTS == *A* ]] && echo "A. lazy restore, every page from the bucket (fresh pack cache each):"
[[ $PARTS == *A* ]] && for i in $(seq 1 "$RUNS"); do
  echo "  with the touch order, run $i:      $(restore order)"
  echo "  --ignore-touch-order, run $i:      $(restore address --ignore-touch-order)"
done

[[ $PARTS == *B* ]] || exit 0
echo "B. 8 clones of s1 at once, --fill background, one shared pack cache:"
BEFORE=$(sent)
for i in $(seq 1 8); do
  "$BIN" restore s1 --from s3://pmsnap/order --pool "$SHM/clone$i.pool" --block-area 16M \
    --cache-dir "$W/cache-shared" --api-sock "$W/clone$i.sock" \
    < /dev/null > /dev/null 2> "$W/clone$i.err" &
  PIDS+=($!)
done
TOTAL=0
for i in $(seq 1 8); do
  for _ in $(seq 1 300); do [ -S "$W/clone$i.sock" ] && break; sleep 0.1; done
  LINE=$(poll "$W/clone$i.sock" 600)
  echo "  clone $i: $LINE"
  F=$(echo "$LINE" | sed -n 's/.*fetched \([0-9]*\) bytes.*/\1/p')
  TOTAL=$(( TOTAL + ${F:-0} ))
done
AFTER=$(sent)
echo "  the clones say they fetched $TOTAL bytes in all; the S3 gateway sent $(( AFTER - BEFORE )) bytes; the snapshot is $STORED bytes in the bucket ($(python3 -c "print(round($(( AFTER - BEFORE ))/$STORED, 2))") copies)"
echo "load: $(uptime)"
