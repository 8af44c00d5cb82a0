"""Tags -> image roots -> manifests and blob maps, verified, cached, transport-agnostic.

Everything the resolver returns was checked against the CID it was asked under (blocks) or the
name and tag it was asked for (tag records) before it is cached or handed on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import outcome
import trio

from p2pimg.content import dagcbor
from p2pimg.content.cid import DAG_CBOR, IPFS_CODECS, Cid, parse_digest
from p2pimg.content.model import (
    MAX_MANIFEST_SIZE,
    MAX_TAG_RECORD_SIZE,
    BlobEntry,
    BlobMap,
    ImageRoot,
    ManifestEntry,
    TagRecord,
)
from p2pimg.content.signing import TagSignatureError, TrustStore
from p2pimg.errors import (
    BlobUnknown,
    BlockInvalid,
    DigestInvalid,
    ManifestUnknown,
    NameUnknown,
    OriginError,
    OriginNotFound,
    P2pimgError,
    VerificationError,
)
from p2pimg.fetch.heads import TagHeads
from p2pimg.fetch.nerdctl import FileBlob, NerdctlImage, NerdctlImages
from p2pimg.fetch.records import RecordChecks
from p2pimg.metrics import Timeline
from p2pimg.sources.origins import Origin, block_key, tag_key
from p2pimg.store.chunks import ChunkStore
from p2pimg.tasks import SingleFlight, first_failure_nursery

log = logging.getLogger(__name__)
_T = TypeVar("_T")
# What `ipfs/<CID>` names: a p2pimg image root, or an image nerdctl pushed to IPFS.
Image = ImageRoot | NerdctlImage


async def _no_peer_block(_cid: Cid, _max_size: int) -> bytes | None:
    return None


async def _no_peer_tags(_name: str, _tag: str) -> list[bytes]:
    return []


IPFS_PREFIX = "ipfs/"
IPFS_TAG = "latest"  # the one tag of an image named by its root CID
_ROOT_CACHE = 256
_MAP_CACHE = 4096
_PREFETCH = 8  # blob maps of one image, or tags of one name, read at once
_RELISTED_NAMES = 4096


def ipfs_cid(name: str) -> Cid:
    """The CID of an `ipfs/<CID>` name (DigestInvalid when it carries none)."""
    return Cid.parse(name[len(IPFS_PREFIX) :], codecs=IPFS_CODECS)


@dataclass(frozen=True)
class Manifest:
    digest: str
    media_type: str
    data: bytes


class Resolver(RecordChecks):
    def __init__(
        self,
        store: ChunkStore,
        origin: Origin,
        *,
        tag_ttl: float = 5.0,
        trust: TrustStore | None = None,
        home: Path | None = None,
    ) -> None:
        self.store = store
        self.origin = origin
        self.tag_ttl = tag_ttl
        # Tag record policy: with trusted keys, only records signed by one of them; with none,
        # records from our own origin as they are, with a warning: once per `home` (a file there
        # remembers it was given, so commands do not repeat it), else once per tag and process.
        self.trust = trust if trust is not None else TrustStore()
        self.home = home
        self._warned_unverified: set[tuple[str, str]] = set()
        self._warned_home = False
        self._warned_downgrade: set[tuple[str, str, int]] = set()
        self._roots: OrderedDict[Cid, ImageRoot] = OrderedDict()
        self._maps: OrderedDict[Cid, BlobMap] = OrderedDict()
        self._trusted: set[Cid] = set()  # roots a trusted tag record pointed at
        self._vouched: set[Cid] = set()  # maps such roots name (see `BlobMap.vouched`)
        self._tags: dict[tuple[str, str], tuple[float, Cid]] = {}
        self._name_roots: dict[str, set[Cid]] = {}
        self._published: dict[str, tuple[float, bool]] = {}
        self._block_flights: SingleFlight[Cid, bytes] = SingleFlight()
        self._relisted: dict[str, float] = {}  # name -> when a miss last made us re-list its tags
        self._tags_checked: dict[str, float] = {}  # name -> when referrers last re-read its tags
        self._tag_flights: SingleFlight[tuple[str, str], Cid] = SingleFlight()
        self.on_blob_map: Callable[[BlobMap], None] = lambda _bmap: None  # the chunk index
        self.timeline = Timeline()  # origin round trips (the node shares its metrics' timeline)
        self.heads = TagHeads(origin)
        # A root was read for the first time (the node prefetches its blob maps).
        self.on_root: Callable[[ImageRoot], None] = lambda _root: None
        # `ipfs/<CID>` of another codec than dag-cbor: an image nerdctl pushed to IPFS (the node wires it).
        self.nerdctl: NerdctlImages | None = None
        # Blocks by CID from LAN peers when the origin cannot give them (the node wires it).
        self.peer_block: Callable[[Cid, int], Awaitable[bytes | None]] = _no_peer_block
        # Encoded tag records LAN peers hold for a name and tag (the node wires it).
        self.peer_tags: Callable[[str, str], Awaitable[list[bytes]]] = _no_peer_tags

    # -- blocks ----------------------------------------------------------------------------

    async def block(
        self,
        cid: Cid,
        *,
        max_size: int = dagcbor.MAX_BLOCK_SIZE,
        check: Callable[[bytes], object] | None = None,
    ) -> bytes:
        """A block by CID: from the cache, else from the origin, verified before it is kept —
        against its CID, and by `check` (which raises) when the block must also parse: a block
        that matches its CID but is not a valid node is never cached, nor so served to peers.

        Concurrent misses for one block are merged: one task fetches it, the others wait for
        that fetch and share its outcome (100 clients asking at once cost the origin one request).
        When the fetching task is cancelled, a waiting one takes its place."""
        data = await trio.to_thread.run_sync(self.store.get_block, cid)
        if data is not None:
            return data
        data, fetched = await self._block_flights.run(cid, lambda: self._fetch_block(cid, max_size, check))
        if not fetched:  # shared another caller's fetch: apply this caller's own limits to it
            if len(data) > max_size:
                raise BlockInvalid(
                    f"block {cid} is {len(data)} bytes, over the limit of {max_size} for what it was asked as"
                )
            if check is not None:
                check(data)
        return data

    async def _fetch_block(self, cid: Cid, max_size: int, check: Callable[[bytes], object] | None) -> bytes:
        # A fetch that landed between this caller's cache miss and its flight: no second request.
        data = await trio.to_thread.run_sync(self.store.get_block, cid)
        if data is not None:
            return data
        began = Timeline.now()
        held = self.heads.take(cid)
        if held is not None and (len(held) > max_size or not cid.matches(held)):
            log.warning("a tag head's copy of block %s is not that block; reading it from the origin", cid)
            held = None
        if held is not None:
            data = held  # matched its CID above
        else:
            data = await self._block_from_afar(cid, max_size, began)
            if not cid.matches(data):
                raise VerificationError(f"a block that does not match {cid} was returned for it")
        if check is not None:
            check(data)
        await trio.to_thread.run_sync(self.store.put_block, cid, data)
        return data

    async def _block_from_afar(self, cid: Cid, max_size: int, began: float) -> bytes:
        """A block from the origin, else from a LAN peer, unchecked."""
        try:
            data = await self.origin.get(block_key(cid), max_size=max_size)
        except OriginError as exc:
            # The origin is unreachable (or does not have it): a peer may have the block, and a
            # block named by its CID can come from anyone, since it is checked against the CID.
            peer_data = await self.peer_block(cid, max_size)
            if peer_data is None:
                raise
            log.warning("origin failed (%s); got block %s from a peer", exc.message, cid)
            return peer_data
        self.timeline.add("block", began, Timeline.now(), cid=str(cid)[-12:], bytes=len(data))
        return data

    async def node(self, cid: Cid, parse: Callable[[bytes], _T]) -> _T:
        """A DAG node by CID, parsed once: a block that does not parse is never cached."""
        parsed: list[_T] = []
        data = await self.block(cid, check=lambda block: parsed.append(parse(block)))
        return parsed[0] if parsed else parse(data)  # fetched and parsed, or from the cache

    @staticmethod
    def _remember(cache: OrderedDict[Cid, object], cid: Cid, value: object, size: int) -> None:
        cache[cid] = value
        cache.move_to_end(cid)
        while len(cache) > size:
            cache.popitem(last=False)

    async def root(self, cid: Cid) -> ImageRoot:
        if (hit := self._roots.get(cid)) is not None:
            return hit
        if cid.codec_name != "dag-cbor":
            raise ManifestUnknown(f"{cid} is not an image root CID (not dag-cbor)")

        def parse(data: bytes) -> ImageRoot:
            return ImageRoot.from_node(dagcbor.decode_verified(data, cid))

        try:
            root = await self.node(cid, parse)
        except OriginNotFound:
            raise NameUnknown(f"no image with root {cid}") from None
        self._remember(self._roots, cid, root, _ROOT_CACHE)  # type: ignore[arg-type]
        if cid in self._trusted:
            self._vouch(root)
        self.on_root(root)
        return root

    def _trust(self, cid: Cid) -> None:
        """A tag record this node accepts points at root `cid`: its blob maps are vouched for."""
        self._trusted.add(cid)
        if (root := self._roots.get(cid)) is not None:
            self._vouch(root)

    def _vouch(self, root: ImageRoot) -> None:
        self._vouched.update(e.map for e in root.blobs.values() if isinstance(e, BlobEntry))

    async def image(self, cid: Cid) -> Image:
        """The image a CID names: a p2pimg image root (dag-cbor), else (raw or dag-pb) an image
        nerdctl pushed to IPFS, named by its descriptor's CID, on a node that reads those."""
        if cid.codec == DAG_CBOR or self.nerdctl is None:
            return await self.root(cid)
        return await self.nerdctl.image(cid)

    async def prefetch_maps(self, root: Image) -> None:
        """Fetch every blob map of an image at once (`_PREFETCH` at a time), so that a pull's blob
        requests, which come one after another or a few at a time, find them ready instead of each
        paying the origin's round trip first. Failures are left for the blob request to meet."""
        limit = trio.CapacityLimiter(_PREFETCH)

        async def one(digest: str, entry: BlobEntry | FileBlob) -> None:
            async with limit:
                with contextlib.suppress(P2pimgError):
                    await self.blob_map(entry, digest)

        async with trio.open_nursery() as nursery:
            for digest, entry in root.blobs.items():
                if not isinstance(entry, BlobEntry) or entry.map not in self._maps:
                    nursery.start_soon(one, digest, entry)

    async def blob_map(self, entry: BlobEntry | FileBlob, digest: str) -> BlobMap:
        if isinstance(entry, FileBlob):  # a blob of a nerdctl image
            assert self.nerdctl is not None
            return await self.nerdctl.blob_map(entry, digest)
        if (hit := self._maps.get(entry.map)) is not None:
            return replace(hit, vouched=True) if entry.map in self._vouched else hit

        def parse(data: bytes) -> BlobMap:
            return BlobMap.from_node(dagcbor.decode_verified(data, entry.map))

        bmap = await self.node(entry.map, parse)
        if bmap.digest != digest or bmap.size != entry.size:
            raise BlockInvalid(f"blob map {entry.map} does not describe {digest}")
        self._remember(self._maps, entry.map, bmap, _MAP_CACHE)  # type: ignore[arg-type]
        self.on_blob_map(bmap)
        return replace(bmap, vouched=True) if entry.map in self._vouched else bmap

    async def manifest(self, entry: ManifestEntry, digest: str) -> Manifest:
        data = await self.block(entry.cid, max_size=MAX_MANIFEST_SIZE)
        return Manifest(digest=digest, media_type=entry.media_type, data=data)

    # -- tags ------------------------------------------------------------------------------

    async def resolve_tag(self, name: str, tag: str) -> Cid:
        """The root CID `name:tag` points at, re-read from the origin after `tag_ttl` seconds."""
        cached = self._tags.get((name, tag))
        if cached is not None and time.monotonic() - cached[0] < self.tag_ttl:
            return cached[1]
        root, _fetched = await self._tag_flights.run((name, tag), lambda: self._read_tag(name, tag))
        return root

    async def _read_tag(self, name: str, tag: str) -> Cid:
        """The record from the origin, and on a first look at the tag its head alongside: waited
        for after the record at most as long as the record took (`fetch.heads`)."""
        if (name, tag) in self._tags:  # read before: its blocks are most likely here already
            return await self._read_record(name, tag)
        async with trio.open_nursery() as nursery:
            head = trio.Event()
            nursery.start_soon(self.heads.read, name, tag, head, self.timeline)
            began = trio.current_time()
            got = await outcome.acapture(self._read_record, name, tag)
            if isinstance(got, outcome.Value):
                with trio.move_on_after(max(0.05, trio.current_time() - began)):
                    await head.wait()
            nursery.cancel_scope.cancel()
        return got.unwrap()

    async def _read_record(self, name: str, tag: str) -> Cid:
        now = time.monotonic()
        try:
            data = await self.origin.get(tag_key(name, tag), max_size=MAX_TAG_RECORD_SIZE)
            self.timeline.add("tag", now, Timeline.now(), name=name, tag=tag)
        except OriginNotFound:
            await self.tags(name)  # NAME_UNKNOWN when the repository itself is unknown
            raise ManifestUnknown(f"{name}:{tag} is not published") from None
        except OriginError as exc:
            record, where = await self._offline_record(name, tag, exc)
            log.warning(
                "origin unreachable (%s); using %s of %s:%s (seq %d)",
                exc.message,
                where,
                name,
                tag,
                record.seq,
            )
            self._tags[(name, tag)] = (now, record.root)
            self._name_roots.setdefault(name, set()).add(record.root)
            self._trust(record.root)
            return record.root
        record = TagRecord.decode(data, name=name, tag=tag)
        self.check_record(record)
        record = await self._no_downgrade(record)
        await trio.to_thread.run_sync(self.store.put_tag_record, record)
        self._trust(record.root)
        self._tags[(name, tag)] = (now, record.root)
        self._name_roots.setdefault(name, set()).add(record.root)
        return record.root

    async def _offline_record(self, name: str, tag: str, failure: OriginError) -> tuple[TagRecord, str]:
        """With the origin unreachable: the record of `name:tag` to use, and where it came from —
        the last one this node accepted, else the newest one LAN peers hold that a trusted key
        signed. Peers are not asked when the node has a record (no waiting on them in an outage)
        nor when it trusts no key (it could take none of their answers)."""
        refusal: TagSignatureError | None = None
        cached = await trio.to_thread.run_sync(self.store.get_tag_record, name, tag)
        if cached is not None:
            try:
                self.check_record(cached)  # cached under an older policy maybe: the current one decides
                return cached, "the last verified record"
            except TagSignatureError as exc:
                refusal = exc
        if not len(self.trust):
            if refusal is not None:
                raise refusal
            raise OriginError(
                f"{name}:{tag}: {failure.message}; this node has no record of the tag, and it "
                "takes none from LAN peers because it trusts no publisher key "
                "(--trust PUBFILE or $P2PIMG_HOME/trust/*.pub)"
            )
        best: TagRecord | None = None
        where = "a LAN peer's signed record"
        for data in await self.peer_tags(name, tag):
            try:
                record = TagRecord.decode(data, name=name, tag=tag)
                self.check_peer_record(record)
            except (P2pimgError, ValueError) as exc:
                log.warning("a LAN peer's tag record of %s:%s refused: %s", name, tag, exc)
                if isinstance(exc, TagSignatureError):
                    refusal = refusal or exc
                continue
            if best is None or record.seq > best.seq:
                best = record
        if best is None:
            if refusal is not None:
                raise refusal
            raise failure
        await trio.to_thread.run_sync(self.store.put_tag_record, best)
        return best, where

    async def _no_downgrade(self, record: TagRecord) -> TagRecord:
        """The record to use: `record`, unless the cache holds a newer accepted one for the tag.

        A record with a lower seq than the cached one (or the same seq and another root) is a
        replay or a rollback: it is refused with an error in the log, and the cached one serves.
        A cached record that the current trust policy would refuse does not count.
        """
        cached = await trio.to_thread.run_sync(self.store.get_tag_record, record.name, record.tag)
        if cached is None or not (
            cached.seq > record.seq or (cached.seq == record.seq and cached.root != record.root)
        ):
            return record
        try:
            self.check_record(cached)
        except VerificationError:
            return record
        key = (record.name, record.tag, record.seq)
        if key not in self._warned_downgrade:
            self._warned_downgrade.add(key)
            log.error(
                "refusing the origin's tag record of %s:%s: its seq %d (root %s) is not newer than "
                "the accepted seq %d (root %s), a rollback or a replay; still serving seq %d",
                record.name,
                record.tag,
                record.seq,
                record.root,
                cached.seq,
                cached.root,
                cached.seq,
            )
        return cached

    async def is_published(self, name: str) -> bool:
        """Whether `name` has tags in the origin (remembered for `tag_ttl` either way)."""
        now = time.monotonic()
        known = self._published.get(name)
        if known is not None and now - known[0] < self.tag_ttl:
            return known[1]
        try:
            await self.tags(name)
            published = True
        except NameUnknown:
            published = False
        self._published[name] = (now, published)
        return published

    def seen_unpublished(self, name: str) -> bool:
        """Whether `is_published` said no within `tag_ttl` (a mirror's upstream image, say)."""
        known = self._published.get(name)
        return known is not None and not known[1] and time.monotonic() - known[0] < self.tag_ttl

    async def tags(self, name: str) -> list[str]:
        prefix = tag_key(name)
        try:
            keys = await self.origin.list(prefix)
        except OriginNotFound:
            keys = []
        except OriginError as exc:
            cached = await trio.to_thread.run_sync(self.store.cached_tags, name)
            if not cached:
                raise
            log.warning("origin unreachable (%s); listing the tags of %s seen before", exc.message, name)
            return cached
        tags = sorted(k[len(prefix) :] for k in keys if "/" not in k[len(prefix) :])
        if not tags:
            raise NameUnknown(f"repository {name} is not published")
        return tags

    # -- what a registry name means --------------------------------------------------------

    async def _roots_of(self, name: str) -> list[Image]:
        """Images a name can serve: the image an `ipfs/<CID>` names, or the roots of the name's tags."""
        if name.startswith(IPFS_PREFIX):
            return [await self.image(ipfs_cid(name))]
        known = self._name_roots.get(name)
        if not known:
            refused: dict[str, TagSignatureError] = {}
            limit = trio.CapacityLimiter(_PREFETCH)  # one round trip for the tags, not one each

            async def look(tag: str) -> None:
                async with limit:
                    try:
                        await self.resolve_tag(name, tag)
                    except TagSignatureError as exc:  # one refused tag does not hide the others
                        log.error("%s", exc.message)
                        refused[tag] = exc

            async with first_failure_nursery() as nursery:
                for tag in await self.tags(name):
                    nursery.start_soon(look, tag)
            known = self._name_roots.get(name, set())
            if not known and refused:
                raise refused[min(refused)]  # the first tag's refusal, whichever came first
        return [await self.root(cid) for cid in sorted(known, key=str)]

    async def _find(self, name: str, digest: str, kind: str) -> tuple[Image, object] | None:
        parse_digest(digest)
        for attempt in range(2):
            for root in await self._roots_of(name):
                table: dict[str, object] = root.manifests if kind == "manifest" else root.blobs  # type: ignore[assignment]
                if digest in table:
                    return root, table[digest]
            now = time.monotonic()
            if (
                attempt == 0
                and not name.startswith(IPFS_PREFIX)
                and now - self._relisted.get(name, -math.inf) >= self.tag_ttl
            ):
                # Maybe a tag moved since we last looked: forget what we knew and re-list, once
                # per tag TTL and name (a client asking again and again for a digest that is not
                # there, or for many such digests, must not make every request list the origin).
                self._relisted[name] = now
                if len(self._relisted) > _RELISTED_NAMES:
                    self._relisted = {n: t for n, t in self._relisted.items() if now - t < self.tag_ttl}
                self._name_roots.pop(name, None)
                self._tags = {k: v for k, v in self._tags.items() if k[0] != name}
                continue
            break
        return None

    async def manifest_for(self, name: str, reference: str) -> Manifest:
        """GET /v2/<name>/manifests/<reference>: by digest, or a tag (`ipfs/<CID>` has one tag,
        `latest`, as its tags list says)."""
        if reference.startswith("sha256:") or ":" in reference:
            found = await self._find(name, reference, "manifest")
            if found is None:
                raise ManifestUnknown(f"manifest {reference} is not part of {name}")
            entry = found[1]
            assert isinstance(entry, ManifestEntry)
            return await self.manifest(entry, reference)
        if name.startswith(IPFS_PREFIX):
            root = (await self._roots_of(name))[0]
            if reference != IPFS_TAG:
                raise ManifestUnknown(f"{name} has one tag, {IPFS_TAG}, not {reference}")
        else:
            root = await self.root(await self.resolve_tag(name, reference))
        return await self.manifest(root.top_entry, root.top)

    def knows_blob(self, name: str, digest: str) -> bool:
        """Whether `blob_for` and `blob_map` can answer from memory: `name` was looked up and the
        map of its blob `digest` is here (else a read ahead of the blob may pay off)."""
        if name.startswith(IPFS_PREFIX):
            try:
                cid = ipfs_cid(name)
            except DigestInvalid:
                return True  # the request fails anyway
            if cid.codec != DAG_CBOR:
                return True  # an image nerdctl pushed to IPFS: its blobs are not on the origin
            cids = {cid}
        else:
            cids = self._name_roots.get(name, set())
        for cid in cids:
            entry = root.blobs.get(digest) if (root := self._roots.get(cid)) is not None else None
            if entry is not None and (isinstance(entry, FileBlob) or entry.map in self._maps):
                return True
        return False

    async def blob_for(self, name: str, digest: str) -> BlobEntry | FileBlob:
        found = await self._find(name, digest, "blob")
        if found is None:
            raise BlobUnknown(f"blob {digest} is not part of {name}")
        entry = found[1]
        assert isinstance(entry, BlobEntry | FileBlob)
        return entry

    async def referrers(self, name: str, subject: str) -> list[tuple[str, ManifestEntry]]:
        """GET /v2/<name>/referrers/<subject>: the manifests whose subject is `subject`, as
        (digest, entry) in digest order (none for a subject the images do not know). For
        `ipfs/<CID>`, that root's; for a name, those of every image its tags point at, the tags
        read again after the tag TTL (an attach moves a tag: its artifact is listed as soon as the
        tag is seen to move), and of the images they pointed at before."""
        parse_digest(subject)
        if not name.startswith(IPFS_PREFIX):
            now = time.monotonic()
            if now - self._tags_checked.get(name, -math.inf) >= self.tag_ttl:
                for tag in await self.tags(name):  # NAME_UNKNOWN for a name that is not published
                    try:
                        await self.resolve_tag(name, tag)
                    except (TagSignatureError, ManifestUnknown) as exc:  # refused, or untagged meanwhile
                        log.warning("%s", exc.message)
                self._tags_checked[name] = now
        found: dict[str, ManifestEntry] = {}
        for root in await self._roots_of(name):
            for digest in root.referrers_of(subject):
                found[digest] = root.manifests[digest]
        return sorted(found.items())
