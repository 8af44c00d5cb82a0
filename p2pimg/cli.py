"""The `p2pimg` command line: commands, exit codes, and nothing else."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

import trio

from . import __version__, admin
from .config import Config, load_config
from .errors import P2pimgError
from .model import parse_name_tag
from .origins import open_origin
from .policy import POLICIES
from .publish import publish
from .resolver import Resolver
from .store import ChunkStore


def _common(p: argparse.ArgumentParser, *, origin: bool = True) -> None:
    p.add_argument("--home", help="state directory (default: $P2PIMG_HOME or the XDG data dir)")
    if origin:
        p.add_argument("--origin", metavar="URL",
                       help="origin URL (default: $P2PIMG_ORIGIN or file://$P2PIMG_HOME/origin)")


def _peers(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peer", action="append", metavar="URL",
                   help="a peer's address, e.g. http://10.0.0.5:5051 (repeatable)")
    p.add_argument("--no-mdns", action="store_true", help="neither advertise nor browse with mDNS")


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
                       peer_max_requests=getattr(args, "peer_max_requests", None))


def cmd_publish(args: argparse.Namespace) -> int:
    name, tag = parse_name_tag(args.ref)
    config = _config(args)
    origin = open_origin(config.origin, config.home)

    def progress(msg: str) -> None:
        if args.verbose:
            print(msg, file=sys.stderr)

    report = trio.run(lambda: publish(args.source, name, tag, origin, chunk_size=config.chunk_size,
                                      progress=progress))
    print(f"published {name}:{tag} to {origin.url}: {report.blobs_uploaded} blobs uploaded "
          f"({report.bytes_uploaded} bytes), {report.blobs_skipped} already there",
          file=sys.stderr)
    print(report.root)
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    name, tag = parse_name_tag(args.ref)
    config = _config(args)
    origin = open_origin(config.origin, config.home)
    resolver = Resolver(ChunkStore(config.cache_dir), origin)
    print(trio.run(resolver.resolve_tag, name, tag))
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    config = _config(args)
    origin = open_origin(config.origin, config.home)
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
    origin = open_origin(config.origin, config.home)

    async def run() -> int:
        plan = await admin.plan_gc(origin)
        if plan.problems:
            for problem in plan.problems:
                print(f"p2pimg: cannot read {problem}", file=sys.stderr)
            print("p2pimg: error: nothing deleted: fix or untag the images above first", file=sys.stderr)
            return 5
        for key in plan.garbage:
            print(key)
        if not args.yes:
            print(f"{len(plan.garbage)} objects are unreachable from any tag in {origin.url}; "
                  "run again with --yes to delete them", file=sys.stderr)
            return 0
        deleted = await admin.run_gc(origin, plan)
        print(f"deleted {deleted} objects from {origin.url}", file=sys.stderr)
        return 0

    return trio.run(run)


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    trio.run(serve, _config(args))
    return 0


def cmd_warm(args: argparse.Namespace) -> int:
    from .warmcli import run_warm

    return trio.run(lambda: run_warm(_config(args), args.ref, lan=args.lan))


def cmd_containerd_config(args: argparse.Namespace) -> int:
    from .upstream import containerd_hosts_toml

    print(containerd_hosts_toml(args.registry, args.mirror), end="")
    return 0


def cmd_podman_config(args: argparse.Namespace) -> int:
    from .upstream import podman_registries_conf

    print(podman_registries_conf(args.registry, args.mirror), end="")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(_config(args), client=args.client)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2pimg", description=__doc__)
    parser.add_argument("--version", action="version", version=f"p2pimg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("publish", help="publish an image to the origin; prints its root CID")
    p.add_argument("source", metavar="SOURCE",
                   help="oci:DIR[:TAG], docker-archive:FILE or docker://HOST/REPO:TAG (from a registry)")
    p.add_argument("ref", metavar="NAME:TAG")
    p.add_argument("--chunk-size", help="chunk size, a power of two dividing 64MiB (default 1MiB)")
    _common(p)
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("resolve", help="print the root CID a NAME:TAG points at")
    p.add_argument("ref", metavar="NAME:TAG")
    _common(p)
    p.set_defaults(func=cmd_resolve)

    p = sub.add_parser("ls", help="list the published NAME:TAGs of the origin")
    _common(p)
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("untag", help="remove a tag from the origin (its content stays until gc)")
    p.add_argument("ref", metavar="NAME:TAG")
    _common(p)
    p.set_defaults(func=cmd_untag)

    p = sub.add_parser("gc", help="list (or with --yes delete) origin objects no tag reaches")
    p.add_argument("--yes", action="store_true", help="delete them (default: dry run, only list)")
    _common(p)
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("serve", help="run the read-only OCI registry in the foreground")
    p.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (default 127.0.0.1:5050)")
    p.add_argument("--upstream", action="append", metavar="URL",
                   help="pull-through mirror of this registry for names not published here "
                        "(repeatable; credentials from ~/.docker/config.json)")
    p.add_argument("--upstream-tag-ttl", type=float, metavar="SECONDS",
                   help="re-check mutable upstream tags after this long (default 300)")
    p.add_argument("--policy", choices=sorted(POLICIES), help="source selection policy (default prefer-near)")
    p.add_argument("--peer-listen", metavar="HOST:PORT",
                   help="share this cache with LAN peers on this address (off by default)")
    p.add_argument("--peer-rate", metavar="BYTES/S", help="upload limit to peers, e.g. 50M (default: none)")
    p.add_argument("--peer-max-requests", type=int, metavar="N",
                   help="concurrent peer requests served before answering 429 (default 32)")
    _peers(p)
    _common(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("warm", help="fetch an image completely into the cache (--lan: into every peer's)")
    p.add_argument("ref", metavar="REF", help="NAME:TAG or ipfs/<CID>")
    p.add_argument("--lan", action="store_true", help="ask every known peer to warm it too")
    _peers(p)
    _common(p)
    p.set_defaults(func=cmd_warm)

    p = sub.add_parser("containerd-config", help="print a hosts.toml making p2pimg a containerd mirror")
    p.add_argument("--registry", default="docker.io", help="registry to mirror (default docker.io)")
    p.add_argument("--mirror", default="http://127.0.0.1:5050", help="p2pimg's address (default %(default)s)")
    p.set_defaults(func=cmd_containerd_config)

    p = sub.add_parser("podman-config", help="print a registries.conf entry making p2pimg a podman mirror")
    p.add_argument("--registry", default="docker.io", help="registry to mirror (default docker.io)")
    p.add_argument("--mirror", default="http://127.0.0.1:5050", help="p2pimg's address (default %(default)s)")
    p.set_defaults(func=cmd_podman_config)

    p = sub.add_parser("demo", help="make a sample image, publish it, pull it through the proxy")
    p.add_argument("--listen", metavar="HOST:PORT", help="proxy address (default 127.0.0.1:5050)")
    p.add_argument("--client", choices=["skopeo", "podman", "ctr"], default="skopeo")
    _common(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="p2pimg: %(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except P2pimgError as exc:
        print(f"p2pimg: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
