"""An upstream registry as a `ChunkSource`: byte ranges of the blobs it can name.

A registry serves a blob under a repository, so the source learns, from the manifests the mirror
reads through it, which repository to ask for which digest (`learn`); it holds what it can name.
Only the whole blob's digest can check its bytes (fetch/mirror.py). Most registries answer a Range
with 206 (the distribution registry, Docker Hub's and GHCR's blob storage); one that sends the
whole blob instead (200) is asked for whole blobs from then on: one stream per blob.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator

from p2pimg.content.model import BlobMap
from p2pimg.errors import OriginError
from p2pimg.sources.base import ChunkSource
from p2pimg.sources.upstream.client import UpstreamClient

_MAX_NAMED = 65536  # digests remembered with their repository (least recently learnt go first)


class UpstreamSource(ChunkSource):
    kind = "upstream"
    segment_size = 1 << 62  # no segments: any range is one request

    def __init__(self, client: UpstreamClient, *, limit: int = 4, max_span: int = 16 << 20) -> None:
        self.client = client
        self.name = f"upstream {client.url}"
        self.limit = limit
        self._max_span = max_span
        self._repos: OrderedDict[str, str] = OrderedDict()  # digest -> repository to read it from

    @property
    def ranges(self) -> bool:  # type: ignore[override]
        """False once the registry ignored a Range (sent 200 and the whole blob)."""
        return self.client.ranged is not False

    @property
    def max_span(self) -> int:  # type: ignore[override]
        return self._max_span if self.ranges else 1 << 62

    def learn(self, digest: str, repo: str) -> None:
        """`digest` can be read from `repo` on this registry."""
        self._repos[digest] = repo
        self._repos.move_to_end(digest)
        while len(self._repos) > _MAX_NAMED:
            self._repos.popitem(last=False)

    def inventory(self, blob_map: BlobMap) -> bytes | None:
        return b"" if blob_map.digest in self._repos else None

    async def read_span(self, blob_map: BlobMap, start: int, length: int) -> AsyncIterator[bytes]:
        repo = self._repos.get(blob_map.digest)
        if repo is None:
            raise OriginError(f"{self.name} was not told where {blob_map.digest} is")
        async with contextlib.aclosing(self.client.read_blob(repo, blob_map.digest, start, length)) as pieces:
            async for piece in pieces:
                yield piece
