#!/usr/bin/env bash
# Set up a fresh Debian machine for p2pimg and run the main job on the embedded origin:
# make a sample image offline, publish it, serve it on 127.0.0.1:5050 and pull it with skopeo, in
# a temporary home removed at the end (`--home DIR` works in DIR and keeps it; see `p2pimg demo -h`).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian's own interpreter (what test.sh tests on), not whichever python3 comes first on PATH.
python=${P2PIMG_PYTHON:-}
if [ -z "$python" ]; then
    if [ -x /usr/bin/python3 ]; then python=/usr/bin/python3; else python=$(command -v python3); fi
fi
missing=()
command -v skopeo >/dev/null || missing+=(skopeo)
# `python3 -m venv` needs ensurepip, which Debian ships separately.
[ -x .venv/bin/python ] || "$python" -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ ! -x .venv/bin/p2pimg ]; then
    "$python" -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e .
fi
exec .venv/bin/p2pimg demo "$@"
