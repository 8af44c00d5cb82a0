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
# chromium: the dashboard is tested in a real browser (Playwright drives Debian's build).
packages=(skopeo podman containerd docker-registry umoci uidmap iproute2 curl chromium)
# npm: Node 22 and the JS IPFS packages come from the npm registry (tools/ipfs_node.sh). Any npm
# will do: a machine whose Node.js is not Debian's (NodeSource's bundles npm, and conflicts with
# Debian's npm package) keeps its own.
command -v npm >/dev/null 2>&1 || packages+=(npm)
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
# The tests start their own docker-registry and containerd on loopback. Debian's packages would
# also start (and enable at boot) system services: the registry on :5000 on every interface with
# no authentication. Keep apt from starting any service while it installs, then disable the
# units of the daemons installed here, so the test command leaves no server running behind it.
services=(docker-registry containerd)
if ((${#missing[@]} > 0)); then
    if [[ $(id -u) -ne 0 ]]; then
        log "missing packages (${missing[*]}) and not root: cannot apt-get install them"
        exit 1
    fi
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    policy=/usr/sbin/policy-rc.d
    own_policy=0
    if [[ ! -e $policy ]]; then
        # invoke-rc.d and deb-systemd-invoke skip starting services while this answers 101.
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        own_policy=1
    fi
    install_rc=0
    { apt-get update && apt-get install -y --no-install-recommends "${missing[@]}"; } || install_rc=$?
    ((own_policy)) && rm -f "$policy"
    ((install_rc == 0)) || exit "$install_rc"
    for pkg in "${missing[@]}"; do
        for svc in "${services[@]}"; do
            if [[ $pkg == "$svc" ]] && command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
                log "disabling the $svc system service (the tests run their own on loopback)"
                systemctl disable --now "$svc" >/dev/null 2>&1 || true
            fi
        done
    done
fi
for tool in skopeo podman containerd ctr docker-registry umoci chromium; do
    command -v "$tool" >/dev/null 2>&1 || { log "required tool '$tool' is not on PATH"; exit 1; }
done

# --- Python environment. ----------------------------------------------------------------------
# Test on the interpreter users get: Debian's own /usr/bin/python3 (3.11.2 on Debian 12), not
# whichever python3 comes first on PATH. P2PIMG_PYTHON picks another one on purpose.
python=${P2PIMG_PYTHON:-}
if [[ -z $python ]]; then
    if [[ -x /usr/bin/python3 ]]; then python=/usr/bin/python3; else python=$(command -v python3); fi
fi
want_version=$("$python" -c 'import sys; print(sys.version.split()[0], sys.base_prefix)')
if [[ -x .venv/bin/python ]]; then
    have_version=$(.venv/bin/python -c 'import sys; print(sys.version.split()[0], sys.base_prefix)' 2>/dev/null || true)
    if [[ $have_version != "$want_version" ]]; then
        log "recreating .venv: it was made with ${have_version:-a missing interpreter}, want $want_version"
        rm -rf .venv
    fi
fi
if [[ ! -x .venv/bin/python ]]; then
    log "creating .venv with $python ($want_version)"
    "$python" -m venv .venv
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

# Node 22 with npm's UnixFS importer (.cache/node) and Helia (.cache/helia), for the IPFS
# interop tests: the Python importer against the JS one, Helia against the peer listener
# (idempotent; helia_node.sh runs ipfs_node.sh first).
log "tools/helia_node.sh"
bash tools/helia_node.sh >/dev/null || failed+=(ipfs-js-tools)

log "ruff check p2pimg tests bench tools fuzz"
.venv/bin/ruff check p2pimg tests bench tools fuzz || failed+=(ruff)
log "ruff format --check"
.venv/bin/ruff format --check --quiet . || failed+=(ruff-format)

log "mypy --strict p2pimg bench tools"
.venv/bin/mypy --strict p2pimg bench tools || failed+=(mypy)

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

# --- The other interpreter. ----------------------------------------------------------------------
# A development machine may put another Python 3.11 first on PATH, and patch releases differ in
# ways that matter (3.11.0-3.11.3 wrap an exception raised inside `except*`; later ones do not).
# When that python3 is not the one .venv was made with, the tests that start no outside daemon
# run on it too, in .venv-alt. Skipped when arguments select tests, or with P2PIMG_ONE_PYTHON=1.
other=$(command -v python3 || true)
if (($# == 0)) && [[ -z ${P2PIMG_ONE_PYTHON:-} && -n $other ]]; then
    other_version=$("$other" -c 'import sys; print(sys.version.split()[0], sys.base_prefix)' 2>/dev/null || true)
    if [[ -n $other_version && $other_version != "$want_version" ]] \
        && "$other" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        alt_ok=1
        if [[ ! -x .venv-alt/bin/python || $(.venv-alt/bin/python -c 'import sys; print(sys.version.split()[0], sys.base_prefix)') != "$other_version" ]]; then
            rm -rf .venv-alt
            log "creating .venv-alt with $other ($other_version)"
            "$other" -m venv .venv-alt || alt_ok=0
        fi
        alt_stamp=.venv-alt/.p2pimg-test-bench-deps.sha256
        if ((alt_ok)) && [[ ! -f $alt_stamp || $(cat "$alt_stamp") != "$want" ]]; then
            log "installing p2pimg[test,bench] into .venv-alt"
            if .venv-alt/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test,bench]'; then
                printf '%s\n' "$want" >"$alt_stamp"
            else
                alt_ok=0
            fi
        fi
        if ((alt_ok)); then
            log "pytest on $other_version too (the tests that start no outside daemon)"
            rc=0
            .venv-alt/bin/python -m pytest -p no:cacheprovider -q tests --ignore=tests/integration || rc=$?
            ((rc == 0)) || failed+=("pytest on $other_version (exit $rc)")
        else
            failed+=("setting up .venv-alt with $other")
        fi
    fi
fi

if ((${#failed[@]} > 0)); then
    log "FAILED: ${failed[*]}"
    exit 1
fi
log "all checks passed"
