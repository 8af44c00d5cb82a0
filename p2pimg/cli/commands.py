"""What each `p2pimg` command does, once its arguments are parsed (`main.py` parses them)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import trio

from p2pimg.content import signing
from p2pimg.content.cid import Cid
from p2pimg.content.model import parse_name_tag
from p2pimg.errors import OriginNotFound
from p2pimg.fetch.resolver import Resolver
from p2pimg.node.config import Config, load_config
from p2pimg.ops import admin
from p2pimg.ops.publish import publish
from p2pimg.sources.origins import FileOrigin, open_origin
from p2pimg.store.chunks import ChunkStore

_M_ARENA_MAX = -8  # mallopt's parameter numbers in glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def _trust_store(config: Config) -> signing.TrustStore:
    return signing.TrustStore.load(config.home, [Path(p) for p in config.trust])


def _config(args: argparse.Namespace) -> Config:
    return load_config(
        home=args.home,
        origin=getattr(args, "origin", None),
        listen=getattr(args, "listen", None),
        chunk_size=getattr(args, "chunk_size", None),
        upstreams=getattr(args, "upstream", None),
        upstream_tag_ttl=getattr(args, "upstream_tag_ttl", None),
        ipfs_gateways=getattr(args, "ipfs_gateway", None),
        policy=getattr(args, "policy", None),
        peer_listen=getattr(args, "peer_listen", None),
        peers=getattr(args, "peer", None),
        peer_dns=getattr(args, "peer_dns", None),
        mdns=False if getattr(args, "no_mdns", False) else None,
        peer_rate=getattr(args, "peer_rate", None),
        peer_max_requests=getattr(args, "peer_max_requests", None),
        cache_max=getattr(args, "cache_max", None),
        trust=getattr(args, "trust", None),
        swarm_key_file=getattr(args, "swarm_key_file", None),
        peer_tls=(
            getattr(args, "peer_tls_cert", None),
            getattr(args, "peer_tls_key", None),
            getattr(args, "peer_tls_ca", None),
        ),
        allow_public_mirror=getattr(args, "allow_public_mirror", None) or None,
        ui_read_only=getattr(args, "ui_read_only", None) or None,
        ui_socket=getattr(args, "ui_socket", None),
    )


def cmd_publish(args: argparse.Namespace) -> int:
    from p2pimg.content.referrers import DEFAULT_FILE_MEDIA_TYPE, parse_annotations
    from p2pimg.errors import InvalidInput
    from p2pimg.ops.publish import attach

    if args.attach and args.source is not None:
        raise InvalidInput(
            "publish --attach takes NAME:TAG alone (the image published under it), not a "
            f"SOURCE ({args.source[:100]!r})"
        )
    if not args.attach and args.source is None:
        raise InvalidInput(
            "publish needs SOURCE and NAME:TAG (or --attach FILE --artifact-type TYPE NAME:TAG)"
        )
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
        resolver = Resolver(
            ChunkStore(config.cache_dir), origin, trust=_trust_store(config), home=config.home
        )
        report = trio.run(
            lambda: attach(
                resolver,
                name,
                tag,
                [Path(f) for f in args.attach],
                origin,
                artifact_type=args.artifact_type,
                media_type=args.media_type or DEFAULT_FILE_MEDIA_TYPE,
                annotations=annotations,
                chunk_size=config.chunk_size,
                progress=progress,
                signer=signer,
            )
        )
        print(
            f"attached {report.artifact} ({args.artifact_type}) to {name}:{tag} in {origin.url}: "
            f"{report.blobs_uploaded} blobs uploaded ({report.bytes_uploaded} bytes); {name}:{tag} now "
            "points at the image root below",
            file=sys.stderr,
        )
        print(report.root)
        return 0
    report = trio.run(
        lambda: publish(
            args.source, name, tag, origin, chunk_size=config.chunk_size, progress=progress, signer=signer
        )
    )
    print(
        f"published {name}:{tag} to {origin.url}: {report.blobs_uploaded} blobs uploaded "
        f"({report.bytes_uploaded} bytes), {report.blobs_skipped} already there",
        file=sys.stderr,
    )
    print(report.root)
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    config = _config(args)
    pub = signing.generate_key(config.home)
    print(
        f"publisher key made; the private key stays in {config.home}; give this file to "
        "those who should trust your tags (--trust, or their home's trust/ directory):",
        file=sys.stderr,
    )
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
            print(
                f"kept {len(plan.young)} unreachable objects written less than {args.grace} ago "
                "(a publish in progress may need them; --grace sets how long)",
                file=sys.stderr,
            )
        if plan.leased:
            print(
                f"kept {len(plan.leased)} unreachable objects a running publish has leased "
                "(its tag will reach them)",
                file=sys.stderr,
            )
        if not args.yes:
            print(
                f"{len(plan.garbage)} objects are unreachable from any tag in {origin.url}; "
                "run again with --yes to delete them",
                file=sys.stderr,
            )
            return 0
        deleted = await admin.run_gc(origin, plan)
        print(f"deleted {deleted} objects from {origin.url}", file=sys.stderr)
        return 0

    return trio.run(run)


def cmd_serve(args: argparse.Namespace) -> int:
    from p2pimg.web.serve import serve

    _few_malloc_arenas()
    trio.run(serve, _config(args))
    return 0


def _few_malloc_arenas() -> None:
    """glibc gives each thread that allocates its own malloc arena (up to 8 per core), and each
    keeps what it freed: with a worker thread per chunk write, a server's resident memory grows
    by megabytes it does not use. Two arenas are plenty for one trio thread and its workers. And
    buffers of 256 KiB or more (chunks, file pieces) are mapped and unmapped on their own rather
    than left in an arena's heap once freed (glibc would raise that threshold to 32 MiB as it
    goes). (Before any thread starts; nothing happens where the C library is not glibc.)"""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(_M_ARENA_MAX, 2)
            libc.mallopt(_M_MMAP_THRESHOLD, 256 << 10)


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
    resolver = Resolver(
        store, open_origin(config.origin, config.home), trust=_trust_store(config), home=config.home
    )

    async def run() -> tuple[Cid, list[str]]:
        async with pins.reading_ipfs(resolver, config):  # `ipfs/<CID>` of a nerdctl image too
            return await pins.pin(store, resolver, ref)

    root, digests = trio.run(run)
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
    print(
        f"total: {state.total} bytes ({human(state.total)}): blobs {state.blob_bytes}, "
        f"partial {state.partial_bytes}, blocks {sum(f.size for f in state.blocks)} "
        f"({len(state.blocks)}), tmp {sum(f.size for f in state.tmp)}, "
        f"tags and pins {sum(f.size for f in state.meta)}; pinned blobs {pinned}"
    )
    return 0


def cmd_cache_gc(args: argparse.Namespace) -> int:
    from p2pimg.store.cache import collect, human, parse_limit

    limit = parse_limit(args.max_size)
    result = collect(ChunkStore(_config(args).cache_dir), limit)
    for item in result.removed:
        print(f"removed {item.kind} {item.name} ({item.size} bytes)")
    print(
        f"cache: {human(result.before)} -> {human(result.after)} (limit {human(limit)}), "
        f"{len(result.removed)} removed",
        file=sys.stderr,
    )
    if not result.fits:
        print(
            "p2pimg: the rest is pinned, recently written partial/staging files, or metadata", file=sys.stderr
        )
    return 0


def cmd_cache_verify(args: argparse.Namespace) -> int:
    from p2pimg.store.cache import Removed, verify

    def report(item: Removed) -> None:
        print(f"removed corrupt {item.kind} {item.name} ({item.size} bytes)")

    removed = verify(ChunkStore(_config(args).cache_dir), report)
    if removed:
        print(
            f"p2pimg: {len(removed)} corrupt files removed; they are fetched again on next use",
            file=sys.stderr,
        )
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
    resolver = Resolver(
        store, open_origin(config.origin, config.home), trust=_trust_store(config), home=config.home
    )

    async def run() -> list[str]:
        async with pins.reading_ipfs(resolver, config):
            return await pins.unpin(store, resolver, args.ref)

    roots = trio.run(run)
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
