#!/usr/bin/env bash
# Fresh machine to a passing test suite: set up (packages, guest image), check formatting
# and lints, then run every test in the workspace. Tests that need /dev/kvm say so when
# it is missing instead of passing silently.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
cd "$root"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
