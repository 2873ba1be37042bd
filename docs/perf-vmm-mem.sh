#!/usr/bin/env bash
# VMM memory with many snapshots of a big guest (issue 16: "VMM memory for 1,000
# snapshots of a 4 GiB guest <= 64 MiB above one snapshot"), measured on the whole VMM
# process (docs/perf-scale.md, "VMM memory with 1,000 snapshots").
#
# Usage: PMSNAP=target/release/pmsnap docs/perf-vmm-mem.sh [MEM [N [MODE]]]
#   (default 4G 1000 writing; MODE idle pauses the vCPUs for the whole run, so no page
#   is preserved between snapshots: the cost of the snapshots alone)
#
# Boots the pattern payload (vmm/tests/payload/pattern.S: every vCPU rewrites its slice
# of guest RAM, round after round, at full speed) with `pmsnap run --payload`, lets it
# write all of RAM once, then takes VM snapshots through the API while it writes:
# `ctl snapshot-vm` 1, then up to N; then N page snapshots of all of RAM
# (`ctl snapshot-pages --runs 0:PAGES`), so 2N snapshots exist at the end. After the
# first, the N-th and the 2N-th snapshot it reads the VMM's /proc/PID/smaps and prints
# its private memory outside the pool file's mappings (guest RAM and the store's own
# view of the pool are shared file pages of the pool on tmpfs; smaps counts them as
# "private" because only this process maps them, so they are left out by path):
#   private = sum of Private_Clean + Private_Dirty of every mapping not of the pool file
#   anon    = Anonymous of the whole process (heap, stacks, anonymous mmaps)
# The pool's own figures (preserved pages, blocks in use) come from `ctl stats`.
# Prints the load average first and last: these machines are shared and noisy.
. "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/scripts/lib.sh"
pmsnap_init perf-vmm-mem
BIN=${PMSNAP:-target/release/pmsnap}
MEM=${1:-4G}
N=${2:-1000}
MODE=${3:-writing}
MIB=$(( $(numfmt --from=iec "$MEM") >> 20 )); PAGES=$(( MIB * 256 ))
W=$(mktemp -d /tmp/pmsnap-perf-mem.XXXXXX)
POOL=/dev/shm/pmsnap-perf-mem-$$.pool
VMM=
cleanup() {
  local rc=$?
  if [ "$rc" != 0 ] && [ -s "$W/err" ]; then echo "the VMM's log ends:"; tail -5 "$W/err"; fi
  if [ -n "$VMM" ]; then kill -9 "$VMM" 2>/dev/null || true; wait "$VMM" 2>/dev/null || true; fi
  rm -rf "$W" "$POOL"
}
trap cleanup EXIT
echo "load: $(uptime)"
step "assemble the payload"
as --64 -o "$W/p.o" "$(dirname "${BASH_SOURCE[0]}")/../vmm/tests/payload/pattern.S"
objcopy -O binary "$W/p.o" "$W/p.bin"
step "boot a $MEM payload guest"
"$BIN" run --payload "$W/p.bin" --mem "$MEM" --vcpus 2 --pool "$POOL" --api-sock "$W/api" \
  < /dev/null > "$W/out" 2> "$W/err" & VMM=$!
for _ in $(seq 600); do "$BIN" ctl --api-sock "$W/api" status > /dev/null 2>&1 && break; sleep 0.1; done
"$BIN" ctl --api-sock "$W/api" status > /dev/null || { cat "$W/err"; die "no API"; }
CTL=("$BIN" ctl --api-sock "$W/api" --json)
# Let the payload write every page of its region once, so guest RAM is populated before
# the first figure.
sleep 5
if [ "$MODE" = idle ]; then "${CTL[@]}" pause > /dev/null; fi
# Print the VMM's memory (label); its private KiB go to $W/priv.
mem() {
  python3 - "$VMM" "$(realpath "$POOL")" "$1" "$W/priv" << 'EOF'
import sys
pid, pool, label, out = sys.argv[1:5]
priv = anon = pool_rss = 0
path = ""
for line in open(f"/proc/{pid}/smaps"):
    f = line.split()
    if not f[0].endswith(":"):  # a mapping's header: range perms offset dev inode [path]
        path = f[5] if len(f) > 5 else ""
        continue
    kb = int(f[1]) if len(f) > 1 and f[1].isdigit() else 0
    if f[0] == "Anonymous:":
        anon += kb
    if path == pool:
        if f[0] == "Rss:":
            pool_rss += kb
    elif f[0] in ("Private_Clean:", "Private_Dirty:"):
        priv += kb
print(f"{label}: private {priv / 1024:.2f} MiB, anon {anon / 1024:.2f} MiB (pool file mapped: {pool_rss / 1024:.0f} MiB resident, left out)")
open(out, "w").write(str(priv))
EOF
}
stats() {
  "${CTL[@]}" stats | python3 -c "
import json,sys
d=json.load(sys.stdin)
s=d.get('store', d)
print('  store: ' + ', '.join(f'{k}={v}' for k, v in s.items() if not isinstance(v, (dict, list))))"
}
step "snapshot 1"
"${CTL[@]}" snapshot-vm m1 > /dev/null
sleep 1
mem "after 1 VM snapshot"
ONE=$(cat "$W/priv")
stats
step "VM snapshots 2..$N"
T0=$(date +%s%N)
for i in $(seq 2 "$N"); do "${CTL[@]}" snapshot-vm "m$i" > /dev/null; done
T1=$(date +%s%N)
sleep 1
echo "took $N VM snapshots in $(( (T1 - T0) / 1000000 )) ms (guest $MODE)"
mem "after $N VM snapshots"
MANY=$(cat "$W/priv")
stats
step "page snapshots 1..$N of all of RAM"
for i in $(seq 1 "$N"); do "${CTL[@]}" snapshot-pages "p$i" --runs "0:$PAGES" > /dev/null; done
sleep 1
mem "after $N VM and $N page snapshots"
BOTH=$(cat "$W/priv")
stats
kill -0 "$VMM" || die "the VMM died: $(tail -5 "$W/err")"
python3 -c "
one, many, both = $ONE / 1024, $MANY / 1024, $BOTH / 1024
print(f'VMM private memory above one snapshot with $N VM snapshots of a $MEM guest ($MODE): {many - one:.2f} MiB of 64 MiB allowed ({many:.2f} vs {one:.2f} MiB) ratio={(many - one) / 64:.3f} goal<=1')
print(f'VMM private memory above one snapshot with $N VM + $N page snapshots of a $MEM guest ($MODE): {both - one:.2f} MiB of 64 MiB allowed ({both:.2f} vs {one:.2f} MiB) ratio={(both - one) / 64:.3f} goal<=1')"
echo "load: $(uptime)"
