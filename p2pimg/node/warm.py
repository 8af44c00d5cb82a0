"""Warming: fetch an image completely into the cache and verify it, here or on LAN peers.

A warm is an ordinary fetch opened as a warm: it runs to the end whoever reads, and it takes its
chunks wherever the engine finds them (peers first). A node runs warms as jobs; `p2pimg warm`
either asks the node serving the same home to run one (so its peers and singleflight apply) or
runs a node of its own for the duration.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import trio

from p2pimg.content.cid import Cid
from p2pimg.content.model import parse_name_tag
from p2pimg.errors import P2pimgError, first_error
from p2pimg.fetch.engine import BlobFetch, Fetcher
from p2pimg.fetch.resolver import IPFS_PREFIX, Resolver, ipfs_cid
from p2pimg.sources.peer import request_json
from p2pimg.store.chunks import ChunkStore
from p2pimg.store.index import ChunkIndex
from p2pimg.tasks import guarded

log = logging.getLogger(__name__)

_PARALLEL_BLOBS = 4
_MAX_JOBS = 256  # kept (running or finished) per node; a request beyond that many running is refused


class WarmBusy(P2pimgError):
    """As many warm jobs as a node keeps are running: refuse another until some end."""

    oci_code = "TOOMANYREQUESTS"
    http_status = 429


@dataclass
class WarmProgress:
    ref: str
    root: str = ""
    state: str = "running"  # running | done | failed
    blobs: int = 0
    bytes_total: int = 0
    done_bytes: int = 0  # of blobs finished
    done_blobs: int = 0
    by_source: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    exit_code: int = 0  # a failed job: its first error's process exit code (3 not found, ...)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    _running: list[object] = field(default_factory=list)

    @property
    def bytes_done(self) -> int:
        partial = sum(f.partial.present_bytes() for f in self._running if isinstance(f, BlobFetch))
        return min(self.bytes_total, self.done_bytes + partial)

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def to_json(self) -> dict[str, object]:
        return {
            "ref": self.ref,
            "root": self.root,
            "state": self.state,
            "blobs": self.blobs,
            "blobs_done": self.done_blobs,
            "bytes_total": self.bytes_total,
            "bytes_done": self.bytes_done,
            "by_source": self.by_source,
            "error": self.error,
            "seconds": round(self.seconds, 3),
            **({"exit_code": self.exit_code} if self.state == "failed" else {}),
        }


def parse_ref(ref: str) -> tuple[str, str] | Cid:
    """`NAME:TAG` or `ipfs/<CID>`: a p2pimg image root (dag-cbor), or the CID `nerdctl push
    ipfs://` printed (raw, or dag-pb); which one it is, the resolver finds out (`Resolver.image`)."""
    if ref.startswith(IPFS_PREFIX):
        return ipfs_cid(ref)
    return parse_name_tag(ref)


class WarmJobs:
    """Warm jobs of one node, started in process or (through the peer API) over HTTP; a job's
    progress is plain data (`WarmProgress.to_json`)."""

    def __init__(
        self,
        resolver: Resolver,
        store: ChunkStore,
        fetcher: Fetcher,
        index: ChunkIndex,
        nursery: trio.Nursery,
    ) -> None:
        self.resolver = resolver
        self.store = store
        self.fetcher = fetcher
        self.index = index
        self.nursery = nursery
        self.jobs: dict[str, WarmProgress] = {}

    def start(self, ref: str) -> str:
        """Start warming `ref`: the new job's id. InvalidInput for a bad reference, WarmBusy when
        as many jobs as a node keeps are running."""
        parse_ref(ref)  # refuse a bad reference now, not in the job
        if len(self.jobs) >= _MAX_JOBS:
            for job_id in [j for j, p in self.jobs.items() if p.state != "running"][: _MAX_JOBS // 2]:
                del self.jobs[job_id]
            if len(self.jobs) >= _MAX_JOBS:  # all running: the table and its tasks stay bounded
                raise WarmBusy(f"{len(self.jobs)} warm jobs are running; try again when some end")
        job_id = uuid.uuid4().hex
        progress = self.jobs[job_id] = WarmProgress(ref)
        self.nursery.start_soon(guarded, f"warm job {ref}", self._run, ref, progress)
        return job_id

    def status(self, job_id: str) -> dict[str, object] | None:
        """A job's progress as JSON-ready data; None for a job this node does not know."""
        progress = self.jobs.get(job_id)
        return None if progress is None else progress.to_json()

    async def _run(self, ref: str, progress: WarmProgress) -> None:
        """Fetch every manifest and blob of an image into the cache, then check they are all there."""
        try:
            parsed = parse_ref(ref)
            root_cid = parsed if isinstance(parsed, Cid) else await self.resolver.resolve_tag(*parsed)
            progress.root = str(root_cid)
            root = await self.resolver.image(root_cid)  # a p2pimg root, or a nerdctl image
            for digest, entry in root.manifests.items():
                await self.resolver.manifest(entry, digest)  # verified and cached as blocks
            progress.blobs = len(root.blobs)
            progress.bytes_total = sum(b.size for b in root.blobs.values())
            limit = trio.CapacityLimiter(_PARALLEL_BLOBS)

            async def one(digest: str) -> None:
                entry = root.blobs[digest]
                async with limit:
                    if self.store.has_blob(digest):
                        progress.by_source["cache"] = progress.by_source.get("cache", 0) + entry.size
                        progress.done_bytes += entry.size
                        progress.done_blobs += 1
                        return
                    bmap = await self.resolver.blob_map(entry, digest)
                    self.index.add(bmap)
                    # Named after the image (as its pull shows on the dashboard): "warm NAME".
                    name = f"warm {ref.rsplit(':', 1)[0] if not isinstance(parsed, Cid) else ref}"
                    fetch = await self.fetcher.open(bmap, warm=True, repository=name)
                    if fetch is not None:
                        progress._running.append(fetch)
                        try:
                            await fetch.done.wait()
                        finally:
                            progress._running.remove(fetch)
                        for kind, n in fetch.received.items():
                            progress.by_source[kind] = progress.by_source.get(kind, 0) + n
                        if fetch.error is not None:
                            raise fetch.error
                        kept = entry.size - sum(fetch.received.values())
                        if kept > 0:  # verified chunks already on disk before this warm
                            progress.by_source["cache"] = progress.by_source.get("cache", 0) + kept
                    progress.done_bytes += entry.size
                    progress.done_blobs += 1

            async with trio.open_nursery() as nursery:
                for digest in root.blobs:
                    nursery.start_soon(one, digest)
            missing = [d for d in root.blobs if not self.store.has_blob(d)]
            if missing:
                raise P2pimgError(f"{len(missing)} blobs are still missing after the warm: {missing[0]}")
            progress.state = "done"
        except* P2pimgError as group:
            progress.state = "failed"
            messages = {e.message for e in group.exceptions if isinstance(e, P2pimgError)}
            progress.error = "; ".join(sorted(messages))
            progress.exit_code = first_error(group).exit_code
        except* Exception as group:  # a bug: this job fails with it, the node serves on
            log.error("warm job %s crashed", ref, exc_info=group)
            progress.state = "failed"
            progress.error = "internal error: " + "; ".join(sorted({repr(e) for e in group.exceptions}))
            progress.exit_code = 1
        finally:
            progress.finished = time.monotonic()
            if progress.state == "running":
                progress.state, progress.error = "failed", progress.error or "interrupted"


# -- warming on another node ------------------------------------------------------------------

ANSWER_LIMIT = 64 << 10  # a warm job's JSON, or a node's peer list
_REMOTE_TIMEOUT = 3600.0
_POLL = 0.25

Poll = Callable[[], Awaitable[dict[str, object]]]


async def poll_quietly(poll: Poll, label: str = "") -> dict[str, object]:
    """Poll a warm job until it ends."""
    while True:
        status = await poll()
        if status.get("state") != "running":
            return status
        await trio.sleep(_POLL)


async def remote_warm(
    client: httpx.AsyncClient,
    base: str,
    ref: str,
    *,
    follow: Callable[[Poll, str], Awaitable[dict[str, object]]] | None = None,
) -> dict[str, object]:
    """Ask a node (this machine's server, or a LAN peer at `base`) to warm `ref` through its API,
    and wait for the job to end, following it with `follow` (default: quietly). The job's last
    status; a failure to reach the node or a refusal is a status too (state "failed")."""
    try:
        started = await request_json(
            client, "POST", f"{base}/p2pimg/v1/warm", body={"ref": ref}, limit=ANSWER_LIMIT, timeout=30
        )
        doc = started.doc
        if started.status != 202 or not isinstance(doc, dict) or not isinstance(doc.get("id"), str):
            errors = doc.get("errors") if isinstance(doc, dict) else None
            message = (
                errors[0].get("message")
                if isinstance(errors, list) and errors and isinstance(errors[0], dict)
                else started.text.strip()
            )
            return {"state": "failed", "error": f"{started.status}: {message}"}
        job = doc["id"]

        async def poll() -> dict[str, object]:
            answer = await request_json(
                client, "GET", f"{base}/p2pimg/v1/warm/{job}", limit=ANSWER_LIMIT, timeout=30
            )
            if answer.status != 200 or not isinstance(answer.doc, dict):
                raise ValueError(f"{answer.status} from {base} for warm job {job}: {answer.text.strip()}")
            return answer.doc

        with trio.fail_after(_REMOTE_TIMEOUT):
            return await (follow or poll_quietly)(poll, f"warming on {base}")
    except (httpx.HTTPError, ValueError, KeyError, trio.TooSlowError) as exc:
        return {"state": "failed", "error": f"{type(exc).__name__}: {exc}"}
    except P2pimgError as exc:
        return {"state": "failed", "error": exc.message}
