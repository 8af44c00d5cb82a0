"""`p2pimg warm REF [--lan]`: the command line side of warming, with progress and a summary."""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import trio

from p2pimg.node.config import Config
from p2pimg.node.node import open_node, peer_client, read_serve_info
from p2pimg.node.peertls import load_peer_tls
from p2pimg.node.swarmkey import load_swarm_key
from p2pimg.node.warm import ANSWER_LIMIT, WarmProgress, parse_ref, remote_warm
from p2pimg.sources.peer import get_json

_POLL = 0.25
_DISCOVERY_WAIT = 2.0


@dataclass
class Outcome:
    where: str
    status: dict[str, object]


def _mb(n: object) -> str:
    return f"{int(n) / 1e6:.1f} MB" if isinstance(n, int | float) else "?"


def summary(ref: str, status: dict[str, object]) -> str:
    by = status.get("by_source") or {}
    assert isinstance(by, dict)
    parts = ", ".join(f"{kind} {_mb(n)}" for kind, n in sorted(by.items())) or "nothing fetched"
    return (
        f"{ref} ({status.get('root')}): {status.get('blobs')} blobs, {_mb(status.get('bytes_total'))} "
        f"in {status.get('seconds')} s; by source: {parts}"
    )


async def follow_progress(poll: Callable[[], Awaitable[dict[str, object]]], label: str) -> dict[str, object]:
    """Poll a warm job until it ends, with a progress bar on a terminal."""
    if not sys.stderr.isatty():
        while True:
            status = await poll()
            if status.get("state") != "running":
                return status
            await trio.sleep(_POLL)
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)
        while True:
            status = await poll()
            total, done = status.get("bytes_total"), status.get("bytes_done")
            bar.update(
                task,
                total=total if isinstance(total, int) and total else None,
                completed=done if isinstance(done, int) else 0,
            )
            if status.get("state") != "running":
                return status
            await trio.sleep(_POLL)


async def warm_through(client: httpx.AsyncClient, base: str, ref: str) -> dict[str, object]:
    """Ask a node (the local server, or a LAN peer) to warm, and wait for it (with a progress bar
    when it is this machine's server)."""
    return await remote_warm(
        client, base, ref, follow=follow_progress if base.startswith("http://127.") else None
    )


async def run_warm(config: Config, ref: str, *, lan: bool) -> int:
    parse_ref(ref)
    key = load_swarm_key(config.home, config.swarm_key_file, given=config.swarm_key_file_given)
    client = peer_client(
        key, load_peer_tls(config.home, *config.peer_tls), timeout=httpx.Timeout(30, connect=2)
    )
    outcomes: list[Outcome] = []
    try:
        info = read_serve_info(config)
        if info is not None:
            base = f"http://{info['registry']}"
            print(f"p2pimg: warming through the server of this home at {base}", file=sys.stderr)
            peers: list[str] = []
            if lan:
                try:
                    found = await get_json(client, f"{base}/p2pimg/v1/peers", limit=ANSWER_LIMIT, timeout=10)
                except httpx.HTTPError:
                    found = None
                peers = [url for url in found if isinstance(url, str)] if isinstance(found, list) else []
            async with trio.open_nursery() as nursery:
                for url in peers:
                    nursery.start_soon(_warm_peer, client, url, ref, outcomes)
                outcomes.insert(0, Outcome("this machine", await warm_through(client, base, ref)))
        else:
            async with open_node(config) as node:
                if lan and node.swarm.discovery is not None:
                    await trio.sleep(_DISCOVERY_WAIT)  # let mDNS find the LAN's peers
                job = node.warm.start(ref)
                progress: WarmProgress = node.warm.jobs[job]

                async def poll() -> dict[str, object]:
                    return progress.to_json()

                async with trio.open_nursery() as nursery:
                    if lan:
                        for url in list(node.swarm.peers):
                            nursery.start_soon(_warm_peer, client, url, ref, outcomes)
                    outcomes.insert(0, Outcome("this machine", await follow_progress(poll, f"warming {ref}")))
    finally:
        await client.aclose()
    status = 0
    for outcome in outcomes:
        state = outcome.status.get("state")
        if state == "done":
            print(f"{outcome.where}: warmed {summary(ref, outcome.status)}")
        else:
            # This machine's failure says what went wrong (3: not found, 5: origin, ...); a peer's
            # failure alone is 1.
            code = outcome.status.get("exit_code") if outcome.where == "this machine" else None
            status = status or (code if isinstance(code, int) and 0 < code < 128 else 1)
            print(f"{outcome.where}: FAILED: {outcome.status.get('error')}", file=sys.stderr)
    if lan and len(outcomes) == 1:
        print("p2pimg: no LAN peers were found to warm (use --peer URL, or check mDNS)", file=sys.stderr)
    return status


async def _warm_peer(client: httpx.AsyncClient, url: str, ref: str, outcomes: list[Outcome]) -> None:
    started = time.monotonic()
    status = await warm_through(client, url.rstrip("/"), ref)
    status.setdefault("seconds", round(time.monotonic() - started, 3))
    outcomes.append(Outcome(f"peer {url}", status))
