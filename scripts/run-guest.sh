#!/usr/bin/env bash
# Fresh machine to a running guest: set up, build pmsnap, boot the default guest image
# with 2 vCPUs and 256 MiB on the serial console. Type `poweroff -f` to leave.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
cd "$root"
cargo build --release -p vmm --bin pmsnap
exec "$root/target/release/pmsnap" run "$@"
