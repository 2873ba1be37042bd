#!/usr/bin/env bash
# A big Linux guest end to end (issue 16 item 3: "4 GiB (and 8 GiB where host memory
# allows) guests work end to end"): cold boot to a shell, a VM snapshot, 64 MiB written
# in the guest, a second VM snapshot, a rollback in place to the first (the file is gone),
# kill -9, a restore of the second in a new VMM (lazy copy back; the file is there and
# the console answers), a third snapshot in that VMM, `store verify`. Prints the pauses
# and times as it goes.
#
# Usage: PMSNAP=target/release/pmsnap docs/perf-big-guest.sh [MEM]   (default 8G)
#   Needs about MEM + 2 GiB of /dev/shm (RAM area and a 2 GiB block area). The cold boot
#   of an 8 GiB guest takes minutes here (guest kernel code is emulated).
set -u
BIN=${PMSNAP:-target/release/pmsnap}
MEM=${1:-8G}; W=$(mktemp -d /tmp/pmsnap-big.XXXXXX); POOL=/dev/shm/pmsnap-big-$$.pool
VMM=
trap 'if [ -n "$VMM" ]; then kill -9 $VMM 2>/dev/null; fi; rm -rf "$W" "$POOL"' EXIT
echo "load: $(uptime)"
CTL="$BIN ctl --api-sock $W/api --json"
mkfifo $W/in
t0=$(date +%s)
$BIN run --mem $MEM --block-area 2G --vcpus 2 --pool $POOL --api-sock $W/api --no-template < $W/in > $W/out 2> $W/err & VMM=$!
exec 3> $W/in
for _ in $(seq 1800); do grep -q "pmsnap-guest: ready" $W/out && break; sleep 0.1; kill -0 $VMM 2>/dev/null || break; done
echo "boot: $(( $(date +%s)-t0 )) s to the ready line; $(grep -c ready $W/out) ready lines"
echo 'echo MARK-$((6*7)); free -m | head -2' >&3; sleep 3; grep -a "MARK-42\|Mem:" $W/out | tail -2
$CTL snapshot-vm s1 | python3 -c "import json,sys; d=json.load(sys.stdin); print('s1', {k:d[k] for k in ('pause_us','store_us')})"
echo 'dd if=/dev/zero of=/dev/shm/x bs=1M count=64 2>/dev/null; echo WR$((1+1))OTE' >&3
for _ in $(seq 600); do grep -a -q "WR2OTE" $W/out && break; sleep 0.1; done; echo "guest wrote 64 MiB: $(grep -a -c WR2OTE $W/out)"
$CTL snapshot-vm s2 | python3 -c "import json,sys; d=json.load(sys.stdin); print('s2', {k:d[k] for k in ('pause_us','store_us')})"
$CTL rollback s1 | python3 -c "import json,sys; d=json.load(sys.stdin); print('rollback', {k:d.get(k) for k in ('dirty_pages','pages_copied','pause_us')})"
echo 'ls /dev/shm/x 2>&1; echo AFTER-ROLLBACK' >&3; sleep 4; grep -a -A1 "AFTER-ROLLBACK\|No such file" $W/out | tail -3
kill -9 $VMM; wait $VMM 2>/dev/null; exec 3>&-
t1=$(date +%s%N)
mkfifo $W/in2
$BIN restore --pool $POOL s2 --api-sock $W/api2 < $W/in2 > $W/out2 2> $W/err2 & VMM=$!
exec 4> $W/in2
for _ in $(seq 600); do $BIN ctl --api-sock $W/api2 status >/dev/null 2>&1 && break; sleep 0.05; done
echo "restore: API up after $(( ($(date +%s%N)-t1)/1000000 )) ms"
grep -a -E "vCPUs running|copy back" $W/err2 | head -2
sleep 1; echo 'ls -la /dev/shm/x; echo RESTORED-$((6*7))' >&4
for _ in $(seq 300); do grep -a -q "RESTORED-42" $W/out2 && break; sleep 0.1; done; grep -a "RESTORED-42\|rw.*/dev/shm/x" $W/out2 | tail -2
$BIN ctl --api-sock $W/api2 --json snapshot-vm s3 | python3 -c "import json,sys; d=json.load(sys.stdin); print('s3 after restore', {k:d[k] for k in ('pause_us','store_us')})"
kill -9 $VMM; wait $VMM 2>/dev/null; exec 4>&-
$BIN store verify --pool $POOL 2>&1 | tail -2 || true
echo "load: $(uptime)"
