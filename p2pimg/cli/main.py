"""The `p2pimg` command line: commands, exit codes, and nothing else."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from p2pimg import __version__
from p2pimg.cli import helptext
from p2pimg.content import signing
from p2pimg.content.model import parse_name_tag
from p2pimg.errors import OriginNotFound, P2pimgError
from p2pimg.fetch.policy import POLICIES
from p2pimg.fetch.resolver import Resolver
from p2pimg.node.config import Config, load_config
from p2pimg.ops import admin
from p2pimg.ops.publish import publish
from p2pimg.sources.origins import FileOrigin, open_origin
from p2pimg.store.chunks import ChunkStore


def _common(p: argparse.ArgumentParser, *, origin: bool = True) -> None:
    p.add_argument("--home", metavar="DIR",
                   help="state directory (default: $P2PIMG_HOME, else ~/.local/share/p2pimg)")
    if origin:
        p.add_argument("--origin", metavar="URL",
                       help="origin URL (default: $P2PIMG_ORIGIN or file://$P2PIMG_HOME/origin)")


def _trust(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust", action="append", metavar="PUBFILE",
                   help="trust tags signed by this publisher key (repeatable; also $P2PIMG_HOME/trust/*.pub)")


def _peers(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peer", action="append", metavar="URL",
                   help="a peer's address, e.g. http://10.0.0.5:5051 (repeatable)")
    p.add_argument("--swarm-key-file", metavar="PATH",
                   help="the LAN's shared key (default: $P2PIMG_SWARM_KEY, else $P2PIMG_HOME/swarm.key)")
    p.add_argument("--no-mdns", action="store_true", help="neither advertise nor browse with mDNS")
    p.add_argument("--peer-tls-cert", metavar="PEM", help="this node's certificate for mutual TLS between "
                   "peers (with --peer-tls-key and --peer-tls-ca; default: $P2PIMG_HOME/tls/peer.crt)")
    p.add_argument("--peer-tls-key", metavar="PEM",
                   help="its private key (default: $P2PIMG_HOME/tls/peer.key)")
    p.add_argument("--peer-tls-ca", metavar="PEM",
                   help="the swarm's CA: peers must present a certificate it signed (default: "
                   "$P2PIMG_HOME/tls/ca.crt)")


def _trust_store(config: Config) -> signing.TrustStore:
    return signing.TrustStore.load(config.home, [Path(p) for p in config.trust])


def _config(args: argparse.Namespace) -> Config:
    return load_config(home=args.home, origin=getattr(args, "origin", None),
                       listen=getattr(args, "listen", None),
                       chunk_size=getattr(args, "chunk_size", None),
                       upstreams=getattr(args, "upstream", None),
                       upstream_tag_ttl=getattr(args, "upstream_tag_ttl", None),
                       policy=getattr(args, "policy", None),
                       peer_listen=getattr(args, "peer_listen", None),
                       peers=getattr(args, "peer", None),
                       mdns=False if getattr(args, "no_mdns", False) else None,
                       peer_rate=getattr(args, "peer_rate", None),
                       peer_max_requests=getattr(args, "peer_max_requests", None),
                       cache_max=getattr(args, "cache_max", None),
                       trust=getattr(args, "trust", None),
                       swarm_key_file=getattr(args, "swarm_key_file", None),
                       peer_tls=(getattr(args, "peer_tls_cert", None), getattr(args, "peer_tls_key", None),
                                 getattr(args, "peer_tls_ca", None)),
                       allow_public_mirror=getattr(args, "allow_public_mirror", None) or None)


def cmd_publish(args: argparse.Namespace) -> int:
    from p2pimg.content.referrers import DEFAULT_FILE_MEDIA_TYPE, parse_annotations
    from p2pimg.errors import InvalidInput
    from p2pimg.ops.publish import attach

    if args.attach and args.source is not None:
        raise InvalidInput("publish --attach takes NAME:TAG alone (the image published under it), not a "
                           f"SOURCE ({args.source[:100]!r})")
    if not args.attach and args.source is None:
        raise InvalidInput("publish needs SOURCE and NAME:TAG (or --attach FILE --artifact-type TYPE "
                           "NAME:TAG)")
    if not args.attach and (args.artifact_type or args.media_type or args.annotation):
        raise InvalidInput("--artifact-type, --media-type and --annotation go with --attach FILE")
    if args.attach and not args.artifact_type:
        raise InvalidInput("publish --attach needs --artifact-type TYPE (e.g. application/spdx+json)")
    annotations = parse_annotations(args.annotation or [])
    name, tag = parse_name_tag(args.ref)
    config = _config(args)
    origin = open_origin(config.origin, config.home)
    signer = signing.load_signer(config.home)  # tag records are signed when the home has a key

    def progress(msg: str) -> None:
        if args.verbose:
            print(msg, file=sys.stderr)

    if args.attach:
        # The image is read as any reader of the origin would: its tag record must pass this home's
        # trust policy before a new root is built on it (and signed).
        resolver = Resolver(ChunkStore(config.cache_dir), origin, trust=_trust_store(config),
                            home=config.home)
        report = trio.run(lambda: attach(
            resolver, name, tag, [Path(f) for f in args.attach], origin, artifact_type=args.artifact_type,
            media_type=args.media_type or DEFAULT_FILE_MEDIA_TYPE, annotations=annotations,
            chunk_size=config.chunk_size, progress=progress, signer=signer))
        print(f"attached {report.artifact} ({args.artifact_type}) to {name}:{tag} in {origin.url}: "
              f"{report.blobs_uploaded} blobs uploaded ({report.bytes_uploaded} bytes); {name}:{tag} now "
              "points at the image root below", file=sys.stderr)
        print(report.root)
        return 0
    report = trio.run(lambda: publish(args.source, name, tag, origin, chunk_size=config.chunk_size,
                                      progress=progress, signer=signer))
    print(f"published {name}:{tag} to {origin.url}: {report.blobs_uploaded} blobs uploaded "
          f"({report.bytes_uploaded} bytes), {report.blobs_skipped} already there",
          file=sys.stderr)
    print(report.root)
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    config = _config(args)
    pub = signing.generate_key(config.home)
    print(f"publisher key made; the private key stays in {config.home}; give this file to "
          "those who should trust your tags (--trust, or their home's trust/ directory):", file=sys.stderr)
    print(pub)
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    name, tag = parse_name_tag(args.ref)
    config = _config(args)
    origin = open_origin(config.origin, config.home)
    resolver = Resolver(ChunkStore(config.cache_dir), origin, trust=_trust_store(config), home=config.home)
    print(trio.run(resolver.resolve_tag, name, tag))
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    config = _config(args)
    origin = open_origin(config.origin, config.home)
    if config.origin and isinstance(origin, FileOrigin) and not origin.root.is_dir():
        # A home's own origin is made by its first publish; one named by hand must be there.
        raise OriginNotFound(f"origin {origin.url} does not exist (no directory {origin.root})")
    names = trio.run(admin.list_tags, origin)
    for name, tags in names.items():
        for tag in tags:
            print(f"{name}:{tag}")
    if not names:
        print(f"no images are published in {origin.url}", file=sys.stderr)
    return 0


def cmd_untag(args: argparse.Namespace) -> int:
    name, tag = parse_name_tag(args.ref)
    config = _config(args)
    origin = open_origin(config.origin, config.home)
    trio.run(admin.untag, origin, name, tag)
    print(f"removed {name}:{tag} from {origin.url}; `p2pimg gc` deletes what it alone used", file=sys.stderr)
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    config = _config(args)
    grace = admin.parse_duration(args.grace)
    origin = open_origin(config.origin, config.home)

    async def run() -> int:
        plan = await admin.plan_gc(origin, grace=grace)
        if plan.problems:
            for problem in plan.problems:
                print(f"p2pimg: cannot read {problem}", file=sys.stderr)
            print("p2pimg: error: nothing deleted: fix or untag the images above first", file=sys.stderr)
            return 5
        for key in plan.garbage:
            print(key)
        if plan.young:
            print(f"kept {len(plan.young)} unreachable objects written less than {args.grace} ago "
                  "(a publish in progress may need them; --grace sets how long)", file=sys.stderr)
        if not args.yes:
            print(f"{len(plan.garbage)} objects are unreachable from any tag in {origin.url}; "
                  "run again with --yes to delete them", file=sys.stderr)
            return 0
        deleted = await admin.run_gc(origin, plan)
        print(f"deleted {deleted} objects from {origin.url}", file=sys.stderr)
        return 0

    return trio.run(run)


def cmd_serve(args: argparse.Namespace) -> int:
    from p2pimg.web.serve import serve

    trio.run(serve, _config(args))
    return 0


def cmd_warm(args: argparse.Namespace) -> int:
    from p2pimg.cli.warm import run_warm

    config = _config(args)
    code = trio.run(lambda: run_warm(config, args.ref, lan=args.lan))
    if code == 0 and args.pin:
        _pin(config, args.ref)
    return code


def _pin(config: Config, ref: str) -> None:
    from p2pimg.node import pins

    store = ChunkStore(config.cache_dir)
    resolver = Resolver(store, open_origin(config.origin, config.home), trust=_trust_store(config),
                        home=config.home)
    root, digests = trio.run(pins.pin, store, resolver, ref)
    print(f"pinned {ref} ({root}): {len(digests)} blobs", file=sys.stderr)


def cmd_cache_ls(args: argparse.Namespace) -> int:
    from p2pimg.store.cache import human, scan

    state = scan(ChunkStore(_config(args).cache_dir))
    print(f"complete blobs: {len(state.blobs)}")
    for b in sorted(state.blobs, key=lambda b: b.last_used, reverse=True):
        used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(b.last_used))
        print(f"  {b.digest}  {b.size:>12}  {used}  {'pinned' if b.pinned else '-'}")
    print(f"partial blobs: {len(state.partials)}")
    for p in state.partials:
        print(f"  {p.digest}  verified {p.verified} of {p.size} bytes")
    pinned = sum(b.size for b in state.blobs if b.pinned)
    print(f"total: {state.total} bytes ({human(state.total)}): blobs {state.blob_bytes}, "
          f"partial {state.partial_bytes}, blocks {sum(f.size for f in state.blocks)} "
          f"({len(state.blocks)}), tmp {sum(f.size for f in state.tmp)}, "
          f"tags and pins {sum(f.size for f in state.meta)}; pinned blobs {pinned}")
    return 0


def cmd_cache_gc(args: argparse.Namespace) -> int:
    from p2pimg.store.cache import collect, human, parse_limit

    limit = parse_limit(args.max_size)
    result = collect(ChunkStore(_config(args).cache_dir), limit)
    for item in result.removed:
        print(f"removed {item.kind} {item.name} ({item.size} bytes)")
    print(f"cache: {human(result.before)} -> {human(result.after)} (limit {human(limit)}), "
          f"{len(result.removed)} removed", file=sys.stderr)
    if not result.fits:
        print("p2pimg: the rest is pinned, recently written partial/staging files, or metadata",
              file=sys.stderr)
    return 0


def cmd_cache_verify(args: argparse.Namespace) -> int:
    from p2pimg.store.cache import Removed, verify

    def report(item: Removed) -> None:
        print(f"removed corrupt {item.kind} {item.name} ({item.size} bytes)")

    removed = verify(ChunkStore(_config(args).cache_dir), report)
    if removed:
        print(f"p2pimg: {len(removed)} corrupt files removed; they are fetched again on next use",
              file=sys.stderr)
        return 1
    print("cache verified: no corrupt blobs or blocks", file=sys.stderr)
    return 0


def cmd_cache_pin(args: argparse.Namespace) -> int:
    _pin(_config(args), args.ref)
    return 0


def cmd_cache_unpin(args: argparse.Namespace) -> int:
    from p2pimg.node import pins

    config = _config(args)
    store = ChunkStore(config.cache_dir)
    resolver = Resolver(store, open_origin(config.origin, config.home), trust=_trust_store(config),
                        home=config.home)
    roots = trio.run(pins.unpin, store, resolver, args.ref)
    print(f"unpinned {args.ref} ({', '.join(roots)})", file=sys.stderr)
    return 0


def cmd_containerd_config(args: argparse.Namespace) -> int:
    from p2pimg.cli.clientconfig import containerd_hosts_toml

    print(containerd_hosts_toml(args.registry, args.mirror), end="")
    return 0


def cmd_podman_config(args: argparse.Namespace) -> int:
    from p2pimg.cli.clientconfig import podman_registries_conf

    print(podman_registries_conf(args.registry, args.mirror), end="")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from p2pimg.cli.demo import run_demo

    if args.home is not None:
        return run_demo(_config(args), client=args.client)
    # Not the user's home: one of the demo's own, with its own origin, removed afterwards.
    with tempfile.TemporaryDirectory(prefix="p2pimg-demo-home-") as home:
        args.home, args.origin = home, args.origin or Path(home, "origin").as_uri()
        return run_demo(_config(args), client=args.client, temporary_home=True)


def cmd_sample(args: argparse.Namespace) -> int:
    from p2pimg.cli.demo import run_sample

    return run_sample(args.dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2pimg", description=helptext.DESCRIPTION, epilog=helptext.EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"p2pimg {__version__}",
                        help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log more: informational messages, and publish's progress")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("publish", help="publish an image to the origin; prints its root CID",
                       description=helptext.ABOUT["publish"])
    p.add_argument("source", metavar="SOURCE", nargs="?",
                   help="oci:DIR[:TAG] (an OCI image layout; TAG may be left out when it holds one image; "
                        "the layout's artifacts whose subject is one of the image's manifests come "
                        "along), docker-archive:FILE[:NAME:TAG] (a `docker save` tarball; NAME:TAG picks "
                        "one of several images) or docker://HOST/REPO:TAG (an image in a registry); "
                        "left out with --attach")
    p.add_argument("ref", metavar="NAME:TAG", help="the name and tag to publish it as, e.g. demo/app:1")
    p.add_argument("--chunk-size", metavar="SIZE",
                   help="chunk size, a power of two from 4K to 64M (default: $P2PIMG_CHUNK_SIZE, else "
                        "config.toml's chunk_size, else 1M)")
    p.add_argument("--attach", action="append", metavar="FILE",
                   help="instead of publishing an image, attach FILE (repeatable: one artifact, a layer "
                        "per file) to the image NAME:TAG points at, as an OCI artifact whose subject is its "
                        "top manifest (listed by the registry's referrers API); the tag moves to the new "
                        "image root")
    p.add_argument("--artifact-type", metavar="TYPE",
                   help="with --attach: the artifact's type, e.g. application/spdx+json or "
                        "application/vnd.example.signature.v1 (required)")
    p.add_argument("--media-type", metavar="TYPE",
                   help="with --attach: the media type of the files (default application/octet-stream)")
    p.add_argument("--annotation", action="append", metavar="KEY=VALUE",
                   help="with --attach: an annotation of the artifact (repeatable; "
                        "org.opencontainers.image.created is set to now unless given)")
    _common(p)
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("keygen", help="make this home's ed25519 publisher key; prints the .pub path",
                       description=helptext.ABOUT["keygen"])
    _common(p, origin=False)
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("resolve", help="print the root CID a NAME:TAG points at",
                       description=helptext.ABOUT["resolve"])
    _trust(p)
    p.add_argument("ref", metavar="NAME:TAG", help="a published image, e.g. demo/app:1")
    _common(p)
    p.set_defaults(func=cmd_resolve)

    p = sub.add_parser("ls", help="list the published NAME:TAGs of the origin",
                       description=helptext.ABOUT["ls"])
    _common(p)
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("untag", help="remove a tag from the origin (its content stays until gc)",
                       description=helptext.ABOUT["untag"])
    p.add_argument("ref", metavar="NAME:TAG", help="the tag to remove")
    _common(p)
    p.set_defaults(func=cmd_untag)

    p = sub.add_parser("gc", help="list (or with --yes delete) origin objects no tag reaches",
                       description=helptext.ABOUT["gc"])
    p.add_argument("--yes", action="store_true", help="delete them (default: dry run, only list)")
    p.add_argument("--grace", default="1h", metavar="DURATION",
                   help="spare objects written less than this long ago, e.g. 30m, 0 (default %(default)s)")
    _common(p)
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("serve", help="run the read-only OCI registry in the foreground",
                       description=helptext.ABOUT["serve"])
    _trust(p)
    p.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (default 127.0.0.1:5050)")
    p.add_argument("--upstream", action="append", metavar="URL",
                   help="pull-through mirror of this registry for names not published here "
                        "(repeatable; credentials from ~/.docker/config.json)")
    p.add_argument("--upstream-tag-ttl", type=float, metavar="SECONDS",
                   help="re-check mutable upstream tags after this long (default 300)")
    p.add_argument("--allow-public-mirror", action="store_true",
                   help="mirror with registry credentials even though --listen is beyond loopback "
                        "(anyone who reaches it can pull what they reach)")
    p.add_argument("--policy", choices=sorted(POLICIES),
                   help="which source sends each chunk: prefer-near (LAN peers, then the origin, then "
                        "upstream; the default) or origin-only (never peers)")
    p.add_argument("--peer-listen", metavar="HOST:PORT",
                   help="share this cache with LAN peers on this address (off by default)")
    p.add_argument("--peer-rate", metavar="BYTES/S", help="upload limit to peers, e.g. 50M (default: none)")
    p.add_argument("--peer-max-requests", type=int, metavar="N",
                   help="concurrent uploads to peers (blob spans, blocks) before answering 429 (default 32)")
    p.add_argument("--cache-max", metavar="SIZE",
                   help="evict least recently used unpinned blobs to keep the cache under this, e.g. 20G")
    _peers(p)
    _common(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("warm", help="fetch an image completely into the cache (--lan: into every peer's)",
                       description=helptext.ABOUT["warm"])
    _trust(p)
    p.add_argument("ref", metavar="REF", help="NAME:TAG or ipfs/<CID>")
    p.add_argument("--lan", action="store_true", help="ask every known peer to warm it too")
    p.add_argument("--pin", action="store_true", help="pin the image once warmed (never evicted)")
    _peers(p)
    _common(p)
    p.set_defaults(func=cmd_warm)

    p = sub.add_parser("cache", help="manage the local cache: ls, gc, verify, pin, unpin",
                       description=helptext.ABOUT["cache"])
    cache_sub = p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    c = cache_sub.add_parser("ls", help="list cached blobs, partial blobs and totals",
                             description=helptext.ABOUT["cache ls"])
    _common(c, origin=False)
    c.set_defaults(func=cmd_cache_ls)
    c = cache_sub.add_parser("gc", help="evict least recently used unpinned blobs until the cache fits",
                             description=helptext.ABOUT["cache gc"])
    c.add_argument("--max-size", required=True, metavar="SIZE", help="the size to fit in, e.g. 20G")
    _common(c, origin=False)
    c.set_defaults(func=cmd_cache_gc)
    c = cache_sub.add_parser("verify", help="re-hash every blob and block, remove corrupt ones (exit 1)",
                             description=helptext.ABOUT["cache verify"])
    _common(c, origin=False)
    c.set_defaults(func=cmd_cache_verify)
    c = cache_sub.add_parser("pin", help="never evict the blobs of an image",
                             description=helptext.ABOUT["cache pin"])
    c.add_argument("ref", metavar="REF", help="NAME:TAG or ipfs/<CID>")
    _common(c)
    c.set_defaults(func=cmd_cache_pin)
    c = cache_sub.add_parser("unpin", help="remove a pin",
                             description=helptext.ABOUT["cache unpin"])
    c.add_argument("ref", metavar="REF", help="NAME:TAG or ipfs/<CID>")
    _common(c)
    c.set_defaults(func=cmd_cache_unpin)

    p = sub.add_parser("containerd-config", help="print a hosts.toml making p2pimg a containerd mirror",
                       description=helptext.ABOUT["containerd-config"])
    p.add_argument("--registry", default="docker.io", help="registry to mirror (default docker.io)")
    p.add_argument("--mirror", default="http://127.0.0.1:5050", help="p2pimg's address (default %(default)s)")
    p.set_defaults(func=cmd_containerd_config)

    p = sub.add_parser("podman-config", help="print a registries.conf entry making p2pimg a podman mirror",
                       description=helptext.ABOUT["podman-config"])
    p.add_argument("--registry", default="docker.io", help="registry to mirror (default docker.io)")
    p.add_argument("--mirror", default="http://127.0.0.1:5050", help="p2pimg's address (default %(default)s)")
    p.set_defaults(func=cmd_podman_config)

    p = sub.add_parser("demo", help="make a sample image, publish it, pull it through the proxy",
                       description=helptext.ABOUT["demo"])
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="proxy address (default 127.0.0.1:5050; a free port when that one is busy)")
    p.add_argument("--client", choices=["skopeo", "podman", "ctr"], default="skopeo",
                   help="the client that pulls (default %(default)s; ctr needs a running containerd)")
    p.add_argument("--home", metavar="DIR",
                   help="work in this home and keep it (default: a temporary one; $P2PIMG_HOME is not used)")
    p.add_argument("--origin", metavar="URL", help="publish the sample image there (default: the demo "
                   "home's own origin; with --home, $P2PIMG_ORIGIN or file://DIR/origin)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("sample", help="write a sample image as an OCI layout and a docker archive",
                       description=helptext.ABOUT["sample"])
    p.add_argument("dir", metavar="DIR", nargs="?", default=".",
                   help="where to write layout/ and app.tar (default: the current directory); "
                        "neither may exist yet")
    p.set_defaults(func=cmd_sample)
    return parser


class OneLineFormatter(logging.Formatter):
    """Log lines carry names, paths and messages that came from the network: control characters
    in them are escaped, so no request can forge a line of the log (tracebacks stay as they are)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), line)


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter("p2pimg: %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, handlers=[handler])
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except P2pimgError as exc:
        print(f"p2pimg: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
