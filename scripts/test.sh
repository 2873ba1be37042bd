#!/usr/bin/env bash
# Fresh machine to a passing test suite: set up (packages, guest image), test the shell
# scripts themselves with stub dpkg-query/apt-get, check formatting and lints, then run
# every test in the workspace. Tests that need /dev/kvm, root or the guest image fail
# under CI=true when these are missing, and say why they did not run otherwise.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$root/scripts/lib.sh"
pmsnap_init test
step "setup (scripts/setup.sh)"
"$root/scripts/setup.sh"
if stop_after packages; then
    exit 0
fi
cd "$root"
step "shell scripts (scripts/test-scripts.sh)"
"$root/scripts/test-scripts.sh"
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
step "cargo test --workspace"
cargo test --workspace
