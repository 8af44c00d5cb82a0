"""Pull-through mirror mode: names not published to p2pimg come from upstream registries.

Manifests: a tag is asked of the upstream (at most every `tag_ttl` seconds; the last answer is
served while the upstream is unreachable); a manifest by digest comes from the cache, else from a
LAN peer, else from the upstream, checked against its digest wherever it came from.

Blobs go through the fetch engine like any other content, each upstream a source of it
(`UpstreamSource`), with a map that has no chunk CIDs (`BlobMap.unchecked`): only the whole
blob's digest can check upstream bytes, and bytes from peers for such a blob likewise. What that
means for what may reach a client, a peer and the cache is the engine's and the registry's part
(docs/architecture.md, "Mirrored blobs through the swarm"): the client gets every byte but the
last until the digest matched, peers get only what a node fetched from the upstream itself until
then, and the cache only a blob whose digest matched.

What an upstream gives only with the user's credentials (from the Docker config) may be private:
its manifests and blobs are marked so before they exist here, and the peer listener serves marked
content only when a swarm key guards it (web/peerapi.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from p2pimg.content.cid import Cid, parse_digest
from p2pimg.content.model import DEFAULT_CHUNK_SIZE, MAX_MANIFEST_SIZE, BlobMap, check_name, check_tag
from p2pimg.errors import NameUnknown, OriginError, P2pimgError
from p2pimg.fetch.resolver import Manifest
from p2pimg.metrics import Metrics
from p2pimg.sources.upstream.client import UpstreamClient
from p2pimg.sources.upstream.refs import normalize_repo
from p2pimg.sources.upstream.source import UpstreamSource
from p2pimg.store.chunks import ChunkStore

log = logging.getLogger(__name__)

# An upstream registry, as the edge names one (from `Mirror.upstream_for`) without talking to it.
Upstream = UpstreamClient

_TAG_FILE_MAX = 512
_MAX_SIZES = 65536  # blob sizes remembered from manifests (least recently learnt go first)
_MANIFEST_TYPES = {  # what a manifest without a mediaType field is, by its keys
    "manifests": "application/vnd.oci.image.index.v1+json",
    "layers": "application/vnd.oci.image.manifest.v1+json",
}


def media_type_of(data: bytes) -> str | None:
    """The media type a manifest's JSON declares (or its shape implies); None if not JSON."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    declared = doc.get("mediaType")
    if isinstance(declared, str) and 0 < len(declared) <= 255:
        return declared
    return next((media for key, media in _MANIFEST_TYPES.items() if key in doc), None)


class Mirror:
    def __init__(
        self,
        store: ChunkStore,
        upstreams: list[UpstreamClient],
        nursery: trio.Nursery,
        metrics: Metrics,
        *,
        tag_ttl: float = 300.0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        self.store = store
        self.upstreams = upstreams
        self.nursery = nursery
        self.metrics = metrics
        self.tag_ttl = tag_ttl
        self.chunk_size = chunk_size
        self._root = store.root / "upstream"
        # Each upstream as a source of the fetch engine (the node adds them to it).
        self.sources = {u.host: UpstreamSource(u) for u in upstreams}
        self.upstreams_by_host = {u.host: u for u in upstreams}
        self._sizes: OrderedDict[str, int] = OrderedDict()  # blob digest -> size, from manifests
        # A block by CID from the LAN's peers (the node's swarm), checked against the CID.
        self.peer_block: Callable[[Cid, int], Awaitable[bytes | None]] | None = None

    def upstream_for(self, ns: str | None) -> UpstreamClient | None:
        """The upstream a request means: containerd names it with `?ns=`, others get the first."""
        if not self.upstreams:
            return None
        if ns is None:
            return self.upstreams[0]
        wanted = "docker.io" if ns in ("docker.io", "index.docker.io", "registry-1.docker.io") else ns
        return next((u for u in self.upstreams if u.host == wanted), None)

    # -- manifests -------------------------------------------------------------------------

    def _dir(self, upstream: UpstreamClient, repo: str) -> Path:
        # host is ours (from --upstream); repo is a validated name, so the path stays inside.
        return self._root / upstream.host.replace(":", "_") / check_name(repo)

    def _remember(self, upstream: UpstreamClient, repo: str, manifest: Manifest, tag: str | None) -> None:
        cid = Cid.from_digest(manifest.digest)
        if upstream.credentialed:  # marked before it is visible, so no peer ever sees it unmarked
            self.store.mark_private(manifest.digest[7:])
        self.store.put_block(cid, manifest.data)
        base = self._dir(upstream, repo)
        self.store.write_small(base / "manifests" / manifest.digest[7:], manifest.media_type.encode())
        if tag is not None:
            self.store.write_small(base / "tags" / tag, f"{manifest.digest} {time.time()}".encode())

    def _cached(self, upstream: UpstreamClient, repo: str, digest: str) -> Manifest | None:
        data = self.store.get_block(Cid.from_digest(digest))
        if data is None:
            return None
        try:
            media: str | None = (self._dir(upstream, repo) / "manifests" / digest[7:]).read_text()
        except OSError:  # kept under another name, or first seen as a block from a peer
            media = media_type_of(data)
        return Manifest(digest=digest, media_type=media, data=data) if media else None

    def _cached_tag(self, upstream: UpstreamClient, repo: str, tag: str) -> tuple[str, float] | None:
        try:
            raw = (self._dir(upstream, repo) / "tags" / tag).read_bytes()[:_TAG_FILE_MAX].decode()
            digest, checked = raw.split()
            parse_digest(digest)
            return digest, float(checked)
        except (OSError, ValueError, P2pimgError):
            return None

    def cached_images(self, most: int = 200) -> list[tuple[str, str, str, str, dict[str, int]]]:
        """(upstream host, repository, tag, top manifest digest, {blob digest: size}) of the tags
        this mirror served and cached, at most `most` (blocking: run in a thread). The blobs of
        an index are those of its platform manifests cached here."""
        hosts = {u.host.replace(":", "_"): u.host for u in self.upstreams}
        found: list[tuple[str, str, str, str, dict[str, int]]] = []
        for dirname, host in sorted(hosts.items()):
            base = self._root / dirname
            for tags in sorted(base.rglob("tags")) if base.is_dir() else []:
                repo = tags.parent.relative_to(base).as_posix()
                for entry in sorted(tags.iterdir()):
                    cached = self._cached_tag(self.upstreams_by_host[host], repo, entry.name)
                    if cached is None or len(found) >= most:
                        continue
                    found.append((host, repo, entry.name, cached[0], self._blobs_of(cached[0])))
        return found

    def _blobs_of(self, digest: str, depth: int = 0) -> dict[str, int]:
        data = self.store.get_block(Cid.from_digest(digest))
        try:
            doc = json.loads(data) if data is not None else None
        except (ValueError, RecursionError):
            doc = None
        if not isinstance(doc, dict):
            return {}
        blobs: dict[str, int] = {}
        children = doc.get("manifests")
        if isinstance(children, list) and depth == 0:  # an index: its platforms cached here
            for child in children:
                if isinstance(child, dict) and isinstance(child.get("digest"), str):
                    with contextlib.suppress(P2pimgError):
                        blobs |= self._blobs_of(child["digest"], depth + 1)
            return blobs
        layers = doc.get("layers")
        for desc in [doc.get("config"), *(layers if isinstance(layers, list) else [])]:
            if (
                isinstance(desc, dict)
                and isinstance(desc.get("digest"), str)
                and isinstance(desc.get("size"), int)
            ):
                blobs[desc["digest"]] = desc["size"]
        return blobs

    async def manifest(self, upstream: UpstreamClient, name: str, reference: str) -> Manifest:
        repo = normalize_repo(upstream.host, name)
        manifest = await self._manifest(upstream, repo, reference)
        self._learn(upstream, repo, manifest)
        return manifest

    async def _manifest(self, upstream: UpstreamClient, repo: str, reference: str) -> Manifest:
        if ":" in reference:
            parse_digest(reference)
            cached = await trio.to_thread.run_sync(self._cached, upstream, repo, reference)
            if cached is not None:
                return cached
            manifest = await self._from_peers(reference)
            if manifest is None:
                got = await upstream.get_manifest(repo, reference)
                manifest = Manifest(got.digest, got.media_type, got.data)
            await trio.to_thread.run_sync(self._remember, upstream, repo, manifest, None)
            return manifest
        check_tag(reference)
        known = await trio.to_thread.run_sync(self._cached_tag, upstream, repo, reference)
        if known is not None and time.time() - known[1] < self.tag_ttl:
            cached = await trio.to_thread.run_sync(self._cached, upstream, repo, known[0])
            if cached is not None:
                return cached
        try:
            got = await upstream.get_manifest(repo, reference)
        except OriginError as exc:
            if isinstance(exc, NameUnknown) or known is None:
                raise
            cached = await trio.to_thread.run_sync(self._cached, upstream, repo, known[0])
            if cached is None:
                raise
            log.warning(
                "upstream %s unreachable (%s); serving %s:%s as last seen",
                upstream.host,
                exc.message,
                repo,
                reference,
            )
            return cached
        if len(got.data) > MAX_MANIFEST_SIZE:
            raise OriginError(f"upstream manifest {repo}:{reference} is too large")
        manifest = Manifest(got.digest, got.media_type, got.data)
        await trio.to_thread.run_sync(self._remember, upstream, repo, manifest, reference)
        return manifest

    async def _from_peers(self, digest: str) -> Manifest | None:
        """A manifest by digest from a LAN peer (the swarm checks it against the digest)."""
        if self.peer_block is None:
            return None
        data = await self.peer_block(Cid.from_digest(digest), MAX_MANIFEST_SIZE)
        media = media_type_of(data) if data is not None else None
        if data is None or media is None:
            return None
        self.metrics.source_bytes.labels("peer").inc(len(data))
        return Manifest(digest=digest, media_type=media, data=data)

    # -- blobs -------------------------------------------------------------------------------

    def _learn(self, upstream: UpstreamClient, repo: str, manifest: Manifest) -> None:
        """The blobs an image manifest names: where to read each, and its size (no HEAD needed)."""
        try:
            doc = json.loads(manifest.data)
        except (ValueError, RecursionError):
            return
        if not isinstance(doc, dict):
            return
        layers = doc.get("layers")
        descriptors = [doc.get("config"), *(layers if isinstance(layers, list) else [])]
        source = self.sources[upstream.host]
        for desc in descriptors:
            if not isinstance(desc, dict):
                continue
            digest, size = desc.get("digest"), desc.get("size")
            if (
                isinstance(digest, str)
                and isinstance(size, int)
                and size >= 0
                and digest.startswith("sha256:")
            ):
                source.learn(digest, repo)
                self._sizes[digest] = size
                self._sizes.move_to_end(digest)
        while len(self._sizes) > _MAX_SIZES:
            self._sizes.popitem(last=False)

    async def blob_map(self, upstream: UpstreamClient, name: str, digest: str) -> BlobMap:
        """The (unchecked) map of an upstream blob, for the fetch engine: the upstream's source
        learns where to read it, and, fetched with the user's credentials, it is marked private
        before any of it exists here (so no peer without the swarm key ever hears of it)."""
        repo = normalize_repo(upstream.host, name)
        parse_digest(digest)
        size = self._sizes.get(digest)
        if size is None:
            size = await upstream.blob_size(repo, digest)
        self.sources[upstream.host].learn(digest, repo)
        if upstream.credentialed:
            await trio.to_thread.run_sync(self.store.mark_private, digest[7:])
        return BlobMap.unchecked(digest, size, self.chunk_size)
