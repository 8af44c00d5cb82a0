"""An upstream OCI registry, one job per module (import from the module, not from here):

refs           registry addresses and image references (docker://HOST/REPO:TAG)
dockerconfig   credentials from Docker's config.json
auth           the WWW-Authenticate / token flow, sans I/O
errors         what a registry's failures mean
client         UpstreamClient: async (trio) reads of manifests and blobs
source         the registry as a ChunkSource, for the fetch engine
"""
