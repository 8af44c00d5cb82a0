"""The dashboard in a real browser (Debian's chromium, headless, driven by Playwright) against
real `p2pimg serve` processes while skopeo pulls through them.

Three nodes share one file origin: A holds what it pulled from the origin, B has A as its peer,
C has both. A and B cap their uploads to peers (--peer-rate), so a pull through B or C lasts a
few seconds and the page, which polls once a second, sees it while it runs. Another node mirrors
a docker-registry (--upstream), one has a peer that never answers.

Screenshots go to a temporary directory, and into docs/ui/ when P2PIMG_UPDATE_SCREENSHOTS=1:
2400x1600 pixels, as Docker recommends for an extension's listing (a 1200x800 part of the page at
a device scale factor of 2).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from conftest import (
    COMMAND_TIMEOUT,
    ContainersConfig,
    Daemon,
    Skopeo,
    client_env,
    free_port,
    http_status,
    run_command,
    start_or_fail,
)
from test_extension_package import image_root

from p2pimg.ops.sample import LayerSpec, SampleImage, write_oci_layout

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install .[test])"
)
expect = sync_api.expect
if TYPE_CHECKING:
    from conftest import Registry
    from playwright.sync_api import Browser, Locator, Page, ViewportSize

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Debian's chromium, never a browser build of Playwright's own (`playwright install` is not run).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Every page here is on loopback: no proxy from the environment may see a request.
    "--no-proxy-server",
]
# The machine is small and shared: give the page room, it polls once a second.
WAIT_MS = 30_000
PEER_RATE = "3M"  # bytes/s each of A and B uploads to peers: a 12 MiB layer takes seconds
CHUNK = "64K"  # small chunks, so the chunk maps have cells to show
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "ui"
VIEWPORT: ViewportSize = {"width": 1200, "height": 800}  # CSS pixels: the page as a screenshot shows it
SCALE = 2  # device pixels per CSS pixel
SHOT_SIZE = (2400, 1600)  # what Docker recommends for an extension's screenshots


# --------------------------------------------------------------------------------------------
# Nodes and images
# --------------------------------------------------------------------------------------------


@dataclass
class UiNode:
    name: str
    home: Path
    registry: str  # HOST:PORT of the registry listener, where /ui/ is
    peer_url: str
    daemon: Daemon

    @property
    def ui(self) -> str:
        return f"http://{self.registry}/ui/"

    def api(self, path: str) -> Any:
        with httpx.Client(trust_env=False, timeout=10) as client:
            response = client.get(f"http://{self.registry}/ui/api/{path}")
            response.raise_for_status()
            return response.json()


@dataclass
class Image:
    ref: str
    sample: SampleImage
    root: str
    blobs: dict[str, int]  # digest -> size, of the config and layers a pull fetches

    @property
    def size(self) -> int:
        return sum(self.blobs.values())

    @property
    def biggest(self) -> str:
        return max(self.blobs, key=lambda d: self.blobs[d])


def image_blobs(sample: SampleImage) -> dict[str, int]:
    blobs = sample.path / "blobs" / "sha256"
    manifest = json.loads((blobs / sample.top_digest.split(":", 1)[1]).read_bytes())
    return {d["digest"]: d["size"] for d in [manifest["config"], *manifest["layers"]]}


@dataclass
class World:
    tmp: Path
    origin: str
    app: Image
    warm: Image
    nodes: dict[str, UiNode] = field(default_factory=dict)
    daemons: list[Daemon] = field(default_factory=list)
    pulled: set[str] = field(default_factory=set)
    pull_count: int = 0

    def start(self, name: str, *extra: str) -> UiNode:
        home = self.tmp / name
        ports: dict[str, int] = {}

        def launch(port: int) -> Daemon:
            ports["peer"] = free_port()
            argv = [
                sys.executable,
                "-m",
                "p2pimg",
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--peer-listen",
                f"127.0.0.1:{ports['peer']}",
                "--origin",
                self.origin,
                "--no-mdns",
                *extra,
            ]
            env = client_env(P2PIMG_HOME=str(home), PYTHONUNBUFFERED="1")
            return Daemon(name, argv, logdir=self.tmp / "logs", env=env)

        daemon, port = start_or_fail(
            f"{name} did not start", name, launch, lambda p: http_status(f"http://127.0.0.1:{p}/v2/") == 200
        )
        self.daemons.append(daemon)
        node = UiNode(name, home, f"127.0.0.1:{port}", f"http://127.0.0.1:{ports['peer']}", daemon)
        self.nodes[name] = node
        return node

    def stop_all(self) -> None:
        problems = []
        for daemon in self.daemons:
            status, graceful = daemon.stop()
            if status != 0 or not graceful:
                problems.append(f"{daemon.name}: exit {status}\n{daemon.output()}")
        assert not problems, "\n".join(problems)

    def pull_argv(self, node: UiNode, image: Image) -> list[str]:
        pulls = self.tmp / "pulls"
        pulls.mkdir(exist_ok=True)
        self.pull_count += 1
        dest = pulls / f"{node.name}-{self.pull_count}-{re.sub(r'[^a-z0-9]+', '-', image.ref)}"
        return [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--src-tls-verify=false",
            f"docker://{node.registry}/{image.ref}",
            f"oci:{dest}:x",
        ]

    def pull(self, skopeo: Skopeo, node: UiNode, image: Image) -> None:
        """Pull `image` through `node` once (later calls find it pulled)."""
        key = f"{node.name} {image.ref}"
        if key not in self.pulled:
            skopeo(*self.pull_argv(node, image)[2:])
            self.pulled.add(key)


def publish(tmp: Path, origin: str, name: str, layers: list[LayerSpec], seed: int) -> Image:
    sample = write_oci_layout(tmp / f"layout-{seed}", layers, tag="1", seed=seed)
    ref = f"{name}:1"
    result = run_command(
        [sys.executable, "-m", "p2pimg", "publish", "--chunk-size", CHUNK, f"oci:{sample.path}:1", ref],
        env=client_env(P2PIMG_HOME=str(tmp / "publisher"), P2PIMG_ORIGIN=origin),
    )
    return Image(ref, sample, result.stdout.split()[-1], image_blobs(sample))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("ui")
    origin = f"file://{tmp / 'origin'}"
    big = [LayerSpec(12 << 20, "none"), LayerSpec(1 << 20, "gzip", files=4)]
    app = publish(tmp, origin, "demo/app", big, 31)
    warm = publish(tmp, origin, "demo/warm", [LayerSpec(3 << 20, "none"), LayerSpec(256 << 10, "none")], 32)
    w = World(tmp, origin, app, warm)
    try:
        a = w.start("a", "--peer-rate", PEER_RATE)
        b = w.start("b", "--peer-rate", PEER_RATE, "--peer", a.peer_url)
        w.start("c", "--peer", a.peer_url, "--peer", b.peer_url)
        yield w
    finally:
        w.stop_all()


# --------------------------------------------------------------------------------------------
# The browser
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=SCALE, color_scheme="light")
    context.set_default_timeout(WAIT_MS)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield tab
    finally:
        context.close()
    assert not errors, f"the page threw: {errors}"


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


def keep_screenshot(shots: Path, name: str) -> None:
    """The docs' copy is replaced only on request: a test run must not dirty the work tree."""
    if os.environ.get("P2PIMG_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shots / name, SCREENSHOTS / name)


def screenshot(page: Page, shots: Path, name: str, top: str) -> None:
    """A part of the page as large as the viewport, from just above the element `top` (a CSS
    selector) or as far down as the page goes, saved as `name`: 2400x1600 pixels."""
    view = page.viewport_size
    assert view is not None
    clip = page.evaluate(
        """([selector, width, height]) => {
            const box = document.querySelector(selector).getBoundingClientRect();
            // In whole device pixels at a scale of 2 or 2.5: an even number of CSS pixels.
            const y = 2 * Math.round(Math.max(0, box.top + window.scrollY - 12) / 2);
            // Near the end of the page, the page's background goes on below it rather than the
            // picture starting halfway through the card above.
            const end = document.documentElement.scrollHeight;
            if (y + height > end) document.body.style.paddingBottom = `${y + height - end}px`;
            return {x: 0, y, width, height};
        }""",
        [top, view["width"], view["height"]],
    )
    page.screenshot(path=shots / name, clip=clip, full_page=True)
    page.evaluate("() => { document.body.style.paddingBottom = ''; }")
    header = (shots / name).read_bytes()[:24]  # PNG: the IHDR chunk's width and height
    size = (int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big"))
    assert size == SHOT_SIZE, size
    keep_screenshot(shots, name)


@contextlib.contextmanager
def narrow_page(browser: Browser) -> Iterator[Page]:
    """A window as wide as a Docker Desktop tab, where the cards are stacked: a 960x640 viewport
    at a device scale factor of 2.5, whose screenshots are also 2400x1600."""
    context = browser.new_context(
        viewport={"width": 960, "height": 640}, device_scale_factor=2.5, color_scheme="light"
    )
    context.set_default_timeout(WAIT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


def open_dashboard(page: Page, node: UiNode) -> None:
    page.goto(node.ui)
    expect(page.get_by_test_id("live")).to_contain_text("live")
    expect(page.get_by_test_id("error")).to_be_hidden()


def image_row(page: Page, image: Image) -> Locator:
    return page.locator(f'[data-testid="image-row"][data-ref="{image.ref}"]')


def segments_of(row: Locator) -> dict[str, int]:
    """The bytes by source a row's stacked bar shows."""
    segments = row.get_by_test_id("bytes-by-source").first.get_by_test_id("source-segment")
    expect(segments.first).to_be_attached()
    return {
        str(seg.get_attribute("data-source")): int(str(seg.get_attribute("data-bytes")))
        for seg in segments.all()
    }


@dataclass
class ShownPull:
    id: str
    size: int  # of all its blobs: the image's, and those no client named that ran with them
    blobs: dict[str, dict[str, int]]  # the image's blobs: digest -> source -> bytes


def expect_pull(page: Page, image: Image, sources: set[str]) -> ShownPull:
    """The latest pull of `image` is listed as done with the bytes of all its blobs, each from
    one of `sources`; opened, it lists every blob of the image with bytes by source adding up to
    its size (and maybe a blob no client asked for by name: the image's p2pimg root, fetched
    when the node first reads the image)."""
    name = image.ref.rsplit(":", 1)[0]
    pull = page.locator(f'[data-testid="pull-row"][data-repository="{name}"]').first
    expect(pull).to_have_attribute("data-ok", "1")
    size = int(str(pull.get_attribute("data-size")))
    assert size >= image.size, (size, image.size)
    by_source = segments_of(pull)
    assert sum(by_source.values()) == size, (by_source, size)
    assert set(by_source) <= sources, (by_source, sources)
    pull_id = str(pull.get_attribute("data-id"))
    body = page.locator(f'tbody.pull[data-id="{pull_id}"]')
    toggle = body.get_by_test_id("pull-expand")
    if toggle.get_attribute("aria-expanded") != "true":
        toggle.click()
    shown: dict[str, dict[str, int]] = {}
    for digest, blob_size in image.blobs.items():
        row = body.locator(f'[data-testid="pull-blob"][data-digest="{digest}"]')
        expect(row).to_be_visible()
        expect(row).to_have_attribute("data-ok", "1")
        shown[digest] = segments_of(row)
        assert sum(shown[digest].values()) == blob_size, (digest, shown[digest], blob_size)
        assert set(shown[digest]) <= sources, (digest, shown[digest], sources)
    return ShownPull(pull_id, size, shown)


def expect_chart(page: Page, kind: str, item: str, nbytes: int) -> None:
    """The throughput chart shows the pull or blob `item`, all its `nbytes` bytes."""
    chart = page.get_by_test_id("throughput-chart")
    expect(chart).to_have_attribute("data-kind", kind)
    expect(chart).to_have_attribute("data-id", item)
    expect(chart).to_have_attribute("data-bytes", str(nbytes))


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_page_shows_the_node_and_its_published_images(world: World, page: Page) -> None:
    a = world.nodes["a"]
    node = a.api("node")
    open_dashboard(page, a)
    expect(page.get_by_test_id("node-id")).to_have_attribute("title", node["node_id"])
    expect(page.get_by_test_id("registry")).to_have_text(a.registry)
    expect(page.get_by_test_id("origin")).to_have_text(world.origin)
    expect(page.get_by_test_id("peer-listen")).to_have_text(a.peer_url.removeprefix("http://"))
    for image in (world.app, world.warm):
        row = image_row(page, image)
        expect(row).to_have_count(1)
        expect(row).to_have_attribute("data-root", image.root)
        expect(row.get_by_test_id("image-root")).to_have_attribute("title", image.root)
        expect(row.get_by_test_id("image-upstream")).to_be_hidden()
        expect(row.get_by_test_id("pin-toggle")).to_be_visible()
    # No --cache-max: the meter is what the cache uses of what it could grow to, never full.
    meter = page.get_by_test_id("cache-bar")
    expect(page.get_by_test_id("cache-limit")).to_contain_text("no limit (--cache-max)")
    expect(page.get_by_test_id("cache-disk")).to_contain_text("free on disk")
    used, whole = (int(str(meter.get_attribute(n))) for n in ("data-used", "data-whole"))
    assert whole > used and whole >= a.api("cache")["disk_free"] // 2, (used, whole)
    assert meter.get_attribute("aria-valuenow") != "100"
    # Static files come from the package, with the CSP the page is served under.
    response = page.request.get(a.ui)
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert "{{TOKEN}}" not in response.text()


def test_a_pull_from_the_origin_is_listed_with_its_bytes(world: World, page: Page, skopeo: Skopeo) -> None:
    a = world.nodes["a"]
    open_dashboard(page, a)
    world.pull(skopeo, a, world.app)
    pull = expect_pull(page, world.app, {f"origin {world.origin}"})
    assert all(len(by_source) == 1 for by_source in pull.blobs.values()), pull
    # The chart shows the latest pull until something else is clicked.
    expect_chart(page, "pull", pull.id, pull.size)
    row = image_row(page, world.app)
    expect(row.get_by_test_id("image-cached")).to_have_attribute("data-cached", str(world.app.size))


def test_a_pull_through_a_peer_shows_live_progress(
    world: World, page: Page, skopeo: Skopeo, containers_config: ContainersConfig
) -> None:
    a, b = world.nodes["a"], world.nodes["b"]
    world.pull(skopeo, a, world.app)  # A holds the image: B's chunks come from it
    open_dashboard(page, b)
    proc = subprocess.Popen(
        world.pull_argv(b, world.app),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=containers_config.env(),
    )
    try:
        live = page.locator(f'[data-testid="transfer-active"][data-digest="{world.app.biggest}"]')
        expect(live).to_have_count(1)
        expect(live.get_by_test_id("chunk-map")).to_be_visible()
        expect(page.get_by_test_id("throughput-chart")).to_be_visible()
        expect(page.get_by_test_id("throughput-chart")).to_have_attribute("data-kind", "pull")
        output = proc.communicate(timeout=COMMAND_TIMEOUT)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    world.pulled.add(f"b {world.app.ref}")
    pull = expect_pull(page, world.app, {f"peer {a.peer_url}", f"origin {world.origin}"})
    assert pull.blobs[world.app.biggest].get(f"peer {a.peer_url}", 0) > 0, pull
    expect(page.locator('[data-testid="transfer-active"]')).to_have_count(0)
    expect_chart(page, "pull", pull.id, pull.size)
    # One blob of the pull, clicked, has the chart to itself until the latest pull is asked for.
    blob = page.locator(f'[data-testid="pull-blob"][data-digest="{world.app.biggest}"]')
    blob.click()
    expect(blob).to_have_attribute("aria-current", "true")
    expect_chart(page, "blob", str(blob.get_attribute("data-id")), world.app.blobs[world.app.biggest])
    page.get_by_test_id("chart-latest").click()
    expect_chart(page, "pull", pull.id, pull.size)
    expect(page.get_by_test_id("chart-latest")).to_be_hidden()


def test_the_peers_of_a_swarm_are_listed(world: World, page: Page, skopeo: Skopeo) -> None:
    a, b = world.nodes["a"], world.nodes["b"]
    world.pull(skopeo, a, world.app)
    world.pull(skopeo, b, world.app)  # from A
    open_dashboard(page, b)
    row = page.locator(f'[data-testid="peer-row"][data-url="{a.peer_url}"]')
    expect(row).to_have_count(1)
    expect(row).to_have_attribute("data-state", "ok")
    expect(row.get_by_test_id("peer-found")).to_have_text("static")
    expect(row.get_by_test_id("peer-node")).to_have_attribute("title", a.api("node")["node_id"])
    # Idle now (the rate is over the last 2 s), with what it sent during B's pull.
    expect(row.get_by_test_id("peer-rate")).to_have_text("—")
    (peer,) = b.api("peers")["peers"]
    assert peer["sent_us"] > 0
    expect(page.locator(f'[data-testid="swarm-node"][data-url="{a.peer_url}"]')).to_have_count(1)
    expect(page.locator('[data-testid="swarm-node"][data-me="1"]')).to_have_count(1)


def test_a_peer_that_never_answers_is_a_warning(world: World, page: Page) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    node = world.start("lonely", "--peer", dead)
    open_dashboard(page, node)
    row = page.locator(f'[data-testid="peer-row"][data-url="{dead}"]')
    expect(row).to_have_attribute("data-state", "unreachable")
    expect(row.get_by_test_id("peer-state")).to_have_text("unreachable")
    expect(row.get_by_test_id("peer-state")).to_have_class("state warn")
    expect(row.get_by_test_id("peer-rate")).to_have_text("—")
    expect(row.get_by_test_id("peer-sent-us")).to_have_text("0 B")
    expect(page.locator(f'[data-testid="swarm-node"][data-url="{dead}"]')).to_have_attribute(
        "data-state", "unreachable"
    )


def test_three_nodes_share_a_pull(
    world: World,
    page: Page,
    skopeo: Skopeo,
    containers_config: ContainersConfig,
    shots: Path,
    browser: Browser,
) -> None:
    a, b, c = world.nodes["a"], world.nodes["b"], world.nodes["c"]
    world.pull(skopeo, a, world.app)
    world.pull(skopeo, b, world.app)
    open_dashboard(page, c)
    expect(page.locator('[data-testid="peer-row"]')).to_have_count(2)
    proc = subprocess.Popen(
        world.pull_argv(c, world.app),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=containers_config.env(),
    )
    try:
        # A third of the big layer in, or all of it: the chunk map is worth a picture either way.
        page.wait_for_function(
            """(digest) => {
                const live = document.querySelector(
                    `[data-testid="transfer-active"][data-digest="${digest}"]`);
                if (live) return 3 * Number(live.dataset.have) >= Number(live.dataset.chunks);
                return window.p2pimg.state.transfers.finished.some((t) => t.digest === digest);
            }""",
            arg=world.app.biggest,
        )
        screenshot(page, shots, "transfers.png", "#transfers")
        output = proc.communicate(timeout=COMMAND_TIMEOUT)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    world.pulled.add(f"c {world.app.ref}")
    peers = {f"peer {a.peer_url}", f"peer {b.peer_url}"}
    pull = expect_pull(page, world.app, peers | {f"origin {world.origin}"})
    assert sum(pull.blobs[world.app.biggest].get(p, 0) for p in peers) > 0, pull
    # The dashboard as it opens: the node, its images and cache, the chart of the pull just done.
    page.locator(f'tbody.pull[data-id="{pull.id}"]').get_by_test_id("pull-expand").click()
    cached = image_row(page, world.app).get_by_test_id("image-cached")
    expect(cached).to_have_attribute("data-cached", str(world.app.size), timeout=WAIT_MS)
    expect(page.get_by_test_id("cache-partial")).to_have_text("0 B", timeout=WAIT_MS)
    page.mouse.move(0, 0)  # no button under the pointer drawn as hovered
    page.evaluate("() => { document.activeElement.blur(); window.scrollTo(0, 0); }")
    screenshot(page, shots, "dashboard.png", "body")
    # Both directions of the swarm: C's page shows bytes its peers sent it...
    for peer in (a, b):
        edge = page.locator(f'[data-testid="swarm-node"][data-url="{peer.peer_url}"]')
        expect(edge).to_have_count(1)
    expect(page.locator("#swarm line.edge-in").first).to_be_attached()
    expect_labels_apart(page)
    # The peers above the swarm, as in a Docker Desktop tab.
    with narrow_page(browser) as narrow:
        open_dashboard(narrow, c)
        expect(narrow.locator("#swarm line.edge-in")).to_have_count(2)
        screenshot(narrow, shots, "peers.png", "#peers")
    # ...and A's shows what it sent to the nodes that fetch from it.
    open_dashboard(page, a)
    expect(page.locator("#swarm line.edge-out").first).to_be_attached()


def expect_labels_apart(page: Page) -> None:
    """No two labels of the swarm graph overlap, and none leaves the picture, at this width and
    at the width of a narrow window (where the card is as wide as the page)."""
    for width in (VIEWPORT["width"], 820, 420):
        page.set_viewport_size({"width": width, "height": VIEWPORT["height"]})
        page.wait_for_function(
            """(width) => {
                const graph = document.querySelector('[data-testid="swarm-graph"]');
                const box = document.getElementById('swarm-graph-box');
                return graph && Math.abs(graph.viewBox.baseVal.width - Math.max(240, box.clientWidth)) < 2;
            }""",
            arg=width,
        )
        clashes = page.evaluate(
            """() => {
                const graph = document.querySelector('[data-testid="swarm-graph"]');
                const frame = graph.getBoundingClientRect();
                const rects = [...graph.querySelectorAll('text')]
                    .map((t) => [t.textContent, t.getBoundingClientRect()]);
                const out = [];
                for (const [text, r] of rects) {
                    if (r.left < frame.left - 1 || r.right > frame.right + 1 || r.top < frame.top - 1
                        || r.bottom > frame.bottom + 1) out.push(`${text} leaves the picture`);
                }
                rects.forEach(([a, r], i) => rects.slice(i + 1).forEach(([b, q]) => {
                    if (r.left < q.right && q.left < r.right && r.top < q.bottom && q.top < r.bottom)
                        out.push(`${a} overlaps ${b}`);
                }));
                return out;
            }"""
        )
        assert not clashes, (width, clashes)
    page.set_viewport_size(VIEWPORT)


def test_a_warm_started_from_the_page_completes(world: World, page: Page, browser: Browser) -> None:
    c = world.nodes["c"]
    open_dashboard(page, c)
    page.get_by_test_id("warm-ref").fill(world.warm.ref)
    page.get_by_test_id("warm-lan").check()
    page.get_by_test_id("warm-submit").click()
    progress = page.get_by_test_id("warm-progress")
    expect(progress).to_have_attribute("data-state", "done", timeout=120_000)
    expect(progress).to_have_attribute("aria-valuenow", "100")
    expect(page.get_by_test_id("warm-state")).to_contain_text("done")
    expect(page.get_by_test_id("warm-state")).to_contain_text("peers: 2 done")
    expect(page.get_by_test_id("error")).to_be_hidden()
    row = image_row(page, world.warm)
    expect(row.get_by_test_id("image-cached")).to_have_attribute("data-cached", str(world.warm.size))
    # Across the LAN: each peer's own dashboard shows the image cached too.
    other = browser.new_page()
    try:
        for name in ("a", "b"):
            other.goto(world.nodes[name].ui)
            cached = image_row(other, world.warm).get_by_test_id("image-cached")
            expect(cached).to_have_attribute("data-cached", str(world.warm.size), timeout=WAIT_MS)
    finally:
        other.close()


def test_images_pulled_through_an_upstream(
    world: World, page: Page, skopeo: Skopeo, registry: Registry
) -> None:
    """A node with nothing published and a docker-registry as its --upstream: the page says so
    while it has no image, then lists what was pulled through it, with the upstream and the
    manifest's digest, and no actions (they take the origin's NAME:TAG or ipfs/<CID>)."""
    sample = write_oci_layout(world.tmp / "mirrored", [LayerSpec(2 << 20, "none")], tag="1", seed=33)
    name = "mirrored/tool"
    skopeo(
        "copy",
        "--dest-tls-verify=false",
        "--preserve-digests",
        f"oci:{sample.path}:1",
        f"docker://{registry.host}/{name}:1",
    )
    empty = world.tmp / "empty-origin"
    empty.mkdir()
    node = world.start("mirror", "--origin", f"file://{empty}", "--upstream", registry.url)
    open_dashboard(page, node)
    expect(page.locator("#images-empty")).to_be_visible()
    expect(page.locator("#images-empty")).to_contain_text("from its upstream")
    image = Image(f"{name}:1", sample, "", image_blobs(sample))
    world.pull(skopeo, node, image)
    row = image_row(page, image)
    # The node lists its images again every few seconds (it asks the origin each time).
    expect(row).to_have_attribute("data-kind", "mirror", timeout=WAIT_MS)
    expect(row).to_have_attribute("data-digest", sample.top_digest)
    expect(row.get_by_test_id("image-upstream")).to_have_text(registry.host)
    expect(row.get_by_test_id("image-root")).to_have_attribute("title", f"manifest {sample.top_digest}")
    expect(row.get_by_test_id("image-root")).to_contain_text("sha256:")
    expect(row.get_by_test_id("image-cached")).to_have_attribute("data-cached", str(image.size))
    expect(row.get_by_test_id("pin-toggle")).to_be_hidden()
    expect(row.get_by_test_id("warm-row")).to_be_hidden()
    expect(page.locator("#images-empty")).to_be_hidden()


def test_pin_and_unpin_from_the_page(world: World, page: Page) -> None:
    a = world.nodes["a"]
    open_dashboard(page, a)
    row = image_row(page, world.app)
    button = row.get_by_test_id("pin-toggle")
    expect(button).to_have_text("Pin")
    button.click()
    expect(row.get_by_test_id("image-pinned")).to_have_text("pinned")
    expect(button).to_have_text("Unpin")
    expect(page.get_by_test_id("status")).to_contain_text(f"Pinned {world.app.ref}")
    assert [i["pinned"] for i in a.api("images")["images"] if i["name"] == "demo/app"] == [True]
    button.click()
    expect(row.get_by_test_id("image-pinned")).to_have_text("–")
    expect(button).to_have_text("Pin")
    assert [i["pinned"] for i in a.api("images")["images"] if i["name"] == "demo/app"] == [False]


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def static_site(directory: Path) -> Iterator[int]:
    """Serve `directory` on a free loopback port; yields the port."""
    handler = functools.partial(_QuietFiles, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def elsewhere(tmp_path: Path) -> Iterator[str]:
    """Another site: a blank page on another origin, whose script tries the dashboard's API."""
    (tmp_path / "index.html").write_text("<!doctype html><title>elsewhere</title><p>another site</p>")
    with static_site(tmp_path) as port:
        # `localhost`, not 127.0.0.1, and another port: another origin for the browser.
        yield f"http://localhost:{port}/"


def test_actions_without_the_token_or_from_another_origin_are_refused(
    world: World, page: Page, elsewhere: str
) -> None:
    a = world.nodes["a"]
    pin = f"http://{a.registry}/ui/api/pin"
    body = json.dumps({"ref": world.app.ref})

    # From the dashboard's own origin, without the token or with a wrong one: 403.
    open_dashboard(page, a)
    for headers in (
        {"Content-Type": "application/json"},
        {"Content-Type": "application/json", "X-P2pimg-Token": "x"},
    ):
        answer = page.evaluate(
            """async ([url, headers, body]) => {
                const r = await fetch(url, {method: 'POST', headers, body});
                return {status: r.status, doc: await r.json()};
            }""",
            [pin, headers, body],
        )
        assert answer["status"] == 403, answer
        assert answer["doc"]["errors"][0]["code"] == "DENIED", answer

    # The page itself, holding a wrong token, shows the refusal in its error line.
    def wrong_token(route: Any) -> None:
        response = route.fetch()
        html = re.sub(r'(name="p2pimg-token" content=")[^"]*', r"\1not-the-token", response.text())
        route.fulfill(response=response, body=html)

    page.route(a.ui, wrong_token)
    open_dashboard(page, a)
    image_row(page, world.app).get_by_test_id("pin-toggle").click()
    error = page.get_by_test_id("error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("DENIED")
    expect(error).to_contain_text("403")
    page.unroute(a.ui)

    # Another site: a request it could send without asking (no-cors, text/plain) reaches the
    # node and is refused for its Origin; one with the token header needs a CORS preflight,
    # which the dashboard never answers, so the browser does not even send it.
    page.goto(elsewhere)
    with page.expect_response(pin) as refused:
        page.evaluate(
            """async ([url, body]) => {
                await fetch(url, {method: 'POST', mode: 'no-cors', body,
                                  headers: {'Content-Type': 'text/plain'}});
            }""",
            [pin, body],
        )
    assert refused.value.status == 403
    outcome = page.evaluate(
        """async ([url, body]) => {
            try {
                await fetch(url, {method: 'POST', body,
                    headers: {'Content-Type': 'application/json', 'X-P2pimg-Token': 'guessed'}});
                return 'answered';
            } catch (err) {
                return 'blocked';
            }
        }""",
        [pin, body],
    )
    assert outcome == "blocked"
    assert [i["pinned"] for i in a.api("images")["images"] if i["name"] == "demo/app"] == [False]


def test_a_read_only_dashboard_offers_no_actions(world: World, page: Page) -> None:
    node = world.start("readonly", "--ui-read-only")
    open_dashboard(page, node)
    expect(page.get_by_test_id("read-only-note")).to_be_visible()
    expect(page.get_by_test_id("mode")).to_be_visible()
    for control in ("warm-ref", "warm-submit", "warm-lan", "gc-button"):
        expect(page.get_by_test_id(control)).to_be_disabled()
    expect(image_row(page, world.app).get_by_test_id("pin-toggle")).to_be_disabled()
    # Even with the page's own token, the node refuses.
    answer = page.evaluate(
        """async () => {
            const token = document.querySelector('meta[name="p2pimg-token"]').content;
            const r = await fetch('/ui/api/gc', {method: 'POST', body: '{}',
                headers: {'Content-Type': 'application/json', 'X-P2pimg-Token': token}});
            return r.status;
        }"""
    )
    assert answer == 403


# Docker Desktop's extension client as its API reference describes it: `request(config)` resolves
# with the parsed body of a 2xx answer and rejects with a ServiceError {name, message,
# statusCode} otherwise. Here it hands each request to the test, which sends it over the backend's
# unix socket as Docker Desktop does.
DD_CLIENT = """
(() => {
  const request = async (config) => {
    const body = config.data === undefined ? null : JSON.stringify(config.data);
    const answer = await window.__p2pimgBackend(config.method, config.url, config.headers || {}, body);
    if (answer.status < 200 || answer.status > 299) {
      const err = new Error(answer.body);
      err.name = 'ServiceError';
      err.statusCode = answer.status;
      throw err;
    }
    try { return JSON.parse(answer.body); } catch (e) { return answer.body; }
  };
  const service = {
    request,
    get: (url) => request({ url, method: 'GET', headers: {} }),
    post: (url, data) => request({ url, method: 'POST', headers: {}, data }),
  };
  window.ddClient = { extension: { vm: { service } } };
})();
"""


def test_the_extension_tab_reaches_its_backend_over_the_socket(world: World, page: Page) -> None:
    sockets = Path(tempfile.mkdtemp(prefix="p2pimg-ui-", dir="/tmp"))  # a unix socket path is short
    try:
        socket = sockets / "p2pimg.sock"
        world.start("desktop", "--ui-socket", str(socket))
        root = image_root(world.tmp / "extension-image")
        tab = json.loads((root / "metadata.json").read_text())["ui"]["dashboard-tab"]

        def backend(method: str, url: str, headers: dict[str, str], body: str | None) -> dict[str, Any]:
            unix = httpx.HTTPTransport(uds=str(socket))
            with httpx.Client(
                transport=unix, base_url="http://p2pimg", trust_env=False, timeout=30
            ) as client:
                answer = client.request(method, url, headers=headers, content=body)
                return {"status": answer.status_code, "body": answer.text}

        page.expose_function("__p2pimgBackend", backend)
        page.add_init_script(DD_CLIENT)
        # Docker Desktop loads the tab's files from the image, not from `p2pimg serve`: the
        # token placeholder stays as it is, and the socket asks for none.
        with static_site(root / tab["root"].lstrip("/")) as port:
            page.goto(f"http://127.0.0.1:{port}/{tab['src']}")
            expect(page.get_by_test_id("live")).to_contain_text("live")
            node = world.nodes["desktop"]
            expect(page.get_by_test_id("node-id")).to_have_attribute("title", node.api("node")["node_id"])
            row = image_row(page, world.app)
            button = row.get_by_test_id("pin-toggle")
            expect(button).to_have_text("Pin")
            button.click()
            expect(row.get_by_test_id("image-pinned")).to_have_text("pinned")
            button.click()
            expect(row.get_by_test_id("image-pinned")).to_have_text("–")
            # A refusal comes back as a ServiceError and shows in the error line.
            page.get_by_test_id("warm-ref").fill("no such reference!")
            page.get_by_test_id("warm-submit").click()
            error = page.get_by_test_id("error")
            expect(error).to_be_visible()
            expect(error).to_contain_text("HTTP 400")
            expect(page.get_by_test_id("warm-progress")).to_have_attribute("data-state", "failed")
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
