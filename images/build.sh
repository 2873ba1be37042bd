#!/usr/bin/env bash
# Build pmsnap's default guest image: a minimal Linux 6.1 kernel (ELF vmlinux)
# and an uncompressed initramfs with busybox, the guest agent and images/init.
# This script is the only way the default image is made. See docs/images.md.
IMAGES="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$IMAGES/../scripts/lib.sh"
pmsnap_init build.sh

usage() {
    cat <<'EOF'
Usage: images/build.sh [--help | --verify-config FILE]

Builds the default pmsnap guest image and prints its paths, sizes and sha256 sums.

  1. Installs its Debian inputs when missing (apt-get): linux-source-6.1 at the
     pinned version, busybox-static and the kernel build dependencies.
  2. Kernel: unpacks linux-source-6.1, applies images/patches/*.patch, runs
     `make tinyconfig`, merges images/kernel.fragment (allnoconfig for everything
     it does not name), checks that every option of the fragment survived, and
     builds the uncompressed ELF `vmlinux` (about 5.5 min with 2 cores).
  3. Builds the guest-agent crate statically (-C target-feature=+crt-static) with
     the size-optimised, stripped cargo profile `guest` (Cargo.toml).
  4. Initramfs: an uncompressed newc cpio with busybox (links for the applets in
     images/applets), the guest-agent binaries but the test-only ones
     (TEST_ONLY_BINS: pmsnap-memtest), images/init and images/rootfs/; and the
     same with the test-only binaries (initramfs-test.cpio) for the tests.

Outputs are cached in images/cache/, keyed by sha256 of all inputs:
  kernel-<key>/vmlinux        key: fragment, patches, kernel recipe, linux-source + gcc versions
  initramfs-<key>/initramfs.cpio  key: init, applets, rootfs/, this script, busybox, agent binaries
  initramfs-<key>/initramfs-test.cpio  the same plus the test-only binaries
  image-<key>/                symlinks to both (key: both keys)
  image-<key>/test/           symlinks to the kernel and initramfs-test.cpio
  default -> image-<key>      the image `pmsnap run` boots by default
  test -> image-<key>/test    the image the integration tests boot (tests/src/lib.rs)
A run with unchanged inputs only rebuilds the agent incrementally and takes seconds.
Only the initramfs is rebuilt when only the agent changes.
If ../shared/images/kernel-<key>/vmlinux exists next to the repository, it is used
instead of building the same kernel again.

Options:
  --help                 this text
  --verify-config FILE   only check that a kernel .config keeps every option of
                         images/kernel.fragment (exit 1 naming those it lost)

Environment: JOBS (default: nproc) for the kernel build; PMSNAP_STOP_AFTER=packages
stops after step 1 (scripts/test-scripts.sh). A failing command names the step, the
line and the command (scripts/lib.sh) and the exit status is non-zero.
EOF
}

VERIFY_ONLY=""
case "${1:-}" in
    -h | --help) usage; exit 0 ;;
    --verify-config)
        [[ $# -eq 2 ]] || { echo "build.sh: --verify-config needs one .config path" >&2; exit 2; }
        VERIFY_ONLY="$2" ;;
    "") ;;
    *) echo "build.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
esac

ROOT="$(cd "$IMAGES/.." && pwd)"
CACHE="$IMAGES/cache"
SHARED="$ROOT/../shared/images"
FRAGMENT="$IMAGES/kernel.fragment"
INIT="$IMAGES/init"
APPLETS="$IMAGES/applets"
ROOTFS="$IMAGES/rootfs"
PATCHES=("$IMAGES"/patches/*.patch)
AGENT_TARGET_DIR="$ROOT/target/guest"
AGENT_PROFILE="guest"
# guest-agent binaries only the tests run in the guest: they go into the test image
# (images/cache/test), not the default one, which boots faster without them.
TEST_ONLY_BINS=(pmsnap-memtest)
RUST_TARGET="x86_64-unknown-linux-gnu"

LINUX_SOURCE_VERSION="6.1.192-2"
LINUX_TARBALL="/usr/src/linux-source-6.1.tar.xz"
BUSYBOX="/bin/busybox"
JOBS="${JOBS:-$(nproc)}"


# Every `CONFIG_X=v` of the fragment must be in .config; every
# `# CONFIG_X is not set` must not be `=y` there.
verify_config() {
    local config="$1" line opt bad=()
    while IFS= read -r line; do
        if ! grep -qxF -- "$line" "$config"; then
            bad+=("$line (got: $(grep -E "^(# )?${line%%=*}[= ]" "$config" || echo absent))")
        fi
    done < <(grep -E '^CONFIG_[A-Za-z0-9_]+=' "$FRAGMENT")
    while IFS= read -r opt; do
        if grep -qE "^$opt=[ym]" "$config"; then
            bad+=("# $opt is not set (got: $(grep -E "^$opt=" "$config"))")
        fi
    done < <(sed -nE 's/^# (CONFIG_[A-Za-z0-9_]+) is not set$/\1/p' "$FRAGMENT")
    if [[ ${#bad[@]} -gt 0 ]]; then
        echo "build.sh: error: kernel.fragment options that did not survive make (missing dependency?):" >&2
        printf '  %s\n' "${bad[@]}" >&2
        return 1
    fi
}

# ---------------------------------------------------------------------------
# 1. Debian inputs
# ---------------------------------------------------------------------------
# name=version pins are exact; plain names only need to be installed.
PACKAGES=(
    "linux-source-6.1=$LINUX_SOURCE_VERSION"
    busybox-static
    build-essential bc bison flex libelf-dev libssl-dev
    cpio file patch xz-utils
)

if [[ -n "$VERIFY_ONLY" ]]; then
    [[ -f "$VERIFY_ONLY" ]] || die "no such file: $VERIFY_ONLY"
    verify_config "$VERIFY_ONLY"
    echo "build.sh: $VERIFY_ONLY keeps every option of kernel.fragment"
    exit 0
fi

step "Debian packages"
pkg_ensure "${PACKAGES[@]}"
if stop_after packages; then
    log "stopping after the package step (PMSNAP_STOP_AFTER=packages)"
    exit 0
fi
[[ -f "$LINUX_TARBALL" ]] || die "$LINUX_TARBALL missing after installing linux-source-6.1"
[[ -x "$BUSYBOX" ]] || die "$BUSYBOX missing after installing busybox-static"
command -v cargo >/dev/null || die "cargo not found: install Rust (rust-toolchain.toml pins the version)"
[[ ${#PATCHES[@]} -gt 0 && -f "${PATCHES[0]}" ]] || die "no patches in $IMAGES/patches"

mkdir -p "$CACHE"

# sha256 of stdin, hex only.
sha() { sha256sum | cut -d' ' -f1; }

# Clean up a half-built temp dir if we are interrupted; finished outputs are
# only ever moved into place with a rename, so they are never half-written.
TMPDIRS=()
cleanup() { local d; for d in "${TMPDIRS[@]}"; do rm -rf -- "$d"; done; }
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
# Temp dirs of runs that were killed too hard to clean up (their PID is the suffix).
for d in "$CACHE"/.tmp-*.*; do
    [[ -e "$d" ]] || continue
    kill -0 "${d##*.}" 2>/dev/null || rm -rf -- "$d"
done

# ---------------------------------------------------------------------------
# 2. Kernel
# ---------------------------------------------------------------------------

build_kernel() {
    local tmp="$CACHE/.tmp-kernel-$KERNEL_KEY.$$"
    TMPDIRS+=("$tmp")
    rm -rf -- "$tmp"
    mkdir -p "$tmp"
    log "kernel: unpacking $LINUX_TARBALL"
    tar -xf "$LINUX_TARBALL" -C "$tmp"
    local src="$tmp/linux-source-6.1"
    local p
    for p in "${PATCHES[@]}"; do
        log "kernel: applying $(basename "$p")"
        patch -p1 -d "$src" --forward --batch --quiet <"$p" || die "patch $(basename "$p") does not apply"
    done
    log "kernel: tinyconfig + kernel.fragment"
    make -C "$src" -s tinyconfig >/dev/null
    # -n: allnoconfig with tinyconfig + fragment as the base, so every option
    # the fragment does not name stays off instead of taking its default.
    (cd "$src" && scripts/kconfig/merge_config.sh -n .config "$FRAGMENT" >"$tmp/merge_config.log" 2>&1) ||
        { cat "$tmp/merge_config.log" >&2; die "merge_config.sh failed"; }
    make -C "$src" -s olddefconfig >/dev/null
    verify_config "$src/.config" || exit 1
    log "kernel: make -j$JOBS vmlinux (about 5.5 minutes with 2 cores)"
    local start end
    start=$(date +%s)
    # A fixed, parseable timestamp: it is also the mtime of the kernel's
    # built-in initramfs (/dev/console), so two builds give the same bytes.
    make -C "$src" -j"$JOBS" -s KBUILD_BUILD_TIMESTAMP="1970-01-01 00:00:00 UTC" \
        KBUILD_BUILD_USER=pmsnap KBUILD_BUILD_HOST=pmsnap vmlinux >"$tmp/make.log" 2>&1 ||
        { tail -n 40 "$tmp/make.log" >&2; die "kernel build failed (full log: $tmp/make.log)"; }
    end=$(date +%s)
    log "kernel: built in $((end - start)) s"
    mkdir -p "$tmp/out"
    cp "$src/vmlinux" "$tmp/out/vmlinux"
    cp "$src/.config" "$tmp/out/config"
    echo "$((end - start))" >"$tmp/out/build-seconds"
    rm -rf -- "$KERNEL_DIR"
    mv "$tmp/out" "$KERNEL_DIR"
    rm -rf -- "$tmp"
}

PMSNAP_STEP="kernel"
KERNEL_KEY="$({
    echo "linux-source-6.1 $(pkg_version linux-source-6.1)"
    echo "gcc $(gcc -dumpfullversion) $(pkg_version gcc)"
    echo "fragment"; cat "$FRAGMENT"
    for p in "${PATCHES[@]}"; do echo "patch $(basename "$p")"; cat "$p"; done
    # The parts of this script that make the kernel (not the whole script,
    # so that editing the initramfs recipe does not rebuild the kernel).
    echo "recipe"; declare -f verify_config build_kernel
} | sha)"
KERNEL_DIR="$CACHE/kernel-$KERNEL_KEY"

if [[ -f "$KERNEL_DIR/vmlinux" ]]; then
    log "kernel: cached ($KERNEL_DIR)"
elif [[ -f "$SHARED/kernel-$KERNEL_KEY/vmlinux" ]]; then
    log "kernel: using $SHARED/kernel-$KERNEL_KEY"
    tmp="$CACHE/.tmp-shared-$KERNEL_KEY.$$"
    TMPDIRS+=("$tmp")
    cp -r "$SHARED/kernel-$KERNEL_KEY" "$tmp"
    mv "$tmp" "$KERNEL_DIR"
else
    build_kernel
fi

# ---------------------------------------------------------------------------
# 3. Guest agent (static)
# ---------------------------------------------------------------------------
step "agent: cargo build --profile guest (static, for size)"
# --target keeps RUSTFLAGS away from build scripts and proc macros; the JSON
# messages name every binary the crate builds, so new [[bin]]s get in too.
# [profile.guest] (Cargo.toml): opt-level s, LTO, one codegen unit, panic=abort,
# stripped: every byte of the initramfs is unpacked by emulated guest kernel code.
# The JSON goes to a file, not a pipe, so that a failing cargo stops the script.
cargo_json="$(mktemp)"
TMPDIRS+=("$cargo_json")
(cd "$ROOT" &&
    RUSTFLAGS="-C target-feature=+crt-static" cargo build --profile "$AGENT_PROFILE" --quiet \
        -p guest-agent --target "$RUST_TARGET" --target-dir "$AGENT_TARGET_DIR" \
        --message-format=json-render-diagnostics >"$cargo_json")
mapfile -t AGENT_BINS < <(
    grep -o '"executable":"[^"]*"' "$cargo_json" | sed 's/^"executable":"\(.*\)"$/\1/' | sort -u
)
[[ ${#AGENT_BINS[@]} -gt 0 ]] || die "cargo built no guest-agent binaries"
# Split into what the default image boots with and what only the test image adds.
BOOT_BINS=() TEST_BINS=()
for b in "${AGENT_BINS[@]}"; do
    if [[ " ${TEST_ONLY_BINS[*]} " == *" $(basename "$b") "* ]]; then
        TEST_BINS+=("$b")
    else
        BOOT_BINS+=("$b")
    fi
done
[[ ${#TEST_BINS[@]} -eq ${#TEST_ONLY_BINS[@]} ]] ||
    die "TEST_ONLY_BINS (${TEST_ONLY_BINS[*]}) names a binary cargo did not build: ${AGENT_BINS[*]}"
for b in "${AGENT_BINS[@]}"; do
    info="$(file -L "$b")"
    grep -q 'statically linked\|static-pie linked' <<<"$info" ||
        die "$(basename "$b") is not statically linked: $info"
    grep -q ', stripped' <<<"$info" || die "$(basename "$b") is not stripped: $info"
done

# ---------------------------------------------------------------------------
# 4. Initramfs
# ---------------------------------------------------------------------------
PMSNAP_STEP="initramfs"
INITRAMFS_KEY="$({
    echo "busybox-static $(pkg_version busybox-static)"
    sha256sum <"$BUSYBOX"
    echo "init"; cat "$INIT"
    echo "applets"; cat "$APPLETS"
    # Names, modes and contents of the files under images/rootfs.
    (cd "$ROOTFS" && find . -type f | LC_ALL=C sort | while IFS= read -r f; do
        echo "rootfs $f $(stat -c %a "$f") $(sha <"$f")"
    done)
    for b in "${AGENT_BINS[@]}"; do echo "agent $(basename "$b") $(sha <"$b")"; done
    echo "build.sh"; cat "${BASH_SOURCE[0]}"
} | sha)"
INITRAMFS_DIR="$CACHE/initramfs-$INITRAMFS_KEY"

build_initramfs() {
    local tmp="$CACHE/.tmp-initramfs-$INITRAMFS_KEY.$$"
    TMPDIRS+=("$tmp")
    rm -rf -- "$tmp"
    local root="$tmp/root"
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc}
    cp "$BUSYBOX" "$root/bin/busybox"
    # Links for the applets listed in images/applets, at the paths busybox
    # itself gives (bin/sh, sbin/poweroff, ...). Not all: see images/applets.
    local all name path
    all="$("$BUSYBOX" --list-full)"
    while IFS= read -r name; do
        path="$(grep -E "(^|/)${name}\$" <<<"$all" | head -n 1)" ||
            die "images/applets: '$name' is not a busybox applet"
        [[ -n "$path" ]] || die "images/applets: '$name' is not a busybox applet"
        mkdir -p "$root/$(dirname "$path")"
        ln -sf /bin/busybox "$root/$path"
    done < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$APPLETS")
    local b
    for b in "${BOOT_BINS[@]}"; do
        install -m 0755 "$b" "$root/bin/$(basename "$b")"
    done
    install -m 0755 "$INIT" "$root/init"
    # Plain files of the guest's root (/etc/fstab, ...).
    cp -R --no-preserve=ownership "$ROOTFS/." "$root/"
    chmod 1777 "$root/tmp"
    chmod 0700 "$root/root"
    mkdir -p "$tmp/out"
    # Fixed mtimes, owners and order: the same inputs give the same bytes.
    pack() {
        find "$root" -exec touch -h -d @0 {} +
        (cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
            cpio --quiet -o -H newc -R 0:0 --reproducible >"$1")
    }
    pack "$tmp/out/initramfs.cpio"
    # The test image: the same plus the test-only binaries.
    for b in "${TEST_BINS[@]}"; do
        install -m 0755 "$b" "$root/bin/$(basename "$b")"
    done
    pack "$tmp/out/initramfs-test.cpio"
    rm -rf -- "$INITRAMFS_DIR"
    mv "$tmp/out" "$INITRAMFS_DIR"
    rm -rf -- "$tmp"
}

if [[ -f "$INITRAMFS_DIR/initramfs.cpio" && -f "$INITRAMFS_DIR/initramfs-test.cpio" ]]; then
    log "initramfs: cached ($INITRAMFS_DIR)"
else
    step "initramfs: building"
    build_initramfs
fi

# ---------------------------------------------------------------------------
# 5. The image: both parts, and the `default` and `test` links
# ---------------------------------------------------------------------------
PMSNAP_STEP="image"
IMAGE_KEY="$(printf 'kernel %s\ninitramfs %s\n' "$KERNEL_KEY" "$INITRAMFS_KEY" | sha)"
IMAGE_DIR="$CACHE/image-$IMAGE_KEY"
if [[ ! -d "$IMAGE_DIR" ]]; then
    tmp="$CACHE/.tmp-image-$IMAGE_KEY.$$"
    TMPDIRS+=("$tmp")
    rm -rf -- "$tmp"
    mkdir -p "$tmp"
    ln -s "../kernel-$KERNEL_KEY/vmlinux" "$tmp/vmlinux"
    ln -s "../initramfs-$INITRAMFS_KEY/initramfs.cpio" "$tmp/initramfs.cpio"
    # image-<key>/test: the same kernel, the initramfs with the test-only binaries.
    mkdir "$tmp/test"
    ln -s "../../kernel-$KERNEL_KEY/vmlinux" "$tmp/test/vmlinux"
    ln -s "../../initramfs-$INITRAMFS_KEY/initramfs-test.cpio" "$tmp/test/initramfs.cpio"
    mv -T "$tmp" "$IMAGE_DIR"
fi
# Replace the links atomically: a concurrent reader sees the old or the new image.
ln -sfn "image-$IMAGE_KEY" "$CACHE/.default.$$"
mv -T "$CACHE/.default.$$" "$CACHE/default"
ln -sfn "image-$IMAGE_KEY/test" "$CACHE/.test.$$"
mv -T "$CACHE/.test.$$" "$CACHE/test"

for link in default test; do
    echo "pmsnap guest image: $CACHE/$link -> $(readlink "$CACHE/$link")"
    for f in vmlinux initramfs.cpio; do
        real="$(readlink -f "$CACHE/$link/$f")"
        printf '  %-15s %10s bytes  sha256 %s\n    %s\n' "$f" "$(stat -c %s "$real")" \
            "$(sha <"$real")" "$real"
    done
done
