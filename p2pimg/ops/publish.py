"""`p2pimg publish`: chunk an image's blobs and write blobs, blocks and the tag record to an origin.

Order matters for readers of the origin: blobs, then blob maps and manifest blocks, then the image
root, and the tag record last, so a tag never points at something that is not there yet. All of
it happens under a lease naming what the tag will reach (`ops.lease`), so that a concurrent
`gc --yes` does not delete an old object this publish found in the origin and reuses.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from p2pimg.content.cid import Cid, digest_of
from p2pimg.content.graph import OCI_MANIFEST, SourceBlob, SourceImage
from p2pimg.content.model import (
    DEFAULT_CHUNK_SIZE,
    MAX_MANIFEST_SIZE,
    BlobEntry,
    BlobMap,
    ImageRoot,
    ManifestEntry,
    TagRecord,
    check_chunk_size,
    encode_tag_head,
)
from p2pimg.content.referrers import (
    CREATED_ANNOTATION,
    DEFAULT_FILE_MEDIA_TYPE,
    EMPTY_BLOB,
    EMPTY_DIGEST,
    ArtifactFile,
    artifact_manifest,
    check_media_type,
)
from p2pimg.errors import OriginError, OriginNotFound, P2pimgError, SourceInvalid
from p2pimg.ops.inputs import open_source
from p2pimg.ops.lease import publish_lease
from p2pimg.sources.origins import Origin, blob_key, block_key, head_key, tag_key
from p2pimg.tasks import first_failure_nursery

if TYPE_CHECKING:
    from p2pimg.content.signing import Signer
    from p2pimg.fetch.resolver import Resolver

_PARALLEL_UPLOADS = 4


def chunk_blob(blob: SourceBlob, chunk_size: int) -> BlobMap:
    """Hash a blob chunk by chunk (and whole, to check its digest): its blob map."""
    whole = hashlib.sha256()
    chunks: list[Cid] = []
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    total = 0
    with blob.open() as f:
        while True:
            filled = 0
            while filled < chunk_size:
                n = f.readinto(view[filled:])  # type: ignore[attr-defined]
                if not n:
                    break
                filled += n
            if not filled:
                break
            piece = view[:filled]
            whole.update(piece)
            chunks.append(Cid.of_raw(piece))
            total += filled
            if filled < chunk_size:
                break
    if total != blob.size:
        raise SourceInvalid(f"blob {blob.digest} has {total} bytes, its descriptor says {blob.size}")
    if "sha256:" + whole.hexdigest() != blob.digest:
        raise SourceInvalid(f"blob {blob.digest} does not match its digest")
    return BlobMap(digest=blob.digest, size=blob.size, chunk_size=chunk_size, chunks=tuple(chunks))


@dataclass
class PublishReport:
    root: Cid
    record: TagRecord
    blobs_uploaded: int
    blobs_skipped: int
    bytes_uploaded: int
    artifact: str | None = None  # `attach`: the artifact manifest's digest


async def _put_block_once(origin: Origin, cid: Cid, data: bytes) -> None:
    key = block_key(cid)
    if not await origin.exists(key):
        await origin.put_bytes(key, data)


@dataclass
class _Chunked:
    """A blob to publish, with its blob map (encoded) and the map's CID."""

    blob: SourceBlob
    map_data: bytes
    map_cid: Cid


@dataclass
class _Uploaded:
    uploaded: int = 0
    skipped: int = 0
    bytes: int = 0


async def _chunk_blobs(blobs: Iterable[SourceBlob], chunk_size: int) -> dict[str, _Chunked]:
    """Chunk each blob (in worker threads, a few at a time): their blob maps, before anything is
    written, so that the publish's lease can name every key its tag will reach."""
    chunked: dict[str, _Chunked] = {}
    limit = trio.CapacityLimiter(_PARALLEL_UPLOADS)

    async def one(blob: SourceBlob) -> None:
        async with limit:
            data = (await trio.to_thread.run_sync(chunk_blob, blob, chunk_size)).encode()
            chunked[blob.digest] = _Chunked(blob, data, Cid.of_dag_cbor(data))

    async with first_failure_nursery() as nursery:
        for blob in blobs:
            nursery.start_soon(one, blob)
    return chunked


def _entries(chunked: Mapping[str, _Chunked]) -> dict[str, BlobEntry]:
    return {d: BlobEntry(size=c.blob.size, map=c.map_cid) for d, c in chunked.items()}


def _root_keys(root: ImageRoot) -> set[str]:
    """Every origin key an image root reaches, the root's own block included."""
    keys = {block_key(Cid.of_dag_cbor(root.encode()))}
    keys.update(block_key(m.cid) for m in root.manifests.values())
    for digest, entry in root.blobs.items():
        keys.update((blob_key(digest), block_key(entry.map)))
    return keys


async def _upload_blobs(
    chunked: Mapping[str, _Chunked], origin: Origin, progress: Callable[[str], None]
) -> _Uploaded:
    """Upload the blobs the origin lacks, and write their blob maps. The caller's lease names them
    all already: what is found here stays until the lease ends (`ops.lease`)."""
    done = _Uploaded()
    limit = trio.CapacityLimiter(_PARALLEL_UPLOADS)

    async def one(item: _Chunked) -> None:
        blob = item.blob
        async with limit:
            key = blob_key(blob.digest)
            if await origin.exists(key):
                done.skipped += 1
                progress(f"skip   {blob.digest} ({blob.size} bytes, already in the origin)")
            else:
                await origin.put_blob(key, blob.open, blob.size)
                done.uploaded += 1
                done.bytes += blob.size
                progress(f"upload {blob.digest} ({blob.size} bytes)")
            await _put_block_once(origin, item.map_cid, item.map_data)

    async with first_failure_nursery() as nursery:
        for item in chunked.values():
            nursery.start_soon(one, item)
    return done


def _manifest_entries(manifests: Mapping[str, tuple[bytes, str]]) -> dict[str, ManifestEntry]:
    return {
        digest: ManifestEntry(media_type=media, size=len(data), cid=Cid.from_digest(digest))
        for digest, (data, media) in manifests.items()
    }


async def _put_manifests(manifests: Mapping[str, tuple[bytes, str]], origin: Origin) -> None:
    for digest, (data, _) in manifests.items():
        await _put_block_once(origin, Cid.from_digest(digest), data)


def _head_blocks(
    root: ImageRoot, manifests: Mapping[str, tuple[bytes, str]], chunked: Mapping[str, _Chunked]
) -> list[tuple[Cid, bytes]]:
    """What a tag's head carries after the root, in the order a pull reads it: the top manifest,
    the other manifests, then the blob maps (of this publish's own blobs)."""
    order = sorted(manifests, key=lambda digest: digest != root.top)
    blocks = [(Cid.from_digest(digest), manifests[digest][0]) for digest in order]
    return blocks + [(item.map_cid, item.map_data) for item in chunked.values()]


async def _write_root_and_tag(
    root: ImageRoot,
    name: str,
    tag: str,
    origin: Origin,
    signer: Signer | None,
    *,
    moving_from: Cid | None = None,
    head: Sequence[tuple[Cid, bytes]] = (),
) -> tuple[Cid, TagRecord]:
    """Write the image root, the tag's head (the root and `head`'s blocks), then the tag record
    pointing at the root (signed with `signer`'s key), with a sequence number above the previous
    record's. With `moving_from`, the tag must still point at that root (an attach builds on it):
    if another publish moved it meanwhile, neither head nor record is written. The head goes first: a
    reader between the two writes meets the old record with the new head, whose blocks the old
    root does not name, so it reads them from the origin as before (a head is only a hint)."""
    root_data = root.encode()
    root_cid = Cid.of_dag_cbor(root_data)
    await _put_block_once(origin, root_cid, root_data)

    seq = time.time_ns() // 1000
    previous: TagRecord | None = None
    try:
        previous = TagRecord.decode(
            await origin.get(tag_key(name, tag), max_size=64 << 10), name=name, tag=tag
        )
        seq = max(seq, previous.seq + 1)
    except OriginNotFound:
        pass
    except P2pimgError:
        pass  # an unreadable old record is replaced by the new one
    if moving_from is not None and (previous is None or previous.root != moving_from):
        now = "is gone" if previous is None else f"points at {previous.root} now"
        raise OriginError(
            f"{name}:{tag} moved while attaching (it pointed at {moving_from}, it {now}): "
            "nothing was changed; attach again"
        )
    record = TagRecord(name=name, tag=tag, root=root_cid, seq=seq)
    if signer is not None:
        record = signer.sign(record)
    await origin.put_bytes(head_key(name, tag), encode_tag_head([(root_cid, root_data), *head]))
    await origin.put_bytes(tag_key(name, tag), record.encode())
    return root_cid, record


async def publish_image(
    image: SourceImage,
    name: str,
    tag: str,
    origin: Origin,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Callable[[str], None] = lambda _msg: None,
    signer: Signer | None = None,
) -> PublishReport:
    """Publish `image` as `name:tag`; with a `signer`, the tag record is signed by its key.

    Every blob is chunked first, so the image root is known before anything is written: the
    publish's lease names all it reaches before the publish looks which of it the origin holds
    (`ops.lease`: a concurrent `gc --yes` then spares it), and goes once the tag is written."""
    check_chunk_size(chunk_size)
    chunked = await _chunk_blobs(image.blobs.values(), chunk_size)
    referrers = {subject: tuple(sorted(digests)) for subject, digests in image.referrers.items() if digests}
    root = ImageRoot(
        top=image.top,
        manifests=_manifest_entries(image.manifests),
        blobs=_entries(chunked),
        referrers=referrers,
    )
    async with publish_lease(origin) as lease:
        await lease.cover(_root_keys(root), progress)
        done = await _upload_blobs(chunked, origin, progress)
        await _put_manifests(image.manifests, origin)
        head = _head_blocks(root, image.manifests, chunked)
        root_cid, record = await _write_root_and_tag(root, name, tag, origin, signer, head=head)
    return PublishReport(root_cid, record, done.uploaded, done.skipped, done.bytes)


async def publish(
    source: str,
    name: str,
    tag: str,
    origin: Origin,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Callable[[str], None] = lambda _msg: None,
    signer: Signer | None = None,
) -> PublishReport:
    """Publish SOURCE (see `open_source`) as `name:tag`; a registry's blobs stream from it meanwhile."""
    async with open_source(source) as image:
        return await publish_image(
            image, name, tag, origin, chunk_size=chunk_size, progress=progress, signer=signer
        )


# -- attach: an artifact next to a published image --------------------------------------------


def _file_blob(path: Path) -> tuple[SourceBlob, str]:
    """A file to attach as a blob (hashed here, checked again while it is chunked), and its name."""
    if not path.is_file():
        raise SourceInvalid(f"cannot attach {str(path)!r}: no such file")
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            h.update(piece)
            size += len(piece)
    return SourceBlob("sha256:" + h.hexdigest(), size, lambda: open(path, "rb")), path.name


async def attach(
    resolver: Resolver,
    name: str,
    tag: str,
    files: Sequence[Path],
    origin: Origin,
    *,
    artifact_type: str,
    media_type: str = DEFAULT_FILE_MEDIA_TYPE,
    annotations: Mapping[str, str] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Callable[[str], None] = lambda _msg: None,
    signer: Signer | None = None,
) -> PublishReport:
    """Attach `files` to the image `name:tag` points at: an OCI artifact manifest of type
    `artifact_type` whose subject is the image's top manifest, one layer per file. A new image root
    holds the image as it was plus the artifact (a referrer of the top manifest, listed by the
    referrers API); the tag moves to it, signed like a publish. The image is read through
    `resolver`, so its tag record must pass the home's trust policy: an attach never signs a root
    it could not have trusted."""
    check_chunk_size(chunk_size)
    check_media_type(media_type, "media type")
    check_media_type(artifact_type, "artifact type")
    if not files:
        raise SourceInvalid("nothing to attach: give at least one FILE")
    old_cid = await resolver.resolve_tag(name, tag)
    old = await resolver.root(old_cid)
    blobs: dict[str, SourceBlob] = {
        EMPTY_DIGEST: SourceBlob(EMPTY_DIGEST, len(EMPTY_BLOB), lambda: io.BytesIO(EMPTY_BLOB))
    }
    layers: list[ArtifactFile] = []
    for path in files:
        blob, title = await trio.to_thread.run_sync(_file_blob, Path(path))
        blobs.setdefault(blob.digest, blob)
        layers.append(ArtifactFile(blob.digest, blob.size, media_type, title))
    notes = dict(annotations or {})
    notes.setdefault(CREATED_ANNOTATION, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    top = old.top_entry
    data = artifact_manifest(artifact_type, (old.top, top.size, top.media_type), layers, notes)
    digest = digest_of(data)
    progress(f"artifact {digest} ({artifact_type}) for {old.top}")

    chunked = await _chunk_blobs([b for d, b in blobs.items() if d not in old.blobs], chunk_size)
    new_manifest = {digest: (data, OCI_MANIFEST)}
    referrers = dict(old.referrers)
    referrers[old.top] = tuple(sorted({*old.referrers_of(old.top), digest}))
    root = ImageRoot(
        top=old.top,
        manifests={**old.manifests, **_manifest_entries(new_manifest)},
        blobs={**old.blobs, **_entries(chunked)},
        referrers=referrers,
    )
    async with publish_lease(origin) as lease:
        await lease.cover(_root_keys(root), progress)
        done = await _upload_blobs(chunked, origin, progress)
        await _put_manifests(new_manifest, origin)
        # The head as publish writes it: the image's top manifest and blob maps too (the old
        # head brought them to `resolver`, else they are read from the origin once).
        head = [(top.cid, await resolver.block(top.cid, max_size=MAX_MANIFEST_SIZE))]
        head += _head_blocks(root, new_manifest, chunked)
        head += [(entry.map, await resolver.block(entry.map)) for entry in old.blobs.values()]
        root_cid, record = await _write_root_and_tag(
            root, name, tag, origin, signer, moving_from=old_cid, head=head
        )
    return PublishReport(root_cid, record, done.uploaded, done.skipped, done.bytes, artifact=digest)
