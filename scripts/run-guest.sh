#!/usr/bin/env bash
# Fresh machine to a running guest: set up, build pmsnap, boot the default guest image
# with 2 vCPUs and 256 MiB on the serial console. When the guest is ready, pmsnap takes a
# snapshot "boot" of all its RAM (no page copied) and logs it; the control API socket
# lets you look at it from another terminal. Type `poweroff -f` to leave.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$root/scripts/lib.sh"
pmsnap_init run-guest
step "setup (scripts/setup.sh)"
"$root/scripts/setup.sh"
if stop_after packages; then
    exit 0
fi
cd "$root"
step "cargo build --release -p vmm --bin pmsnap"
cargo build --release -p vmm --bin pmsnap
sock="${PMSNAP_API_SOCK:-/tmp/pmsnap-$$.api}"
echo "pmsnap: control API on $sock; from another terminal try:"
echo "  $root/target/release/pmsnap ctl --api-sock $sock stats"
exec "$root/target/release/pmsnap" run --api-sock "$sock" --snapshot-at-ready boot "$@"
