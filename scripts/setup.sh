#!/usr/bin/env bash
# Set up a fresh machine for pmsnap: Debian packages the build needs, then the default
# guest image (kernel + initramfs, built by images/build.sh and cached by input hash).
# Safe to run again: every step is skipped when already done.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

# Host packages for building pmsnap itself (libclang for the userfaultfd crate's bindgen).
need=()
for pkg in libclang-dev curl; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}"
    if [ "$(id -u)" -ne 0 ]; then sudo=sudo; else sudo=; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ ! -e /dev/kvm ]; then
    echo "setup: warning: /dev/kvm is missing; guests cannot boot on this machine" >&2
fi

# The guest image: installs its own Debian inputs (linux-source-6.1, busybox-static, ...).
"$root/images/build.sh"
