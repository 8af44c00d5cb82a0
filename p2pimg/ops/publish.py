"""`p2pimg publish`: chunk an image's blobs and write blobs, blocks and the tag record to an origin.

Order matters for readers of the origin: blobs, then blob maps and manifest blocks, then the image
root, and the tag record last, so a tag never points at something that is not there yet.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from p2pimg.content.cid import Cid
from p2pimg.content.graph import SourceBlob, SourceImage
from p2pimg.content.model import (
    DEFAULT_CHUNK_SIZE,
    BlobEntry,
    BlobMap,
    ImageRoot,
    ManifestEntry,
    TagRecord,
    check_chunk_size,
)
from p2pimg.errors import OriginNotFound, P2pimgError, SourceInvalid
from p2pimg.ops.inputs import open_source
from p2pimg.sources.origins import Origin, blob_key, block_key, tag_key
from p2pimg.tasks import first_failure_nursery

if TYPE_CHECKING:
    from p2pimg.content.signing import Signer

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


async def _put_block_once(origin: Origin, cid: Cid, data: bytes) -> None:
    key = block_key(cid)
    if not await origin.exists(key):
        await origin.put_bytes(key, data)


async def publish_image(image: SourceImage, name: str, tag: str, origin: Origin, *,
                        chunk_size: int = DEFAULT_CHUNK_SIZE,
                        progress: Callable[[str], None] = lambda _msg: None,
                        signer: Signer | None = None) -> PublishReport:
    """Publish `image` as `name:tag`; with a `signer`, the tag record is signed by its key."""
    check_chunk_size(chunk_size)
    blob_entries: dict[str, BlobEntry] = {}
    uploaded = skipped = uploaded_bytes = 0
    limit = trio.CapacityLimiter(_PARALLEL_UPLOADS)

    async def one(blob: SourceBlob) -> None:
        nonlocal uploaded, skipped, uploaded_bytes
        async with limit:
            bmap = await trio.to_thread.run_sync(chunk_blob, blob, chunk_size)
            key = blob_key(blob.digest)
            if await origin.exists(key):
                skipped += 1
                progress(f"skip   {blob.digest} ({blob.size} bytes, already in the origin)")
            else:
                await origin.put_blob(key, blob.open, blob.size)
                uploaded += 1
                uploaded_bytes += blob.size
                progress(f"upload {blob.digest} ({blob.size} bytes)")
            data = bmap.encode()
            map_cid = Cid.of_dag_cbor(data)
            await _put_block_once(origin, map_cid, data)
            blob_entries[blob.digest] = BlobEntry(size=blob.size, map=map_cid)

    async with first_failure_nursery() as nursery:
        for blob in image.blobs.values():
            nursery.start_soon(one, blob)

    manifests: dict[str, ManifestEntry] = {}
    for digest, (data, media) in image.manifests.items():
        cid = Cid.from_digest(digest)
        await _put_block_once(origin, cid, data)
        manifests[digest] = ManifestEntry(media_type=media, size=len(data), cid=cid)

    root = ImageRoot(top=image.top, manifests=manifests, blobs=blob_entries)
    root_data = root.encode()
    root_cid = Cid.of_dag_cbor(root_data)
    await _put_block_once(origin, root_cid, root_data)

    seq = time.time_ns() // 1000
    try:
        previous = TagRecord.decode(await origin.get(tag_key(name, tag), max_size=64 << 10),
                                    name=name, tag=tag)
        seq = max(seq, previous.seq + 1)
    except OriginNotFound:
        pass
    except P2pimgError:
        pass  # an unreadable old record is replaced by the new one
    record = TagRecord(name=name, tag=tag, root=root_cid, seq=seq)
    if signer is not None:
        record = signer.sign(record)
    await origin.put_bytes(tag_key(name, tag), record.encode())
    return PublishReport(root_cid, record, uploaded, skipped, uploaded_bytes)


async def publish(source: str, name: str, tag: str, origin: Origin, *,
                  chunk_size: int = DEFAULT_CHUNK_SIZE,
                  progress: Callable[[str], None] = lambda _msg: None,
                  signer: Signer | None = None) -> PublishReport:
    """Publish SOURCE (see `open_source`) as `name:tag`; a registry's blobs stream from it meanwhile."""
    async with open_source(source) as image:
        return await publish_image(image, name, tag, origin, chunk_size=chunk_size, progress=progress,
                                   signer=signer)
