"""`p2pimg export REF FILE.car`: an image's whole DAG as a CAR v1 file, for any IPFS node.

The image is first warmed like `p2pimg warm` does it (through the server of the same home when
one runs, else with a node of this process): whatever the cache lacks is fetched and verified.
Then the CAR is written from the cache, by the very walk the peer listener's gateway answers
`/ipfs/<root>?format=car` with: the root, each blob map followed by its chunks, the manifests,
each block once, depth-first (what `ipfs dag import` takes). Every chunk is checked against its
CID first (a blob cached through another image was checked by its digest only). It goes to a
temporary file next to FILE, fsynced and renamed, so FILE is either the whole CAR or untouched.

An image `nerdctl push ipfs://` made (`ipfs/<its CID>`) is exported as nerdctl stored it: its
root (the raw block of its descriptor), then the UnixFS DAG of each of its files (the index, each
manifest, then its config and layers), the blocks in the order nerdctl's push lists them. That
takes the blocks from the cache: the descriptor and the manifests' files are kept whole, the
dag-pb nodes above a blob's leaves too, and when the leaves are raw blocks of one power-of-two
size (Kubo's default chunker) they are the chunks of the cached blob. Any other layout (other
leaf sizes, data inside dag-pb nodes) is pulled and checked by the blob's digest, its leaves not
kept as blocks: exporting such an image is refused, saying so and what to do instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import trio

from p2pimg.cli.warm import follow_progress, summary, warm_through
from p2pimg.content.car import MAX_BLOCK
from p2pimg.content.cid import Cid
from p2pimg.content.model import BlobMap
from p2pimg.errors import InvalidInput, P2pimgError, VerificationError
from p2pimg.fetch.nerdctl import NerdctlImage
from p2pimg.node.config import Config
from p2pimg.node.node import Node, open_node, peer_client, read_serve_info
from p2pimg.node.peertls import load_peer_tls
from p2pimg.node.swarmkey import load_swarm_key
from p2pimg.node.warm import WarmProgress, parse_ref
from p2pimg.web.gateway import Gateway
from p2pimg.web.server import AbortResponse, BodyPart, FileRegion

_PIECE = 1 << 20


def cmd_export(args: argparse.Namespace) -> int:
    from p2pimg.cli.commands import _config

    root = trio.run(run_export, _config(args), args.ref, Path(args.file))
    print(root)
    return 0


def _failed(ref: str, status: dict[str, object]) -> P2pimgError:
    """A failed warm as the error `export` exits with (its exit code: 3 not found, 5 origin...)."""
    err = P2pimgError(f"cannot export {ref}: {status.get('error')}")
    code = status.get("exit_code")
    err.exit_code = code if isinstance(code, int) and 0 < code < 128 else 1
    return err


async def run_export(config: Config, ref: str, out: Path) -> Cid:
    """Warm `ref`, then write its CAR to `out`; the image's root CID."""
    parse_ref(ref)
    if out.is_dir() or not out.parent.is_dir():
        raise InvalidInput(f"cannot write {out}: expected a file in an existing directory")
    root: Cid | None = None
    info = read_serve_info(config)
    if info is not None:
        key = load_swarm_key(config.home, config.swarm_key_file, given=config.swarm_key_file_given)
        tls = load_peer_tls(config.home, *config.peer_tls)
        base = f"http://{info['registry']}"
        print(f"p2pimg: fetching through the server of this home at {base}", file=sys.stderr)
        async with peer_client(key, tls, timeout=httpx.Timeout(30, connect=2)) as client:
            status = await warm_through(client, base, ref)
        if status.get("state") != "done":
            raise _failed(ref, status)
        print(f"p2pimg: {summary(ref, status)}", file=sys.stderr)
        root = Cid.parse(str(status.get("root")))
        # Everything is in the shared cache now: this process needs neither peers nor mDNS.
        config = replace(config, mdns=False, peers=(), peer_dns=(), peer_listen=None)
    failure: P2pimgError | None = None
    async with open_node(config) as node:
        # Errors are kept for after the node's nursery, which would wrap them in a group.
        try:
            root, size = await _export(node, ref, root, out)
        except P2pimgError as exc:
            failure = exc
    if failure is not None:
        raise failure
    assert root is not None
    print(f"p2pimg: exported {ref} ({root}) to {out}: {size} bytes", file=sys.stderr)
    return root


async def _export(node: Node, ref: str, root: Cid | None, out: Path) -> tuple[Cid, int]:
    """Warm `ref` with `node` unless done (`root` known), then write the CAR: (root, bytes)."""
    if root is None:
        progress: WarmProgress = node.warm.jobs[node.warm.start(ref)]

        async def poll() -> dict[str, object]:
            return progress.to_json()

        status = await follow_progress(poll, f"fetching {ref}")
        if status.get("state") != "done":
            raise _failed(ref, status)
        root = Cid.parse(progress.root)
    # The walk reads blocks from the cache only: make sure each is there (a blob cached before,
    # through another image, may have left its map uncached).
    image = await node.resolver.image(root)
    for digest, entry in image.manifests.items():
        await node.resolver.manifest(entry, digest)
    for digest, blob in image.blobs.items():
        bmap = await node.resolver.blob_map(blob, digest)
        if not bmap.checked:  # only a nerdctl image's blobs can have such maps
            raise InvalidInput(_not_kept(ref, digest))
        if bmap.size > MAX_BLOCK and bmap.chunk_size > MAX_BLOCK:
            raise InvalidInput(
                f"cannot export {ref}: it was published in chunks of {bmap.chunk_size >> 20} MiB, over "
                f"the block limit of IPFS ({MAX_BLOCK >> 20} MiB); publish it again with --chunk-size 2M "
                "or less"
            )
        # A blob cached through another image was checked by its digest, not by these chunk CIDs.
        await trio.to_thread.run_sync(_check_chunks, node.store.blob_path(digest), bmap, ref)
    gateway = Gateway(node.store, node.fetcher, node.chunk_index, hidden=lambda _sha256: False)
    # A nerdctl image's root is the raw block of its descriptor: its files follow it, in nerdctl's order.
    files = image.files if isinstance(image, NerdctlImage) else ()
    try:
        return root, await write_atomically(gateway.export(root, files), out)
    except AbortResponse as exc:
        raise P2pimgError(f"cannot export {ref}: {exc}") from None


def _not_kept(ref: str, digest: str) -> str:
    return (
        f"cannot export {ref}: nerdctl stored blob {digest} as a UnixFS file whose leaves are not "
        "raw blocks of one power-of-two size (another chunker than Kubo's default, or data inside "
        "dag-pb nodes); p2pimg then checks the blob by its digest and keeps its bytes, not those "
        "leaves as IPFS blocks, so it cannot write the image's DAG as nerdctl stored it. Export it "
        "from an IPFS node that holds it (`ipfs dag export` of the image CID and of each ipfs:// "
        "URL in its manifests), or publish it with p2pimg (`p2pimg publish "
        f"docker://127.0.0.1:5050/{ref}:latest NAME:TAG`) and export that (a p2pimg DAG, another root CID)"
    )


def _check_chunks(path: Path, bmap: BlobMap, ref: str) -> None:
    """Every chunk of a cached blob against its CID in `bmap`, read a chunk at a time (at most
    2 MiB: checked before). A blob of one chunk is that chunk: its digest was checked."""
    if not bmap.checked or bmap.chunks in ((), (Cid.from_digest(bmap.digest),)):
        return
    try:
        with path.open("rb") as f:
            for i, cid in enumerate(bmap.chunks):
                lo, hi = bmap.bounds(i)
                if not cid.matches(f.read(hi - lo)):
                    raise VerificationError(
                        f"cannot export {ref}: chunk {i} of blob {bmap.digest} in the cache is not "
                        f"{cid} (the blob matches its digest, but not this image's chunk CIDs)"
                    )
    except FileNotFoundError:
        raise P2pimgError(f"cannot export {ref}: blob {bmap.digest} left the cache; try again") from None


async def write_atomically(parts: AsyncIterator[BodyPart], out: Path) -> int:
    """Write a body (bytes and file regions) to `out` through a temporary file: fsynced, then
    renamed over it; on any failure the temporary file is removed and `out` left as it was."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    written = 0
    try:
        async with contextlib.aclosing(parts):  # type: ignore[type-var]
            async for part in parts:
                written += await trio.to_thread.run_sync(_write_part, fd, part)
        await trio.to_thread.run_sync(os.fsync, fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, out)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return written


def _write_part(fd: int, part: BodyPart) -> int:
    if isinstance(part, FileRegion):  # a chunk in a cached blob: copied a piece at a time
        done = 0
        while done < part.length:
            piece = os.pread(part.fd, min(_PIECE, part.length - done), part.offset + done)
            if not piece:
                raise P2pimgError("a cached blob is shorter than its blob map says")
            _write_all(fd, piece)
            done += len(piece)
        return done
    _write_all(fd, part)
    return len(part)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
