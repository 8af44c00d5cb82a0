#!/usr/bin/env bash
# The one command that prepares a fresh Debian 12 machine (run as root) and runs the whole
# test suite: system clients, the venv, lint, type checks, then pytest. Arguments are passed
# through to pytest, e.g. `scripts/test.sh -k harness -x`.
set -euo pipefail

# Everything below uses repo-relative paths, so work from the repo root whatever the cwd is.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '==> %s\n' "$*" >&2; }

# --- System packages: the real registry clients the integration tests drive. ---------------
# Only ask apt when something is missing, so a prepared machine pays nothing here.
packages=(skopeo podman containerd docker-registry umoci uidmap iproute2 curl)
if [[ ! -d .venv ]]; then
    # `python3 -m venv` needs ensurepip, which Debian ships separately in python3-venv.
    packages+=(python3 python3-venv)
fi
missing=()
if command -v dpkg-query >/dev/null 2>&1; then
    for pkg in "${packages[@]}"; do
        # `dpkg -s` also succeeds for removed-but-configured packages; require "installed".
        status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
        [[ $status == "install ok installed" ]] || missing+=("$pkg")
    done
else
    log "dpkg-query not found: not a Debian system, assuming the clients are installed"
fi
if ((${#missing[@]} > 0)); then
    if [[ $(id -u) -ne 0 ]]; then
        log "missing packages (${missing[*]}) and not root: cannot apt-get install them"
        exit 1
    fi
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
fi
for tool in skopeo podman containerd ctr docker-registry umoci; do
    command -v "$tool" >/dev/null 2>&1 || { log "required tool '$tool' is not on PATH"; exit 1; }
done

# --- Python environment. ----------------------------------------------------------------------
if [[ ! -x .venv/bin/python ]]; then
    log "creating .venv"
    python3 -m venv .venv
fi
# Reinstall only when the declared dependencies changed: the install is editable, so source
# edits never need it, and skipping pip keeps repeated runs fast (and offline).
stamp=.venv/.p2pimg-test-deps.sha256
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
    log "installing p2pimg[test] into .venv"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'
    printf '%s\n' "$want" >"$stamp"
fi

# --- Checks. Run all of them so one report shows every problem; fail if any failed. ---------
failed=()

log "ruff check p2pimg tests"
.venv/bin/ruff check p2pimg tests || failed+=(ruff)

log "mypy --strict p2pimg"
.venv/bin/mypy --strict p2pimg || failed+=(mypy)

log "pytest $*"
rc=0
.venv/bin/python -m pytest -p no:cacheprovider "$@" || rc=$?
if ((rc == 5)); then
    # Exit 5 means nothing was collected: a broken selection must not look like a green run.
    log "pytest collected no tests"
    failed+=("pytest (no tests collected)")
elif ((rc != 0)); then
    failed+=("pytest (exit $rc)")
fi

if ((${#failed[@]} > 0)); then
    log "FAILED: ${failed[*]}"
    exit 1
fi
log "all checks passed"
