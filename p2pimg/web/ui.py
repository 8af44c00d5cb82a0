"""The dashboard: `/ui/` on the registry listener (never on the peer listener), and its JSON API.

    GET  /ui/                     the page (static files under /ui/static/, shipped in the package)
    GET  /ui/api/node             this node: id, addresses, origin, upstreams, TLS and swarm key
    GET  /ui/api/images           published and cached images: root CID, size, cached bytes, pinned
    GET  /ui/api/transfers        running and recent blob fetches: chunk map by source, series
    GET  /ui/api/peers            peers: how found, rate, backoff/ban, bytes each way
    GET  /ui/api/cache            used vs limit, pinned bytes, evictions
    POST /ui/api/warm             {"ref", "lan"}: warm here (and on every peer) -> {"id"}
    GET  /ui/api/warm/<id>        a warm's progress (with each peer's, for a LAN warm)
    POST /ui/api/pin, /unpin      {"ref"}
    POST /ui/api/gc               {"max_size"?}: evict down to it (default --cache-max, else 0)

Who may see and do what. The dashboard shows the node's peers and images, so it answers clients on
this machine only, and only under a `Host` of `localhost` or an IP address (a page of another site
that rebinds its DNS name to 127.0.0.1 sends its name, and never gets an answer). An action (POST)
also needs the session's token, which the page gets embedded in it (a new one each time the node
starts), an `Origin`, when the browser sends one, of this very listener, and a JSON body (which a
plain form of another site cannot send without a CORS preflight, never answered here).
`--ui-read-only` refuses every action. The same handler also answers on `--ui-socket PATH`, a unix
socket only its owner can open and no browser page can reach: there neither Host, Origin nor token
is asked for (it is how the Docker Desktop extension's UI reaches its backend container). The
node's other control endpoints on this listener (`/p2pimg/v1/warm`, ...) refuse a rebound Host,
a foreign Origin and a POST that is not JSON in the same way (`web/serve.py`).
"""

from __future__ import annotations

import collections
import hmac
import importlib.resources
import ipaddress
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import trio

import p2pimg
from p2pimg.errors import EndpointUnknown, InvalidInput, NotFound, P2pimgError, UnsupportedMethod
from p2pimg.fetch.engine import BlobFetch
from p2pimg.fetch.resolver import IPFS_PREFIX, ipfs_cid
from p2pimg.fetch.schedule import COMING
from p2pimg.node import pins as node_pins
from p2pimg.node.node import Node, peer_client
from p2pimg.node.warm import Poll, parse_ref, remote_warm
from p2pimg.sources.origins import list_tags
from p2pimg.store import cache
from p2pimg.web.peerapi import PeerService
from p2pimg.web.registry import error_response
from p2pimg.web.server import UNIX, Request, Response

log = logging.getLogger(__name__)
_T = TypeVar("_T")

_STATIC = importlib.resources.files("p2pimg.web") / "ui_static"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
_MAX_BODY = 4096  # an action's JSON
_IMAGES_EVERY = 5.0  # seconds between two listings of the origin's tags
_CACHE_EVERY = 2.0  # seconds between two scans of the cache directory
_MAX_IMAGES = 200  # tags shown (each needs its image root)
_WARMS_KEPT = 64  # LAN warm tables kept
_MAX_CLIENTS = 50  # clients of the peer listener listed (those that are not our peers)


class Denied(P2pimgError):
    """The dashboard refuses a request: not from this machine, a foreign origin, no token, or
    an action in read-only mode."""

    oci_code = "DENIED"
    http_status = 403
    exit_code = 2


def _json(value: object, status: int = 200) -> Response:
    body = json.dumps(value).encode()
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        ("cache-control", "no-store"),
    ]
    return Response(status, headers, body)


def literal_host(host: str) -> bool:
    """A `Host` that no DNS name can stand behind: `localhost`, or an IP address written out
    (127.0.0.1, [::1], the address a client on this machine connected to; any port). A page of
    another site reaches a node only under its own name (DNS rebinding), so it never passes; nor
    does a name that merely looks like an address (127.0.0.1.attacker.example)."""
    name = urlsplit(f"//{host}").hostname or ""
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def foreign_origin(request: Request) -> str | None:
    """The `Origin` a browser sent, when it is not this listener's own (a page of another site)."""
    origin = request.headers.get("origin")
    return origin if origin is not None and origin != f"http://{request.headers.get('host', '')}" else None


def json_body(request: Request) -> bool:
    """Whether the body is declared JSON: what a cross-site page cannot send without a preflight."""
    return request.headers.get("content-type", "").split(";")[0].strip() == "application/json"


class _Refreshed(Generic[_T]):
    """A value that is slow to make (a cache scan, the origin's tags). A caller gets the last
    one at once; a stale one is made again in the background, one at a time, and no more often
    than every `every` seconds or ten times as long as the last one took, so a dashboard left
    open costs little however large the cache. `forget()` makes the next caller wait for a new
    one (after an action changed it)."""

    def __init__(self, make: Callable[[], Awaitable[_T]], every: float, nursery: trio.Nursery) -> None:
        self._make, self._every, self._nursery = make, every, nursery
        self._value: _T | None = None
        self._made = -math.inf
        self._took = 0.0
        self._running: trio.Event | None = None

    async def get(self) -> _T:
        if self._value is None:
            if self._running is None:
                await self._run()
            else:
                await self._running.wait()
            if self._value is None:  # the making failed (logged): try again next time
                raise P2pimgError("the dashboard could not read this node's state; see the log")
            return self._value
        stale = time.monotonic() - self._made >= max(self._every, 10 * self._took)
        if stale and self._running is None:
            self._running = trio.Event()  # before the task starts: one at a time
            self._nursery.start_soon(self._run)
        return self._value

    def forget(self) -> None:
        self._value, self._made = None, -math.inf

    async def _run(self) -> None:
        if self._running is None:
            self._running = trio.Event()
        done = self._running
        began = time.monotonic()
        try:
            self._value = await self._make()
            self._made, self._took = time.monotonic(), time.monotonic() - began
        except Exception:  # a bug or an unreadable directory: shown as an error, logged once here
            log.exception("dashboard: refreshing its state failed")
        finally:
            self._running = None
            done.set()


class Dashboard:
    """The `/ui/` part of the registry listener of one node."""

    def __init__(self, node: Node, peers: PeerService, *, registry: str = "") -> None:
        self.node = node
        self.peers = peers
        self.registry = registry  # HOST:PORT of the listener, once bound
        self.read_only = node.config.ui_read_only
        self.token = secrets.token_urlsafe(32)
        self.started = time.monotonic()
        self._images = _Refreshed(self._list_images, _IMAGES_EVERY, node.nursery)
        self._scan = _Refreshed(
            partial(trio.to_thread.run_sync, cache.scan, node.store), _CACHE_EVERY, node.nursery
        )
        self._lan: collections.OrderedDict[str, dict[str, dict[str, object]]] = collections.OrderedDict()
        self._gets: dict[str, Callable[[], Awaitable[object]]] = {
            "/ui/api/node": self._node,
            "/ui/api/images": self._images_doc,
            "/ui/api/transfers": self._transfers,
            "/ui/api/peers": self._peers,
            "/ui/api/cache": self._cache_doc,
        }
        self._posts: dict[str, Callable[[dict[str, Any]], Awaitable[tuple[int, object]]]] = {
            "/ui/api/warm": self._warm,
            "/ui/api/pin": self._pin,
            "/ui/api/unpin": self._unpin,
            "/ui/api/gc": self._gc,
        }

    @staticmethod
    def wants(request: Request) -> bool:
        return request.path == "/ui" or request.path.startswith("/ui/")

    async def handle(self, request: Request) -> Response:
        try:
            self._check_caller(request)
            if request.path == "/ui":
                return Response(308, [("location", "/ui/"), ("content-length", "0")], b"")
            if request.method == "POST":
                return await self._post(request)
            if request.method not in ("GET", "HEAD"):
                raise UnsupportedMethod(f"{request.method} is not allowed on {request.path}")
            if request.path == "/ui/":
                return self._page()
            if request.path.startswith("/ui/static/"):
                return self._static(request.path[len("/ui/static/") :])
            if request.path.startswith("/ui/api/warm/"):
                return _json(self._warm_status(request.path[len("/ui/api/warm/") :]))
            get = self._gets.get(request.path)
            if get is None:
                raise NotFound(f"no dashboard page or API at {request.path}")
            return _json(await get())
        except P2pimgError as exc:
            return error_response(exc, head=request.method == "HEAD")

    # -- who is asking -----------------------------------------------------------------------

    def _check_caller(self, request: Request) -> None:
        if request.client == UNIX:
            return  # only this machine's user can open the socket, and no browser page can
        if not request.from_this_machine:
            raise Denied("the dashboard answers clients on this machine only")
        if not literal_host(request.headers.get("host", "")):
            raise Denied("open the dashboard as http://127.0.0.1:PORT/ui/ or http://localhost:PORT/ui/")

    def _check_action(self, request: Request) -> None:
        if self.read_only:
            raise Denied("this node's dashboard is read-only (--ui-read-only)")
        if request.client == UNIX:
            return
        if (origin := foreign_origin(request)) is not None:
            raise Denied(f"an action from another origin ({origin[:100]}) is refused")
        given = request.headers.get("x-p2pimg-token", "")
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise Denied("missing or wrong X-P2pimg-Token: reload the dashboard page")
        if not json_body(request):
            raise InvalidInput("an action's body must be JSON (Content-Type: application/json)")

    async def _post(self, request: Request) -> Response:
        action = self._posts.get(request.path)
        if action is None:
            raise NotFound(f"no dashboard action at {request.path}")
        self._check_action(request)
        if len(request.body) > _MAX_BODY:
            raise InvalidInput(f"an action's body is at most {_MAX_BODY} bytes")
        try:
            doc = json.loads(request.body or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise InvalidInput("the body is not JSON") from None
        if not isinstance(doc, dict):
            raise InvalidInput("the body must be a JSON object")
        status, answer = await action(doc)
        return _json(answer, status)

    # -- the page ----------------------------------------------------------------------------

    def _page(self) -> Response:
        text = (_STATIC / "index.html").read_text()
        text = text.replace("{{TOKEN}}", self.token).replace("{{READ_ONLY}}", "1" if self.read_only else "0")
        body = text.encode()
        return Response(
            200,
            [
                ("content-type", _TYPES[".html"]),
                ("content-length", str(len(body))),
                ("cache-control", "no-store"),
                ("content-security-policy", _POLICY),
                ("x-content-type-options", "nosniff"),
                ("referrer-policy", "no-referrer"),
            ],
            body,
        )

    @staticmethod
    def _static(name: str) -> Response:
        suffix = name[name.rfind(".") :] if "." in name else ""
        # Only plain file names of the package's own directory: no paths, no hidden files.
        if "/" in name or name.startswith(".") or suffix not in _TYPES or name == "index.html":
            raise NotFound(f"no dashboard file {name[:100]}")
        resource = _STATIC / name
        if not resource.is_file():
            raise NotFound(f"no dashboard file {name[:100]}")
        body = resource.read_bytes()
        return Response(
            200,
            [
                ("content-type", _TYPES[suffix]),
                ("content-length", str(len(body))),
                ("cache-control", "no-cache"),
                ("x-content-type-options", "nosniff"),
            ],
            body,
        )

    # -- what it shows -----------------------------------------------------------------------

    async def _node(self) -> dict[str, object]:
        config = self.node.config
        return {
            "node_id": self.node.node_id,
            "version": p2pimg.__version__,
            "registry": self.registry,
            "peer_listen": config.peer_listen,
            "origin": self.node.origin.url,
            "upstreams": list(config.upstreams),
            "gateways": list(getattr(config, "ipfs_gateways", ())),
            "read_only": self.read_only,
            "tls": self.node.tls is not None,
            "swarm_key": self.node.swarm_key is not None,
            "uptime": round(time.monotonic() - self.started, 1),
        }

    async def _transfers(self) -> dict[str, object]:
        log_ = self.node.fetcher.transfers
        now = trio.current_time()
        active = []
        for record in list(log_.active.values()):
            fetch = self.node.fetcher.fetch_of(record.digest)
            active.append(record.to_json(now, _coming(fetch)))
        active.sort(key=lambda t: float(t["started"]))  # type: ignore[arg-type]
        finished = [r.to_json(now) for r in log_.finished]
        return {"now": round(now, 4), "active": active, "finished": finished, "pulls": log_.pulls(now)}

    async def _peers(self) -> dict[str, object]:
        swarm, stats, log_ = self.node.swarm, self.node.fetcher.stats, self.node.fetcher.transfers
        now = trio.current_time()
        found = []
        for url, source in sorted(swarm.peers.items()):
            s = stats.get(source.name)
            state = "ok"
            if s is not None and s.banned:
                state = "banned"
            elif s is not None and s.unavailable_until > now:
                state = "backoff"
            elif source.node_id is None or source.failed_at > source.answered_at:
                state = "unreachable"  # never answered, or its last inventory poll failed
            found.append(
                {
                    "url": url,
                    "node_id": source.node_id,
                    "found": swarm.found_by(url),
                    "rate": round(log_.source_rate(source.name, now), 1),
                    "state": state,
                    "backoff": round(s.unavailable_until - now, 1) if state == "backoff" and s else None,
                    "bad_chunks": s.bad_chunks if s is not None else 0,
                    "tls": url.startswith("https://"),
                    "sent_us": log_.totals.get(source.name, 0),
                    "we_sent": self.peers.served_to.get(urlsplit(url).hostname or "", 0),
                }
            )
        hosts = {urlsplit(url).hostname for url in swarm.peers}
        clients = [
            {"address": address, "we_sent": n}
            for address, n in self.peers.served_to.most_common(_MAX_CLIENTS)
            if address not in hosts
        ]
        return {"me": self.node.node_id, "peers": found, "clients": clients}

    async def _cache_doc(self) -> dict[str, object]:
        state = await self._scan.get()
        metrics = self.node.metrics
        disk = await trio.to_thread.run_sync(os.statvfs, self.node.store.root)
        return {
            "disk_size": disk.f_frsize * disk.f_blocks,
            "disk_free": disk.f_frsize * disk.f_bavail,
            "used": state.total,
            "limit": self.node.config.cache_max,
            "blobs": len(state.blobs),
            "blob_bytes": state.blob_bytes,
            "partial": state.partial_bytes,
            "pinned": sum(b.size for b in state.blobs if b.pinned),
            "evictions": int(metrics.cache_evictions._value.get()),
            "evicted_bytes": int(metrics.cache_evicted_bytes._value.get()),
        }

    async def _images_doc(self) -> dict[str, object]:
        images = await self._images.get()
        state = await self._scan.get()
        sizes = {b.digest: b.size for b in state.blobs}
        partial = {p.digest: p.verified for p in state.partials}
        pinned_roots = await trio.to_thread.run_sync(cache.pins, self.node.store)
        shown = []
        for image in images:
            digests: list[str] = image.get("_digests", [])  # type: ignore[assignment]
            cached = sum(sizes.get(d) or partial.get(d, 0) for d in digests)
            shown.append(
                {k: v for k, v in image.items() if not k.startswith("_")}
                | {"cached": cached, "pinned": image["root"] is not None and image["root"] in pinned_roots}
            )
        return {"images": shown}

    async def _list_images(self) -> list[dict[str, object]]:
        """Published NAME:TAGs (from the origin; those this cache saw when it is unreachable),
        then images only pinned here, each with its root's size and blob digests."""
        resolver, store = self.node.resolver, self.node.store
        refs: list[tuple[str, str, str]] = []  # (name, tag, kind)
        try:
            with trio.fail_after(10):
                published = await list_tags(self.node.origin)
        except (P2pimgError, OSError, trio.TooSlowError) as exc:
            log.info("dashboard: cannot list the origin's tags: %s", exc)
            published = {}
        refs += [(name, tag, "published") for name, tags in published.items() for tag in tags]
        for ref, _digests in (await trio.to_thread.run_sync(cache.pins, store)).values():
            if ref.startswith(IPFS_PREFIX):
                refs.append((ref, "latest", "cached"))
            elif ":" in ref and tuple(ref.rsplit(":", 1)) not in {(n, t) for n, t, _ in refs}:
                name, tag = ref.rsplit(":", 1)
                refs.append((name, tag, "cached"))
        images: list[dict[str, object]] = []
        for name, tag, kind in refs[:_MAX_IMAGES]:
            try:
                with trio.fail_after(10):
                    cid = (
                        ipfs_cid(name)
                        if name.startswith(IPFS_PREFIX)
                        else await resolver.resolve_tag(name, tag)
                    )
                    root = await resolver.image(cid)  # a p2pimg root, or a nerdctl image
            except (P2pimgError, trio.TooSlowError) as exc:
                failed: dict[str, object] = {"name": name, "tag": tag, "kind": kind, "root": None}
                images.append(failed | {"size": 0, "blobs": 0, "error": str(exc)})
                continue
            images.append(
                {
                    "name": name,
                    "tag": tag,
                    "root": str(cid),
                    "kind": kind,
                    "size": sum(e.size for e in root.blobs.values()),
                    "blobs": len(root.blobs),
                    "_digests": sorted(root.blobs),
                }
            )
        mirror = self.node.mirror
        if mirror is not None:  # images pulled through --upstream: no root CID, no actions here
            for host, repo, tag, top, blobs in await trio.to_thread.run_sync(mirror.cached_images):
                images.append(
                    {
                        "name": repo,
                        "tag": tag,
                        "root": None,
                        "digest": top,
                        "upstream": host,
                        "kind": "mirror",
                        "size": sum(blobs.values()),
                        "blobs": len(blobs),
                        "_digests": sorted(blobs),
                    }
                )
        return images

    # -- actions -------------------------------------------------------------------------------

    @staticmethod
    def _ref(doc: dict[str, Any]) -> str:
        ref = doc.get("ref")
        if not isinstance(ref, str) or not ref.strip():
            raise InvalidInput('expected {"ref": "NAME:TAG" or "ipfs/<CID>"}')
        ref = ref.strip()
        parse_ref(ref)  # a bad reference is a 400 now
        return ref

    async def _warm(self, doc: dict[str, Any]) -> tuple[int, object]:
        ref = self._ref(doc)
        lan = doc.get("lan", False)
        if not isinstance(lan, bool):
            raise InvalidInput('"lan" must be true or false')
        job = self.node.warm.start(ref)
        if lan:
            table: dict[str, dict[str, object]] = {}
            self._lan[job] = table
            while len(self._lan) > _WARMS_KEPT:
                self._lan.popitem(last=False)
            client = peer_client(self.node.swarm_key, self.node.tls)
            self.node.nursery.start_soon(self._warm_peers, client, ref, list(self.node.swarm.peers), table)
        return 202, {"id": job}

    async def _warm_peers(
        self, client: Any, ref: str, urls: list[str], table: dict[str, dict[str, object]]
    ) -> None:
        async def one(url: str) -> None:
            table[url] = {"state": "running"}

            async def follow(poll: Poll, _label: str) -> dict[str, object]:
                while True:
                    table[url] = status = await poll()
                    if status.get("state") != "running":
                        return status
                    await trio.sleep(0.5)

            table[url] = await remote_warm(client, url.rstrip("/"), ref, follow=follow)

        try:
            async with trio.open_nursery() as nursery:
                for url in urls:
                    nursery.start_soon(one, url)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await client.aclose()

    def _warm_status(self, job: str) -> dict[str, object]:
        status = self.node.warm.status(job)
        if status is None:
            raise EndpointUnknown(f"no warm job {job[:64]}")
        doc = dict(status, id=job, bytes=status.get("bytes_total"))
        if job in self._lan:
            doc["peers"] = dict(self._lan[job])
        return doc

    async def _pin(self, doc: dict[str, Any]) -> tuple[int, object]:
        root, digests = await node_pins.pin(self.node.store, self.node.resolver, self._ref(doc))
        self._images.forget()
        return 200, {"root": str(root), "blobs": len(digests)}

    async def _unpin(self, doc: dict[str, Any]) -> tuple[int, object]:
        roots = await node_pins.unpin(self.node.store, self.node.resolver, self._ref(doc))
        self._images.forget()
        return 200, {"roots": roots}

    async def _gc(self, doc: dict[str, Any]) -> tuple[int, object]:
        text = doc.get("max_size")
        if text is not None and not isinstance(text, str | int):
            raise InvalidInput('"max_size" must be a size such as "10G" or a number of bytes')
        limit = cache.parse_limit(str(text)) if text is not None else self.node.config.cache_max or 0
        fetcher, metrics = self.node.fetcher, self.node.metrics
        # The scan in a thread; the deletions here, each checked against running fetches right
        # before it (no await between), as the node's own cache limit does.
        state = await trio.to_thread.run_sync(cache.scan, self.node.store)
        result = cache.collect(
            self.node.store, limit, state=state, busy=lambda digest: fetcher.fetch_of(digest) is not None
        )
        for item in result.removed:
            metrics.evicted(item.size)
        self._scan.forget()
        return 200, {
            "removed": len(result.removed),
            "freed": sum(item.size for item in result.removed),
            "before": result.before,
            "after": result.after,
            "limit": limit,
        }


def _coming(fetch: BlobFetch | None) -> bytes:
    """Per chunk, nonzero where a request is bringing it now."""
    if fetch is None or fetch.schedule is None:
        return b""
    return bytes(1 if state == COMING else 0 for state in fetch.schedule.availability())


__all__ = ["Dashboard", "Denied"]
