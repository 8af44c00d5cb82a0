"""What `p2pimg --help` says around the list of commands: the user-facing description and the
epilog (getting started, environment variables, config.toml, exit codes). Kept here, laid out
by hand, so that cli/main.py stays the parser; each command's own text is next to its flags."""

from __future__ import annotations

DESCRIPTION = """\
A peer-to-peer container image fetcher. `p2pimg serve` runs a read-only OCI registry on
127.0.0.1:5050 that skopeo, podman, containerd (ctr, nerdctl) and docker pull from. Images come
from an origin (a directory, S3 or Storj) where `p2pimg publish` put them, and from LAN peers;
every byte is verified against its content address before anyone sees it."""

EPILOG = """\
getting started:
  p2pimg demo                  the whole job once: publish a sample image, serve it, pull it
                               with skopeo (in a temporary home, removed afterwards)
  p2pimg sample .              write a sample image as ./layout (OCI layout) and ./app.tar
  p2pimg publish oci:./layout:1 demo/app:1
  p2pimg serve                 then: skopeo copy --src-tls-verify=false \\
                                 docker://127.0.0.1:5050/demo/app:1 oci:./out:1
  p2pimg COMMAND --help        what a command does and its options

environment (a flag wins over the environment, which wins over config.toml):
  P2PIMG_HOME        state directory: cache, keys, config.toml, and the default origin
                     (default: $XDG_DATA_HOME/p2pimg, i.e. ~/.local/share/p2pimg)
  P2PIMG_ORIGIN      origin URL (default: file://$P2PIMG_HOME/origin); also
                     s3://BUCKET[/PREFIX]?endpoint=URL[&region=R] and storj://BUCKET[/PREFIX]
  P2PIMG_CHUNK_SIZE  chunk size of published and mirrored blobs: a power of two from 4K
                     to 64M (default 1M)
  P2PIMG_SWARM_KEY   the LAN's shared secret (else $P2PIMG_HOME/swarm.key)
  P2PIMG_MDNS=0      neither announce nor browse for LAN peers with mDNS
  P2PIMG_IPFS_GATEWAYS  IPFS trustless gateways for serve (URLs, space- or comma-separated)
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN)   credentials of s3:// origins
  STORJ_ACCESS       the access grant of storj:// origins
  DOCKER_CONFIG      directory of the Docker config.json with registry credentials
                     (default ~/.docker), for serve --upstream and publish docker://

config file: $P2PIMG_HOME/config.toml (TOML; every key optional), for example
  origin = "s3://images/prod?endpoint=https://gateway.storjshare.io"
  listen = "127.0.0.1:5050"
  chunk_size = "1M"
  keys: origin, listen, chunk_size, policy, upstreams (a list), upstream_tag_ttl,
  ipfs_gateways (a list), peer_listen, peers (a list), peer_dns (a list), mdns (true/false), peer_rate,
  peer_max_requests, cache_max, trust (a list of .pub files), swarm_key_file, peer_tls_cert,
  peer_tls_key, peer_tls_ca, allow_public_mirror (true/false), ui_read_only (true/false),
  ui_socket

exit codes: 0 ok, 1 other failure, 2 bad input, 3 not found, 4 verification failed,
  5 origin failed, 6 cache write failed"""


# Each command's description, what `p2pimg COMMAND --help` says first (argparse wraps it).
ABOUT: dict[str, str] = {
    "publish": (
        "Publish an image to the origin: its blobs are split into chunks named by their hash, what the "
        "origin lacks is uploaded, manifests are kept byte for byte (digests never change), and "
        "NAME:TAG is pointed at the new image root last. Prints the image root CID as the last line. "
        "The tag record is signed when this home has a publisher key (p2pimg keygen). With --attach "
        "FILE --artifact-type TYPE and no SOURCE, it attaches FILE as an artifact (a signature, an "
        "SBOM) to the image NAME:TAG already names, listed by the referrers API."
    ),
    "keygen": (
        "Make this home's ed25519 publisher key (in $P2PIMG_HOME/keys/). Tags published from this home "
        "are then signed, and the home trusts its own key, so it accepts only signed tag records from "
        "then on: publish unsigned tags again. Prints the public key file, to give to those who should "
        "trust your tags (serve/resolve/warm --trust, or their home's trust/ directory)."
    ),
    "resolve": (
        "Print the image root CID that NAME:TAG points at in the origin, once its tag record passed the"
        " trust policy (signed by a trusted key; when no key is trusted, taken unchecked with a warning"
        " given once per home). The image can then be pulled as 127.0.0.1:5050/ipfs/<CID>."
    ),
    "ls": ("List the NAME:TAGs published in the origin, one a line."),
    "untag": (
        "Remove NAME:TAG from the origin. Its image stays there until `p2pimg gc --yes` deletes what no"
        " tag reaches any more."
    ),
    "gc": (
        "List the origin's objects (blobs, blocks) that no tag reaches any more; with --yes, delete "
        "them. Objects younger than --grace (1h) are kept, so a publish running now loses nothing. "
        "S3 and Storj bill stored bytes."
    ),
    "serve": (
        "Run the read-only OCI registry (127.0.0.1:5050 unless --listen says otherwise) in the "
        "foreground until Ctrl-C. It serves the published images by NAME:TAG and by ipfs/<CID>, "
        "fetching chunks from LAN peers and the origin and verifying each one; with --upstream it is "
        "also a pull-through mirror of other registries, with --ipfs-gateway it pulls images nerdctl "
        "pushed to IPFS (ipfs/<CID>:latest), and with --peer-listen it shares its cache with the LAN. "
        "GET /metrics gives Prometheus metrics."
    ),
    "warm": (
        "Fetch an image completely into this home's cache, every blob verified, so that later pulls "
        "need no network; with --lan, ask every known peer to warm it too. When a `p2pimg serve` runs "
        "on the same home, this goes through it. Exits 0 only when every blob is there (and every peer "
        "succeeded)."
    ),
    "export": (
        "Write an image's whole DAG as a CAR v1 file: its root, manifests, blob maps and chunks, each "
        "block once and verified, the root CID as the CAR's root (printed as the last line). `ipfs dag "
        "import FILE.car` then takes it, so an image published with p2pimg can be pinned in any IPFS "
        "node or pinning service. What the cache lacks is fetched first, as `p2pimg warm` does (through"
        " the server of the same home when one runs). IPFS refuses blocks over 2 MiB: an image "
        "published with --chunk-size over 2M cannot be exported. An image nerdctl pushed to IPFS "
        "(ipfs/<CID>) is written as nerdctl stored it, when its layers were chunked as Kubo does by "
        "default (otherwise export says why it cannot)."
    ),
    "cache": ("Look after this home's cache ($P2PIMG_HOME/cache); the origin is not touched."),
    "cache ls": ("List the complete blobs (size, last use, pinned or not), the partial ones and the totals."),
    "cache gc": (
        "Evict least recently used unpinned blobs until the cache fits in --max-size; an evicted blob "
        "is fetched again on its next use."
    ),
    "cache verify": (
        "Re-hash every cached blob and block; remove and report what does not match its digest or CID "
        "(exit 1 when anything was removed). Removed content is fetched and verified again when used."
    ),
    "cache pin": ("Pin an image: its blobs are never evicted by cache gc or serve --cache-max."),
    "cache unpin": (
        "Remove the pin of an image (made by cache pin or warm --pin); its blobs can be evicted again."
    ),
    "containerd-config": (
        "Print a hosts.toml that makes containerd pull the images of --registry through p2pimg first "
        "(and from the registry itself when p2pimg does not have them). Install it as "
        "/etc/containerd/certs.d/REGISTRY/hosts.toml. With --registry 127.0.0.1:5050 it lets containerd"
        " pull p2pimg's own images in plain HTTP (ctr: --hosts-dir /etc/containerd/certs.d)."
    ),
    "podman-config": (
        "Print a registries.conf entry that makes podman, skopeo and buildah pull the images of "
        "--registry through p2pimg first; add it to /etc/containers/registries.conf or put it in a file"
        " of /etc/containers/registries.conf.d/."
    ),
    "demo": (
        "The whole job once, offline: make a small sample image, publish it, start the registry in this"
        " process and pull the image through it with a real client, by tag and by root CID, checking "
        "the pulled manifest's digest. Without --home it works in a temporary home (and origin) of its "
        "own, removed at the end; your own home is not touched."
    ),
    "sample": (
        "Write a small sample image (about 10 MB in 3 layers, linux/amd64), offline, in two forms to "
        "try `p2pimg publish` with: DIR/layout, an OCI image layout tagged 1, and DIR/app.tar, a "
        "`docker save` archive of the same image. Prints the two publish commands."
    ),
}
