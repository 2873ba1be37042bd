#!/usr/bin/env bash
# The first snapshot-vm pause against guest RAM size (issue 16 item 3: "the first
# snapshot-vm pause stays flat with RAM size": 4 GiB / 256 MiB <= 2, and <= 1/100 of
# copying 4 GiB, the baseline a memcpy of the same bytes into pre-faulted memory measured
# in the same run).
#
# Usage: PMSNAP=target/release/pmsnap docs/perf-guest-size.sh [SIZES...]
#   (default 256M 512M 1G 2G 4G; RUNS=3 runs per size, median reported)
#
# For each size: boots the pattern payload (vmm/tests/payload/pattern.S: 2 vCPUs rewriting
# guest RAM at full speed) on a new pool with `pmsnap run --payload`, waits 6 s, takes two
# `ctl snapshot-vm` and keeps the API's pause_us and store_us of each (the first is the
# one that references and protects all of RAM; the second only what was written since).
# Then a memcpy of the same RAM size (pmem-backend/examples/memcpy). Writes
# docs/perf-scale/guest-size.csv and plots docs/perf-scale-guest-size.png with gnuplot.
. "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/scripts/lib.sh"
pmsnap_init perf-guest-size
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${PMSNAP:-target/release/pmsnap}
RUNS=${RUNS:-3}
SIZES=("$@"); [ ${#SIZES[@]} -gt 0 ] || SIZES=(256M 512M 1G 2G 4G)
data="$root/docs/perf-scale"; mkdir -p "$data"
W=$(mktemp -d /tmp/pmsnap-perf-size.XXXXXX)
VMM=
cleanup() {
  if [ -n "$VMM" ]; then kill -9 "$VMM" 2>/dev/null || true; wait "$VMM" 2>/dev/null || true; fi
  rm -rf "$W" /dev/shm/pmsnap-perf-size-$$.pool
}
trap cleanup EXIT
echo "load: $(uptime)"
step "build the memcpy baseline and assemble the payload"
(cd "$root" && cargo build -q --release -p pmem-backend --example memcpy)
MEMCPY="${CARGO_TARGET_DIR:-$root/target}/release/examples/memcpy"
as --64 -o "$W/p.o" "$root/vmm/tests/payload/pattern.S"
objcopy -O binary "$W/p.o" "$W/p.bin"
median() { sort -n | awk '{v[NR]=$1} END{print v[int((NR+1)/2)]}'; }
echo "mem_mib,first_pause_us,first_store_us,second_pause_us,memcpy_us" > "$W/csv"
for size in "${SIZES[@]}"; do
  mib=$(( $(numfmt --from=iec "$size") >> 20 ))
  : > "$W/runs"
  for run in $(seq "$RUNS"); do
    step "$size, run $run"
    POOL=/dev/shm/pmsnap-perf-size-$$.pool
    "$BIN" run --payload "$W/p.bin" --mem "$size" --vcpus 2 --pool "$POOL" \
      --api-sock "$W/api" < /dev/null > "$W/out" 2> "$W/err" & VMM=$!
    for _ in $(seq 600); do "$BIN" ctl --api-sock "$W/api" status > /dev/null 2>&1 && break; sleep 0.1; done
    sleep 6
    a=$("$BIN" ctl --api-sock "$W/api" --json snapshot-vm s1) || { tail -5 "$W/err"; die "snapshot failed"; }
    b=$("$BIN" ctl --api-sock "$W/api" --json snapshot-vm s2) || { tail -5 "$W/err"; die "snapshot failed"; }
    python3 -c 'import json,sys; a,b=json.loads(sys.argv[1]),json.loads(sys.argv[2]); print(a["pause_us"],a["store_us"],b["pause_us"])' "$a" "$b" >> "$W/runs"
    kill -9 "$VMM"; wait "$VMM" 2>/dev/null || true; VMM=; rm -f "$POOL"
    rm -f "$W/api"
  done
  cpy=$("$MEMCPY" "$mib" 3 | awk '{print $4}')
  p1=$(awk '{print $1}' "$W/runs" | median); s1=$(awk '{print $2}' "$W/runs" | median)
  p2=$(awk '{print $3}' "$W/runs" | median)
  echo "$size: first pause $(awk '{print $1}' "$W/runs" | tr '\n' ' ')us (store $(awk '{print $2}' "$W/runs" | tr '\n' ' ')), second $(awk '{print $3}' "$W/runs" | tr '\n' ' ')us; memcpy ${cpy} us"
  echo "$mib,$p1,$s1,$p2,$cpy" >> "$W/csv"
done
cp "$W/csv" "$data/guest-size.csv"
python3 - "$data/guest-size.csv" << 'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
small, big = rows[0], rows[-1]
p_s, p_b = float(small["first_pause_us"]), float(big["first_pause_us"])
print(f"first snapshot-vm pause, {big['mem_mib']} vs {small['mem_mib']} MiB: {p_b/1000:.1f} ms vs {p_s/1000:.1f} ms ratio={p_b/p_s:.2f} goal<=2")
m = float(big["memcpy_us"])
print(f"first snapshot-vm pause vs memcpy of {big['mem_mib']} MiB: {p_b/1000:.1f} ms vs {m/1000:.1f} ms ratio={p_b/m:.4f} goal<=0.01")
PY
echo "load: $(uptime)"
step "plot"
command -v gnuplot >/dev/null || die "gnuplot is missing: run scripts/setup.sh (it installs gnuplot-nox)"
gnuplot <<GP
set terminal pngcairo size 900,560 font "sans,11"
set datafile separator ","
set output "$root/docs/perf-scale-guest-size.png"
set title "snapshot-vm pause against guest RAM (payload guest writing, median of $RUNS)"
set key top left box opaque
set yrange [0.01:30]
set logscale xy
set grid
set xlabel "guest RAM (MiB)"
set ylabel "ms"
set format y "%g"
plot "$data/guest-size.csv" using 1:(\$2/1000) skip 1 with linespoints lw 2 title "first snapshot pause", \
     "$data/guest-size.csv" using 1:(\$3/1000) skip 1 with linespoints lw 2 title "  of which store (dirty harvest, reference, protect what was written)", \
     "$data/guest-size.csv" using 1:(\$4/1000) skip 1 with linespoints lw 2 title "second snapshot pause", \
     "$data/guest-size.csv" using 1:(\$5/100000) skip 1 with lines dt 2 lw 2 title "memcpy of the RAM / 100 (the goal)"
GP
log "wrote docs/perf-scale/guest-size.csv and docs/perf-scale-guest-size.png"
