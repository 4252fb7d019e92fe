#!/usr/bin/env bash
# Print the path of a promtool binary, installing Debian's `prometheus`
# package (which ships promtool) if there is none.
#
#   promtool="$(scripts/ensure_promtool.sh)" || exit 1
#
# Fast path: promtool already on PATH (or $PROMTOOL set): nothing else runs.
# Install path: apt-get install --no-install-recommends prometheus, with an
# `apt-get update` only when the first attempt fails (stale package lists).
# Needs root (or passwordless sudo). The package's service is not left running:
# a prometheus server started by the install is stopped by pid.
# Exits non-zero with a message on stderr when promtool cannot be had.
set -euo pipefail

if [[ -n "${PROMTOOL:-}" && -x "${PROMTOOL}" ]]; then
    printf '%s\n' "${PROMTOOL}"
    exit 0
fi
if path="$(command -v promtool 2>/dev/null)"; then
    printf '%s\n' "${path}"
    exit 0
fi

fail() {
    printf 'ensure_promtool: %s\n' "$*" >&2
    exit 1
}

command -v apt-get >/dev/null 2>&1 \
    || fail "promtool is not on PATH and apt-get is not available; install promtool (https://prometheus.io/download/) or set PROMTOOL"

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        fail "promtool is not on PATH and installing it needs root (apt-get install prometheus); run as root or install promtool"
    fi
fi

before="$(pgrep -x prometheus 2>/dev/null || true)"
export DEBIAN_FRONTEND=noninteractive
install() {
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends prometheus >&2
}
if ! install; then
    "${SUDO[@]}" apt-get update -qq >&2 || fail "apt-get update failed"
    install || fail "apt-get install prometheus failed"
fi

# Debian's postinst may start the prometheus server (not where policy-rc.d
# forbids it). Stop only the processes that this install started, by pid.
for pid in $(pgrep -x prometheus 2>/dev/null || true); do
    if ! grep -qx "${pid}" <<<"${before}"; then
        "${SUDO[@]}" kill "${pid}" 2>/dev/null || true
    fi
done

path="$(command -v promtool 2>/dev/null)" \
    || fail "the prometheus package was installed but promtool is still not on PATH"
printf '%s\n' "${path}"
