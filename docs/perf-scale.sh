#!/usr/bin/env bash
# The full measurement of docs/perf-scale.md (issue 16): the scale example in full mode
# (1,000 vs 1 snapshots, 1M vs 0 preserved pages: 4 GiB of RAM and 4 GiB of blocks on
# /dev/shm, about a minute), its curves written to docs/perf-scale/snapshots.csv and
# preserved.csv and its output to docs/perf-scale/full.txt, then plotted with gnuplot
# (scripts/setup.sh installs gnuplot-nox) into docs/perf-scale-snapshots.png and
# docs/perf-scale-preserved.png, next to the same curves of the format before issue 16
# (docs/perf-scale/before-*.csv and before-full.txt: the same example built against the
# pmem-backend of commit bfd32cc, where every commit rewrote the whole catalog).
# Usage: docs/perf-scale.sh [--plot-only]
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$root/scripts/lib.sh"
pmsnap_init perf-scale
data="$root/docs/perf-scale"

if [[ "${1:-}" != --plot-only ]]; then
    step "measure (cargo run --release -p pmem-backend --example scale -- --full)"
    (cd "$root" && cargo run -q --release -p pmem-backend --example scale -- \
        --full --csv "$data") | tee "$data/full.txt"
fi

step "plot"
command -v gnuplot >/dev/null || die "gnuplot is missing: run scripts/setup.sh (it installs gnuplot-nox)"
for f in snapshots preserved before-snapshots before-preserved; do
    [[ -s "$data/$f.csv" ]] || die "$data/$f.csv is missing"
done
gnuplot <<GP
set terminal pngcairo size 900,560 font "sans,11"
set datafile separator ","
set key top left box opaque
set logscale y
set grid
set ylabel "time per operation (us, median of 21)"
set format y "%g"

set output "$root/docs/perf-scale-snapshots.png"
set title "Snapshot create and delete against the snapshots already in the store"
set logscale x
set xlabel "existing snapshots (64 pages each)"
plot "$data/before-snapshots.csv" using 1:2 skip 1 with linespoints lw 2 title "create, before (whole catalog per commit)", \
     "$data/before-snapshots.csv" using 1:3 skip 1 with linespoints lw 2 title "delete, before", \
     "$data/snapshots.csv" using 1:2 skip 1 with linespoints lw 2 title "create, now (one delta record per commit)", \
     "$data/snapshots.csv" using 1:3 skip 1 with linespoints lw 2 title "delete, now"

set output "$root/docs/perf-scale-preserved.png"
set title "Snapshot create and delete against the pages preserved in the store"
unset logscale x
set xrange [0:1100]
set key right center
set xlabel "preserved pages (redirects of one snapshot covering all RAM), thousands"
plot "$data/before-preserved.csv" using (\$1/1000):2 skip 1 with linespoints lw 2 title "create, before (whole catalog per commit)", \
     "$data/before-preserved.csv" using (\$1/1000):3 skip 1 with linespoints lw 2 title "delete, before", \
     "$data/preserved.csv" using (\$1/1000):2 skip 1 with linespoints lw 2 title "create, now (one delta record per commit)", \
     "$data/preserved.csv" using (\$1/1000):3 skip 1 with linespoints lw 2 title "delete, now"
GP
log "wrote docs/perf-scale-snapshots.png and docs/perf-scale-preserved.png"
