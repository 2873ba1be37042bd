#!/usr/bin/env bash
# Test of the shell scripts' package step and failure messages, run by scripts/test.sh
# (so in CI). It drives the README's first command (scripts/run-guest.sh, which runs
# scripts/setup.sh and images/build.sh) with stub dpkg-query, apt-get, id and sudo first
# on PATH and PMSNAP_STOP_AFTER=packages, so nothing is installed and nothing is built:
# a package absent, a pinned package at an older version, no apt lists yet, apt-get
# update or install failing, not root with and without sudo, a broken dpkg, and
# success. Each case checks the exit status and the messages. Takes about a second.
# Usage: scripts/test-scripts.sh [-v]   (-v prints every case's output)
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$root/scripts/lib.sh"
pmsnap_init test-scripts
verbose=""
[[ "${1:-}" == -v ]] && verbose=1

work="$(mktemp -d /tmp/pmsnap-test-scripts.XXXXXX)"
trap 'rm -rf -- "$work"' EXIT

# --- what the scripts ask for, read from the scripts themselves -----------------------
pin="$(sed -n 's/^LINUX_SOURCE_VERSION="\(.*\)"$/\1/p' "$root/images/build.sh")"
[[ -n "$pin" ]] || die "no LINUX_SOURCE_VERSION in images/build.sh"
host_pkgs="libclang-dev curl gnuplot-nox"
image_pkgs="busybox-static build-essential bc bison flex libelf-dev libssl-dev cpio file patch xz-utils"

# --- a PATH with the stubs and only the real tools the package step needs -------------
# (no real sudo, apt-get or dpkg-query can be reached, whatever this machine has).
stubs="$work/stubs" tools="$work/tools" state="$work/state"
mkdir -p "$stubs" "$tools"
for t in bash env sed grep cut cat dirname basename mktemp nproc rm mkdir printf sort \
    head tail tr uname readlink touch; do
    p="$(command -v "$t")" || die "test needs $t"
    ln -s "$p" "$tools/$t"
done

# dpkg-query -W -f=FMT NAME: from $state/installed ("name version" lines); an unknown
# name exits 1 like dpkg-query; STUB_DPKG_BROKEN=1 exits 2 (a dpkg database error).
cat >"$stubs/dpkg-query" <<'EOF'
#!/bin/bash
[[ -z "${STUB_DPKG_BROKEN:-}" ]] || { echo "dpkg-query: error: database is locked" >&2; exit 2; }
name="${*: -1}"
ver="$(sed -n "s/^$name //p" "$STUB_STATE/installed" 2>/dev/null)"
if [[ -z "$ver" ]]; then
    echo "dpkg-query: no packages found matching $name" >&2
    exit 1
fi
printf 'install ok installed %s\n' "$ver"
EOF
# apt-get: logs its arguments; `update` creates the lists (or fails: STUB_APT_UPDATE=fail,
# as without network); `install` needs the lists (a fresh machine has none), fails
# under STUB_APT_INSTALL=fail, "installs" nothing under STUB_APT_INSTALL=noop, and
# otherwise records each NAME[=VERSION] (version 1.0 when none is given) as installed.
cat >"$stubs/apt-get" <<'EOF'
#!/bin/bash
echo "apt-get $* (uid $(id -u))" >>"$STUB_STATE/apt.log"
if [[ "$(id -u)" != 0 ]]; then
    echo "E: Could not open lock file /var/lib/dpkg/lock-frontend - open (13: Permission denied)" >&2
    exit 100
fi
case "$1" in
update)
    if [[ "${STUB_APT_UPDATE:-}" == fail ]]; then
        echo "W: Failed to fetch http://deb.debian.org/debian/dists/bookworm/InRelease  Temporary failure resolving 'deb.debian.org'" >&2
        exit 100
    fi
    touch "$STUB_STATE/lists" ;;
install)
    shift
    for a in "$@"; do
        [[ "$a" == -* ]] && continue
        [[ -e "$STUB_STATE/lists" ]] || { echo "E: Unable to locate package ${a%%=*}" >&2; exit 100; }
    done
    [[ "${STUB_APT_INSTALL:-}" == fail ]] && { echo "E: Sub-process /usr/bin/dpkg returned an error code (1)" >&2; exit 100; }
    [[ "${STUB_APT_INSTALL:-}" == noop ]] && exit 0
    for a in "$@"; do
        [[ "$a" == -* ]] && continue
        name="${a%%=*}" ver=1.0
        [[ "$a" == *=* ]] && ver="${a#*=}"
        sed -i "/^$name /d" "$STUB_STATE/installed"
        echo "$name $ver" >>"$STUB_STATE/installed"
    done ;;
*) echo "apt-get stub: unexpected $*" >&2; exit 100 ;;
esac
EOF
# id -u: STUB_UID (default 0).
cat >"$stubs/id" <<'EOF'
#!/bin/bash
[[ "$1" == -u ]] || { echo "id stub: unexpected $*" >&2; exit 1; }
echo "${STUB_UID:-0}"
EOF
# sudo CMD...: logged, then CMD runs as root. Kept off PATH but for the case using it.
mkdir -p "$work/sudo"
cat >"$work/sudo/sudo" <<'EOF'
#!/bin/bash
echo "sudo $*" >>"$STUB_STATE/apt.log"
STUB_UID=0 exec "$@"
EOF
chmod +x "$stubs"/* "$work/sudo/sudo"

passed=0 failed=0
out="" rc=0

# reset INSTALLED...: a fresh stub machine with these "name version" entries installed.
reset() {
    rm -rf "$state"
    mkdir -p "$state"
    : >"$state/installed" >"$state/apt.log"
    local e
    for e in "$@"; do echo "$e" >>"$state/installed"; done
}
# Everything both scripts want, at the right versions.
all_installed() {
    local p
    for p in $host_pkgs $image_pkgs; do echo "$p 1.0"; done
    echo "linux-source-6.1 $pin"
}

# run SCRIPT [VAR=VALUE...]: run a repository script on the stub PATH; sets $out
# (stdout+stderr) and $rc.
run() {
    local script="$1"
    shift
    rc=0
    out="$(env -i HOME="$work" PATH="$stubs:$tools" STUB_STATE="$state" \
        PMSNAP_STOP_AFTER=packages "$@" bash "$root/$script" 2>&1 </dev/null)" || rc=$?
    [[ -z "$verbose" ]] || printf -- '--- %s %s (exit %s)\n%s\n' "$script" "$*" "$rc" "$out"
}

# check NAME CONDITION...: one result line per case; failures show the output.
case_name="" case_ok=1
begin() {
    case_name="$1" case_ok=1
}
expect() { # DESCRIPTION, then a command that must succeed
    local what="$1"
    shift
    if ! "$@"; then
        case_ok=0
        echo "  FAIL $case_name: $what" >&2
    fi
}
end() {
    if [[ $case_ok -eq 1 ]]; then
        passed=$((passed + 1))
        echo "ok   $case_name"
    else
        failed=$((failed + 1))
        echo "FAIL $case_name (exit $rc); output:" >&2
        sed 's/^/    | /' <<<"$out" >&2
        sed 's/^/    apt.log | /' "$state/apt.log" >&2
    fi
}
has() { grep -qF -- "$1" <<<"$out"; }
lacks() { ! grep -qF -- "$1" <<<"$out"; }
logged() { grep -qF -- "$1" "$state/apt.log"; }
not_logged() { ! grep -qF -- "$1" "$state/apt.log"; }
rc_is() { [[ "$rc" == "$1" ]]; }
rc_nonzero() { [[ "$rc" != 0 ]]; }
installed() { grep -qxF -- "$1" "$state/installed"; }
# apt-get update ran before the first apt-get install.
update_first() {
    local u i
    u="$(grep -n 'apt-get update' "$state/apt.log" | head -n 1 | cut -d: -f1)"
    i="$(grep -n 'apt-get install' "$state/apt.log" | head -n 1 | cut -d: -f1)"
    [[ -n "$u" && -n "$i" && "$u" -lt "$i" ]]
}

one_update() { [[ "$(grep -c 'apt-get update' "$state/apt.log")" == 1 ]]; }

# --- the cases ---------------------------------------------------------------------------

begin "everything installed: no apt-get, stops after the package step"
mapfile -t everything < <(all_installed)
reset "${everything[@]}"
run scripts/run-guest.sh
expect "exit 0" rc_is 0
expect "no apt-get call" not_logged "apt-get"
expect "says it stopped" has "build.sh: stopping after the package step"
end

begin "absent packages (fresh machine, no apt lists): update first, then install them"
reset
run scripts/run-guest.sh
expect "exit 0" rc_is 0
expect "names the host packages" has "setup: installing Debian packages: libclang-dev curl gnuplot-nox"
expect "names the pinned kernel source" has "build.sh: installing Debian packages: linux-source-6.1=$pin busybox-static"
expect "apt-get update before install" update_first
expect "one apt-get update for both scripts" one_update
expect "pinned version installed" installed "linux-source-6.1 $pin"
expect "busybox-static installed" installed "busybox-static 1.0"
expect "no error" lacks "error"
end

begin "one absent package (busybox-static): only it is installed"
reset "${everything[@]}"
sed -i '/^busybox-static /d' "$state/installed"
run images/build.sh
expect "exit 0" rc_is 0
expect "installs only busybox-static" logged "apt-get install -y -q --no-install-recommends --allow-downgrades busybox-static (uid 0)"
expect "installed" installed "busybox-static 1.0"
end

begin "pinned linux-source-6.1 at an older version: the pinned one is installed"
reset "${everything[@]}"
sed -i "s/^linux-source-6.1 .*/linux-source-6.1 6.1.100-1/" "$state/installed"
run images/build.sh
expect "exit 0" rc_is 0
expect "asks for the pin" logged "--allow-downgrades linux-source-6.1=$pin (uid 0)"
expect "pinned version now installed" installed "linux-source-6.1 $pin"
end

begin "pinned linux-source-6.1 at a newer version: the pin is installed (downgrade)"
reset "${everything[@]}"
sed -i "s/^linux-source-6.1 .*/linux-source-6.1 6.1.999-9/" "$state/installed"
run images/build.sh
expect "exit 0" rc_is 0
expect "pinned version now installed" installed "linux-source-6.1 $pin"
end

begin "apt-get update fails (no network): names the packages and the command"
reset
run scripts/run-guest.sh STUB_APT_UPDATE=fail
expect "exit non-zero" rc_nonzero
expect "says apt-get update failed" has "\`apt-get update\` failed (exit 100"
expect "names the packages" has "libclang-dev curl gnuplot-nox could not be installed"
expect "prints the command" has "apt-get update && apt-get install -y --no-install-recommends --allow-downgrades libclang-dev curl gnuplot-nox"
expect "apt's own message shown" has "Temporary failure resolving"
expect "did not go on to build.sh" lacks "build.sh:"
end

begin "apt-get install fails: names the packages and the command"
reset "${everything[@]}"
sed -i '/^busybox-static /d' "$state/installed"
run scripts/setup.sh STUB_APT_INSTALL=fail
expect "exit non-zero" rc_nonzero
expect "says install failed" has "build.sh: error: step \"installing Debian packages: busybox-static\": \`apt-get install\` failed (exit 100) for busybox-static"
expect "prints the command" has "apt-get install -y --no-install-recommends --allow-downgrades busybox-static"
expect "setup.sh names the failing step" has "setup: error: step \"guest image (images/build.sh)\""
end

begin "apt-get exits 0 but the pinned version is not there: named"
reset "${everything[@]}"
sed -i "s/^linux-source-6.1 .*/linux-source-6.1 6.1.100-1/" "$state/installed"
run images/build.sh STUB_APT_INSTALL=noop
expect "exit non-zero" rc_nonzero
expect "names the package and what is installed" has "still not installed as asked: linux-source-6.1=$pin (installed now: linux-source-6.1:6.1.100-1)"
end

begin "not root, no sudo: names the packages and the command to run as root"
reset
run scripts/run-guest.sh STUB_UID=1000
expect "exit 1" rc_is 1
expect "explains" has "setup: error: step \"installing Debian packages: libclang-dev curl gnuplot-nox\": installing libclang-dev curl gnuplot-nox needs root, and sudo is not installed; as root run:"
expect "prints the command" has "apt-get update && apt-get install -y --no-install-recommends --allow-downgrades libclang-dev curl gnuplot-nox"
expect "no apt-get call" not_logged "apt-get"
end

begin "not root, with sudo: apt-get runs through sudo"
reset
ln -s "$work/sudo/sudo" "$tools/sudo"
run scripts/setup.sh STUB_UID=1000
rm "$tools/sudo"
expect "exit 0" rc_is 0
expect "update through sudo" logged "sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q"
expect "install as root" logged "apt-get install -y -q --no-install-recommends --allow-downgrades libclang-dev curl gnuplot-nox (uid 0)"
end

begin "dpkg-query broken: an error, not \"absent\""
reset "${everything[@]}"
run scripts/setup.sh STUB_DPKG_BROKEN=1
expect "exit non-zero" rc_nonzero
expect "names dpkg-query" has "\`dpkg-query -W libclang-dev\` failed (exit 2): is dpkg working?"
expect "no apt-get call" not_logged "apt-get"
end

begin "the ERR trap names the script, step, line and command of a failure"
cat >"$work/fails.sh" <<EOF
. "$root/scripts/lib.sh"
pmsnap_init fails
step "the step"
true
grep -q needle /nonexistent/file
echo "not reached"
EOF
rc=0
out="$(PATH="$tools" bash "$work/fails.sh" 2>&1)" || rc=$?
expect "exit 2 (grep's status)" rc_is 2
expect "message with step, file, line, command" \
    has "fails: error: step \"the step\": $work/fails.sh:5: \`grep -q needle /nonexistent/file\` exited 2"
expect "stops there" lacks "not reached"
end

begin "the ERR trap fires inside functions and command substitutions"
cat >"$work/fails2.sh" <<'EOF'
. "$PMSNAP_LIB"
pmsnap_init fails2
f() { local v; v="$(false)"; echo "not reached $v"; }
f
EOF
rc=0
out="$(PATH="$tools" PMSNAP_LIB="$root/scripts/lib.sh" bash "$work/fails2.sh" 2>&1)" || rc=$?
expect "exit 1" rc_is 1
expect "names the command" has "fails2: error: $work/fails2.sh:3: \`false\` exited 1"
expect "stops there" lacks "not reached"
end

echo "$passed passed, $failed failed"
if [[ $failed -ne 0 ]]; then
    exit 1
fi
