# shellcheck shell=bash
# Sourced by every pmsnap shell script (scripts/*.sh, images/build.sh, docs/perf-vm.sh,
# .ci/run): strict mode with an ERR trap, logging, and the Debian package step.
#
#   . "$root/scripts/lib.sh"
#   pmsnap_init NAME        # set -Eeuo pipefail + ERR trap; messages start with "NAME:"
#   step "what now"         # logged; a later failure names this step
#   log / warn / die        # to stderr; die exits 1
#   pkg_ensure SPEC...      # SPEC is a package name or name=version (exact pin)
#
# No silent failure: a command that fails under `set -e` prints the script, the step,
# the line and the command, and the script exits with the command's status.
#
# PMSNAP_STOP_AFTER=packages (environment): scripts stop, with exit status 0 and a
# message, right after their Debian package step. scripts/test-scripts.sh uses it to
# drive run-guest.sh / setup.sh / images/build.sh with stub dpkg-query and apt-get
# without building anything.

pmsnap_init() {
    PMSNAP_SCRIPT="$1"
    PMSNAP_STEP=""
    set -Eeuo pipefail
    trap '_pmsnap_on_err $? $LINENO "$BASH_COMMAND"' ERR
}

_pmsnap_on_err() {
    local rc="$1" line="$2" cmd="$3" file="${BASH_SOURCE[1]:-?}"
    trap - ERR
    printf '%s: error: %s%s:%s: `%s` exited %s\n' "$PMSNAP_SCRIPT" \
        "${PMSNAP_STEP:+step \"$PMSNAP_STEP\": }" "${file#"${PMSNAP_ROOT:-}/"}" "$line" \
        "$cmd" "$rc" >&2
    exit "$rc"
}

log() { echo "$PMSNAP_SCRIPT: $*" >&2; }
warn() { echo "$PMSNAP_SCRIPT: warning: $*" >&2; }
die() {
    echo "$PMSNAP_SCRIPT: error: ${PMSNAP_STEP:+step \"$PMSNAP_STEP\": }$*" >&2
    exit 1
}
step() {
    PMSNAP_STEP="$*"
    log "$*"
}

# Repository root (this file is <root>/scripts/lib.sh).
PMSNAP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# True when PMSNAP_STOP_AFTER asks to stop after step $1.
stop_after() { [[ "${PMSNAP_STOP_AFTER:-}" == "$1" ]]; }

# ---------------------------------------------------------------------------
# Debian packages
# ---------------------------------------------------------------------------

# Installed version of package $1, empty when it is not installed (absent, removed,
# or only its configuration files left). dpkg-query exits 1 for an unknown package:
# that is "not installed", not an error. Any other failure is.
pkg_version() {
    local out rc=0
    out="$(dpkg-query -W -f='${Status} ${Version}\n' "$1" 2>/dev/null)" || rc=$?
    if [[ $rc -gt 1 ]]; then
        die "\`dpkg-query -W $1\` failed (exit $rc): is dpkg working?"
    fi
    sed -n 's/^install ok installed //p' <<<"$out"
}

# The specs among $@ that are not satisfied: a plain name must be installed (any
# version), name=version must be installed at exactly that version (older or newer
# is not enough: the kernel cache key and the patches assume it).
pkg_missing() {
    local spec name have
    for spec in "$@"; do
        name="${spec%%=*}"
        have="$(pkg_version "$name")"
        if [[ "$spec" == *=* ]]; then
            [[ "$have" == "${spec#*=}" ]] || echo "$spec"
        else
            [[ -n "$have" ]] || echo "$spec"
        fi
    done
}

# Install what pkg_missing finds among $@, with `apt-get update` first (a fresh
# machine has no package lists yet, and a pinned version needs current ones). Dies
# naming the packages and the command to run when that is impossible or fails.
pkg_ensure() {
    local text missing=() sudo=() rc
    text="$(pkg_missing "$@")"
    [[ -n "$text" ]] || return 0
    mapfile -t missing <<<"$text"
    local cmd="apt-get update && apt-get install -y --no-install-recommends --allow-downgrades ${missing[*]}"
    step "installing Debian packages: ${missing[*]}"
    if [[ "$(id -u)" != 0 ]]; then
        if command -v sudo >/dev/null; then
            sudo=(sudo)
        else
            die "installing ${missing[*]} needs root, and sudo is not installed; as root run:
    $cmd"
        fi
    fi
    rc=0
    # Once per run: setup.sh's update also serves the images/build.sh it starts.
    if [[ -z "${PMSNAP_APT_UPDATED:-}" ]]; then
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q || rc=$?
        if [[ $rc -ne 0 ]]; then
            die "\`apt-get update\` failed (exit $rc; no network or no permission?), so ${missing[*]} could not be installed; fix that, then run as root:
    $cmd"
        fi
        export PMSNAP_APT_UPDATED=1
    fi
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends --allow-downgrades "${missing[@]}" || rc=$?
    if [[ $rc -ne 0 ]]; then
        die "\`apt-get install\` failed (exit $rc) for ${missing[*]} (output above); fix that, then run as root:
    $cmd"
    fi
    local still s v now=""
    still="$(pkg_missing "${missing[@]}")"
    if [[ -n "$still" ]]; then
        for s in $still; do
            v="$(pkg_version "${s%%=*}")"
            now+=" ${s%%=*}:${v:-absent}"
        done
        die "apt-get install exited 0, but these are still not installed as asked: ${still//$'\n'/ } (installed now:$now); check with apt-cache policy, then run as root:
    $cmd"
    fi
    log "installed ${missing[*]}"
}
