"""Peer exchange: the HTTP API a node serves to its LAN, and the source that fetches from it.

Content-addressed only: a peer never serves a path, only content named by CID or digest, and
only bytes it has verified. Single blocks follow the IPFS trustless-gateway form; what the swarm
needs beyond it is versioned under /p2pimg/v1/:

    GET /ipfs/<cid>                     an IPFS trustless gateway (web/gateway.py): a block (a
                                        chunk, a manifest, a DAG node, a blob up to 2 MiB) or a
                                        CAR of a DAG (?format=car, or by Accept)
    GET /p2pimg/v1/have/<digest>        {"digest", "complete", "node", "chunks": base64 of one
                                        byte per chunk: 1 verified, 2 being fetched, 0 missing}
    GET /p2pimg/v1/blobs/<digest>       verified bytes of a blob; Range: one span
    GET /p2pimg/v1/blocks/<cid>         a block, raw, as /ipfs/ finds it (verified, private content
                                        hidden, swarm key required when set) but up to 8 MiB, not
                                        IPFS's 2 MiB: the image roots, blob maps and manifests (up to
                                        4 MiB) a node asks its peers for when its origin cannot give
                                        them (`Swarm.block`)
    GET /p2pimg/v1/tags/<name>/<tag>    the node's cached tag record (DAG-CBOR, as published; the
                                        asker accepts it only when a key it trusts signed it)
    GET /p2pimg/v1/info                 {"version": 1, "node": "<node id>"}
    POST /p2pimg/v1/warm, GET /p2pimg/v1/warm/<id>   remote warm (see node/warm.py)

A busy node answers 429 with Retry-After (concurrent requests or bytes/s over its limits); the
fetching side backs off that peer and takes the chunk elsewhere. Every chunk a peer sends is
verified by the receiver, and a peer that lies is penalised, then banned (fetch/policy.py).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator

import trio

from p2pimg.content import dagcbor
from p2pimg.content.cid import parse_digest
from p2pimg.content.model import MAX_MANIFEST_SIZE, check_name, check_tag
from p2pimg.errors import (
    BlobUnknown,
    InvalidInput,
    ManifestUnknown,
    NotFound,
    P2pimgError,
    RangeNotSatisfiable,
)
from p2pimg.fetch.engine import Fetcher
from p2pimg.node import swarmkey
from p2pimg.node.node import Node
from p2pimg.node.warm import WarmBusy, WarmJobs
from p2pimg.sources.peer import PROTOCOL_VERSION, TAG_RECORD
from p2pimg.store.chunks import ChunkStore
from p2pimg.store.index import ChunkIndex
from p2pimg.web.gateway import Gateway
from p2pimg.web.ranges import content_range, parse_range
from p2pimg.web.registry import error_response
from p2pimg.web.server import BodyPart, FileRegion, Request, Response

log = logging.getLogger(__name__)


_PIECE = 256 << 10
# The largest block `/p2pimg/v1/blocks/` sends: a DAG-CBOR node's limit (a manifest is at most 4 MiB).
MAX_PEER_BLOCK = max(dagcbor.MAX_BLOCK_SIZE, MAX_MANIFEST_SIZE)
_CLIENTS_KEPT = 1024  # addresses whose received bytes are counted one by one
_WARN_EVERY = 60.0  # seconds between warnings about refused requests made with the swarm key


class TokenBucket:
    """Bytes per second with a one-second burst; `rate` 0 means unlimited."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.stamp = trio.current_time() if rate else 0.0

    async def take(self, n: int) -> None:
        if not self.rate:
            return
        while True:
            now = trio.current_time()
            self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= n or self.tokens >= self.rate:
                self.tokens -= n
                return
            await trio.sleep((min(n, self.rate) - self.tokens) / self.rate)


class PeerService:
    """The peer API of one node (served on `--peer-listen`)."""

    def __init__(
        self,
        store: ChunkStore,
        fetcher: Fetcher,
        index: ChunkIndex,
        node_id: str,
        *,
        rate: float = 0.0,
        max_requests: int = 32,
        warm: WarmJobs | None = None,
        swarm_key: bytes | None = None,
    ) -> None:
        self.store = store
        self.fetcher = fetcher
        self.index = index
        self.metrics = fetcher.metrics
        self.node_id = node_id
        self.max_requests = max_requests
        self.active = 0
        self.rate = rate
        self._bucket: TokenBucket | None = None
        self.warm = warm
        self.swarm_key = swarm_key
        self.guard = swarmkey.SwarmGuard(swarm_key, node_id) if swarm_key is not None else None
        self.gateway = Gateway(store, fetcher, index, self._hidden)  # /ipfs/<cid>
        self._warned_at = -_WARN_EVERY
        self.served_to: collections.Counter[str] = collections.Counter()  # client address -> bytes

    @classmethod
    def for_node(cls, node: Node) -> PeerService:
        """The peer API of a running node: its cache, fetches, chunk index, warm jobs and swarm
        key, under the limits of its configuration."""
        return cls(
            node.store,
            node.fetcher,
            node.chunk_index,
            node.node_id,
            rate=node.config.peer_rate,
            max_requests=node.config.peer_max_requests,
            warm=node.warm,
            swarm_key=node.swarm_key,
        )

    def _busy(self) -> Response:
        err = P2pimgError("busy: too many requests")
        err.oci_code, err.http_status = "TOOMANYREQUESTS", 429
        response = error_response(err)
        response.headers.append(("retry-after", "1"))
        return response

    def gate(self, request: Request) -> Response | None:
        """With a swarm key set, a request whose head does not prove it (a fresh proof, never seen
        before, for this method and path) is refused (401/403) before any body is read: the
        listener calls this first, then `handle`, which checks the body against the proof."""
        if self.guard is None:
            return None
        refusal = self._refusal(
            request, self.guard.admit(request.headers.get("authorization"), request.method, request.path)
        )
        request.admitted = refusal is None
        return refusal

    def _refusal(self, request: Request, verdict: swarmkey.Verdict) -> Response | None:
        if verdict.ok:
            return None
        self.metrics.peer_requests.labels("refused").inc()
        if verdict.signed and trio.current_time() - self._warned_at >= _WARN_EVERY:
            # Made with the key, yet refused: someone replays captured requests, or a member's
            # clock is off. Worth the log, at most once a minute.
            self._warned_at = trio.current_time()
            log.warning(
                "refused a request from %s made with the swarm key: %s", request.client or "?", verdict.reason
            )
        else:
            log.debug("refused a peer request from %s: %s", request.client or "?", verdict.reason)
        err = P2pimgError(verdict.reason)
        err.oci_code, err.http_status = ("UNAUTHORIZED", 401) if verdict.status == 401 else ("DENIED", 403)
        response = error_response(err)
        if verdict.status == 401:
            response.headers.append(("www-authenticate", swarmkey.SCHEME))
        elif verdict.other_node:  # a keyed sender then asks who this node is, and sends again
            response.headers.append(("www-authenticate", swarmkey.OTHER_NODE))
        return response

    async def handle(self, request: Request) -> Response:
        """A request from the LAN: with a swarm key set, only nodes that prove it get anything.
        Its head was checked by `gate` on the listener (here when no listener did), its body is
        checked here: it must be the body the proof was made for. This node's /info answer then
        proves its id to the sender (`swarmkey.NODE_HEADER`, for that request only), which names
        it in its next proofs."""
        if self.guard is None:
            return await self.handle_local(request)
        proof = request.headers.get("authorization")
        refusal = None if request.admitted else self.gate(request)
        if refusal is None:
            refusal = self._refusal(request, self.guard.body_matches(proof, request.body))
        if refusal is not None:
            return refusal
        response = await self.handle_local(request)
        if request.path == swarmkey.INFO_PATH and response.status == 200:
            vouch = self.guard.vouch(proof)
            if vouch is not None:
                response.headers.append((swarmkey.NODE_HEADER, vouch))
        return response

    async def handle_local(self, request: Request) -> Response:
        """A request from this machine (the node's own control endpoints), or one already let in.

        Uploads (blob spans and blocks: `/p2pimg/v1/blobs/`, `/p2pimg/v1/blocks/`, `/ipfs/`) take one of
        `max_requests` slots, and get 429 when none is free. Inventories, `/info`, tag records
        and warm requests are small answers from memory: they take none, so a node busy
        uploading still tells others what it holds."""
        if request.path.startswith(("/p2pimg/v1/blobs/", "/p2pimg/v1/blocks/", "/ipfs/")):
            if self.active >= self.max_requests:
                self.metrics.peer_requests.labels("busy").inc()
                return self._busy()
            self.active += 1
            request.hold(self._release_slot)  # the slot is the exchange's until it ends, however it ends
        self.metrics.peer_requests.labels("served").inc()
        try:
            response = await self._route(request)
        except P2pimgError as exc:
            return error_response(exc, head=request.method == "HEAD")
        if not isinstance(response.body, bytes):
            response.body = self._paced(response.body, request.client)
        return response

    def _count(self, client: str, n: int) -> None:
        """Bytes sent to `client`, for the dashboard; the table stays bounded (many addresses
        beyond `_CLIENTS_KEPT` are counted together)."""
        key = client if client in self.served_to or len(self.served_to) < _CLIENTS_KEPT else "other"
        self.served_to[key] += n

    def _release_slot(self) -> None:
        self.active -= 1

    async def _paced(self, body: AsyncIterator[BodyPart], client: str) -> AsyncIterator[BodyPart]:
        """Pace a body to the upload rate (in 256 KiB pieces), counting what `client` got."""
        if self._bucket is None:
            self._bucket = TokenBucket(self.rate)
        async with contextlib.aclosing(body):  # type: ignore[type-var]
            async for part in body:
                if isinstance(part, FileRegion) and self.rate:
                    for off in range(0, part.length, _PIECE):
                        n = min(_PIECE, part.length - off)
                        await self._bucket.take(n)
                        yield FileRegion(part.fd, part.offset + off, n)
                        self.metrics.peer_served_bytes.inc(n)
                        self._count(client, n)
                else:
                    if self.rate:
                        await self._bucket.take(len(part))
                    yield part
                    self.metrics.peer_served_bytes.inc(len(part))
                    self._count(client, len(part))

    async def _route(self, request: Request) -> Response:
        path = request.path
        if request.method == "POST" and path == "/p2pimg/v1/warm" and self.warm is not None:
            return self._warm_start(self.warm, request)
        if request.method not in ("GET", "HEAD"):
            err = P2pimgError(f"{request.method} is not supported here")
            err.oci_code, err.http_status = "UNSUPPORTED", 405
            return error_response(err)
        if path == "/p2pimg/v1/info":
            return _json({"version": PROTOCOL_VERSION, "node": self.node_id})
        if path.startswith("/p2pimg/v1/warm/") and self.warm is not None:
            return self._warm_status(self.warm, path.rpartition("/")[2])
        if path.startswith("/p2pimg/v1/have/"):
            digest = path.rpartition("/")[2]
            parse_digest(digest)
            absent = BlobUnknown(f"this peer holds nothing of {digest}")
            self._guard(digest[7:], absent)
            states = self.fetcher.availability(digest)
            if states is None:
                raise absent
            return _json(
                {
                    "digest": digest,
                    "complete": states == b"",
                    "node": self.node_id,
                    "chunks": base64.b64encode(states).decode() if states else None,
                }
            )
        if path.startswith("/p2pimg/v1/tags/"):
            return await self._tag_record(path[len("/p2pimg/v1/tags/") :], request)
        if path.startswith("/p2pimg/v1/blobs/"):
            return await self._blob(path.rpartition("/")[2], request)
        if path.startswith("/ipfs/"):
            return await self.gateway.serve(path[len("/ipfs/") :], request)
        if path.startswith("/p2pimg/v1/blocks/"):
            return await self.gateway.serve_block(path[len("/p2pimg/v1/blocks/") :], request, MAX_PEER_BLOCK)
        raise NotFound(f"no such endpoint {path[:100]}")

    @staticmethod
    def _warm_start(warm: WarmJobs, request: Request) -> Response:
        """POST /p2pimg/v1/warm {"ref": ...}: 202 with the job's id and where to follow it."""
        try:
            doc = json.loads(request.body or b"{}")
            ref = doc.get("ref") if isinstance(doc, dict) else None
            if not isinstance(ref, str):
                raise InvalidInput('expected a JSON body {"ref": "NAME:TAG" or "ipfs/<CID>"}')
            job_id = warm.start(ref)
        except (ValueError, RecursionError):
            return error_response(InvalidInput("the warm request body is not JSON"))
        except P2pimgError as exc:
            response = error_response(exc)
            if isinstance(exc, WarmBusy):
                response.headers.append(("retry-after", "1"))
            return response
        body = json.dumps({"id": job_id}).encode()
        return Response(
            202,
            [
                ("content-type", "application/json"),
                ("content-length", str(len(body))),
                ("location", f"/p2pimg/v1/warm/{job_id}"),
            ],
            body,
        )

    @staticmethod
    def _warm_status(warm: WarmJobs, job_id: str) -> Response:
        """GET /p2pimg/v1/warm/<id>: the job's progress."""
        status = warm.status(job_id)
        if status is None:
            return error_response(NotFound(f"no warm job {job_id[:40]}"))
        return _json(status)

    async def _tag_record(self, text: str, request: Request) -> Response:
        """This node's cached record of `name:tag`, as it was stored (the asker checks it)."""
        name, _, tag = text.rpartition("/")
        check_name(name)
        check_tag(tag)
        record = await trio.to_thread.run_sync(self.store.get_tag_record, name, tag)
        if record is None:
            raise ManifestUnknown(f"this peer holds no tag record of {name}:{tag}")
        body = record.encode()
        return Response(
            200,
            [("content-type", TAG_RECORD), ("content-length", str(len(body)))],
            b"" if request.method == "HEAD" else body,
        )

    def _hidden(self, sha256_hex: str) -> bool:
        """Private content, when no swarm key guards the listener (see `_guard`)."""
        return self.swarm_key is None and self.store.is_private(sha256_hex)

    def _guard(self, sha256_hex: str, absent: P2pimgError) -> None:
        """Content fetched with the user's upstream credentials goes only to peers that proved the
        swarm key; without one this node raises `absent`, the very answer it gives for content it
        does not have, so a stranger cannot even learn that it is here."""
        if self._hidden(sha256_hex):
            raise absent

    async def _blob(self, digest: str, request: Request) -> Response:
        parse_digest(digest)
        self._guard(digest[7:], BlobUnknown(f"this peer holds nothing of {digest}"))
        path = self.store.blob_path(digest)
        try:
            fd = request.open_file(path)
        except FileNotFoundError:
            return self._partial_blob(digest, request)
        size = os.fstat(fd).st_size
        whole = parse_range(request.headers.get("range"), size)
        return self._region(fd, whole or (0, size), size, request, ranged=whole is not None)

    def _partial_blob(self, digest: str, request: Request) -> Response:
        """Verified chunks of a blob this node is still fetching."""
        fetch = self.fetcher.fetch_of(digest)
        if fetch is None:
            raise BlobUnknown(f"this peer holds nothing of {digest}")
        bmap = fetch.map
        asked = parse_range(request.headers.get("range"), bmap.size)
        rng = asked if asked is not None else (0, bmap.size)
        first, last = rng[0] // bmap.chunk_size, (rng[1] - 1) // bmap.chunk_size
        if rng[1] <= rng[0] or not all(fetch.shareable(i) for i in range(first, last + 1)):
            raise RangeNotSatisfiable(f"this peer has not verified all of {rng} yet", size=bmap.size)
        return self._region(request.dup(fetch.partial.fd), rng, bmap.size, request, ranged=asked is not None)

    @staticmethod
    def _region(fd: int, rng: tuple[int, int], size: int, request: Request, *, ranged: bool) -> Response:
        """Bytes [start, end) of `fd`, a descriptor the request owns."""
        start, end = rng
        headers = [("content-type", "application/octet-stream"), ("content-length", str(end - start))]
        if ranged:
            headers.append(("content-range", content_range(start, end, size)))
        if request.method == "HEAD":
            return Response(206 if ranged else 200, headers)
        return Response(206 if ranged else 200, headers, _file_body(fd, start, end))


async def _file_body(fd: int, start: int, end: int) -> AsyncIterator[BodyPart]:
    """The body of a file region; the descriptor belongs to the request (`Request.hold`)."""
    if end > start:
        yield FileRegion(fd, start, end - start)


def _json(value: object) -> Response:
    body = json.dumps(value).encode()
    return Response(200, [("content-type", "application/json"), ("content-length", str(len(body)))], body)
