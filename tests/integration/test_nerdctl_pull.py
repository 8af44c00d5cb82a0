"""Real clients pull images `nerdctl push ipfs://` put into IPFS, by the CID nerdctl printed:
`127.0.0.1:<port>/ipfs/<CID>:latest` from a `p2pimg serve --ipfs-gateway URL` process.

The gateway is the project's test gateway (`tests/_ipfs_gateway.py`, written from the trustless
gateway spec) serving the committed nerdctl fixtures (tests/fixtures/nerdctl) on loopback. skopeo,
podman (vfs storage) and containerd's ctr must end up with exactly the manifests and blobs nerdctl
wrote, digest for digest. Then a second node, with the first as its LAN peer and no gateway at
all, serves the same image again: every byte from the peer, nothing asked of the gateway.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from _ipfs_gateway import IpfsGateway
from _nerdctl_images import NAMES, Image, fixture, pushed

if TYPE_CHECKING:
    from conftest import Containerd, P2pimgServe, P2pimgServer, Podman, Skopeo

from conftest import free_port, metric

PLATFORM = "linux/amd64"
# The committed fixtures, and one pushed here with 3000-byte leaves under nodes of 5 links: no
# leaf can be a chunk, so its blobs are walked block by block and checked by their digests.
IMAGES = (*NAMES, "odd-chunks")
INDEXES = frozenset({"application/vnd.oci.image.index.v1+json"})


@dataclass
class World:
    gateway: IpfsGateway
    server: P2pimgServer
    images: dict[str, Image]

    def ref(self, name: str) -> str:
        return f"{self.server.host}/{self.images[name].name}:latest"


@pytest.fixture(scope="module")
def world(p2pimg_serve_module: P2pimgServe, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    images = {name: fixture(name) for name in NAMES}
    images["odd-chunks"] = pushed(tmp_path_factory.mktemp("odd"), chunk_size=3000, max_links=5)
    blocks = {cid: block for image in images.values() for cid, block in image.blocks.items()}
    gateway = IpfsGateway(blocks).start()
    try:
        home = tmp_path_factory.mktemp("nerdctl-home")
        server = p2pimg_serve_module(home, extra_args=["--ipfs-gateway", gateway.url])
        yield World(gateway, server, images)
    finally:
        gateway.stop()


def platform_manifest(image: Image) -> dict[str, Any]:
    """The manifest a single-platform client takes (linux/amd64)."""
    for desc, data in image.manifests():
        if desc["mediaType"] in INDEXES:
            continue
        platform = desc.get("platform")
        if platform is None or (platform["os"], platform["architecture"]) == tuple(PLATFORM.split("/")):
            doc: dict[str, Any] = json.loads(data)
            return doc
    raise AssertionError(f"{image.cid}: no {PLATFORM} manifest")


def single_platform_digests(image: Image) -> set[str]:
    manifest = platform_manifest(image)
    digests = {image.top["digest"], manifest["config"]["digest"]}
    digests |= {layer["digest"] for layer in manifest["layers"]}
    for desc, data in image.manifests():
        if desc["mediaType"] in INDEXES:
            digests |= {
                m["digest"]
                for m in json.loads(data)["manifests"]
                if (m["platform"]["os"], m["platform"]["architecture"]) == tuple(PLATFORM.split("/"))
            }
    return digests


def skopeo_copy(skopeo: Skopeo, ref: str, image: Image, dest: Path) -> set[str]:
    """`skopeo copy` into a `dir:` (all platforms of an index); the digests of what it wrote,
    each file checked against its digest. (Not into an OCI layout: containers/image copies no
    layer that has URLs into one, since that destination takes "foreign" layers by reference,
    and nerdctl gives every layer an ipfs:// URL.)"""
    index = image.top["mediaType"] in INDEXES
    skopeo(
        "copy", "--src-tls-verify=false", "--preserve-digests", *(["--all"] if index else []),
        f"docker://{ref}", f"dir:{dest}",
    )  # fmt: skip
    digests = {"sha256:" + hashlib.sha256((dest / "manifest.json").read_bytes()).hexdigest()}
    for path in dest.iterdir():
        if path.name in ("manifest.json", "version"):
            continue
        digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        assert digest == "sha256:" + path.name.removesuffix(".manifest.json"), f"{path} is corrupt"
        digests.add(digest)
    return digests


@pytest.mark.parametrize("name", IMAGES)
def test_skopeo(name: str, world: World, skopeo: Skopeo, tmp_path: Path) -> None:
    image = world.images[name]
    top = image.top
    out = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{world.ref(name)}").stdout
    raw = out.encode("utf-8", "surrogateescape")  # run_command decoded it losslessly
    assert raw == image.file(top), "the top manifest is not byte for byte what nerdctl wrote"
    digests = skopeo_copy(skopeo, world.ref(name), image, tmp_path / "dir")
    assert (tmp_path / "dir" / "manifest.json").read_bytes() == image.file(top)
    assert digests == image.digests()


@pytest.mark.parametrize("name", IMAGES)
def test_podman(name: str, world: World, podman: Podman, tmp_path: Path) -> None:
    image = world.images[name]
    podman.pull(world.ref(name), root=tmp_path, platform=PLATFORM)
    info = podman.inspect(world.ref(name), root=tmp_path)
    assert info["Digest"] == image.top["digest"]
    assert info["Id"] == platform_manifest(image)["config"]["digest"].removeprefix("sha256:")
    assert info["RootFS"]["Layers"], "podman unpacked no layer"


@pytest.mark.parametrize("name", IMAGES)
def test_ctr(name: str, world: World, containerd: Containerd) -> None:
    image = world.images[name]
    ref = world.ref(name)
    every = ["--all-platforms"] if image.top["mediaType"] in INDEXES else []
    namespace = f"nerdctl-fetch-{name}"
    containerd.ctr("content", "fetch", "--plain-http", *every, ref, namespace=namespace)
    assert containerd.content_digests(namespace) == image.digests()
    namespace = f"nerdctl-pull-{name}"
    containerd.ctr("images", "pull", *containerd.pull_flags, "--platform", PLATFORM, ref, namespace=namespace)
    assert containerd.image_targets(namespace)[ref] == (image.top["mediaType"], image.top["digest"])
    assert containerd.content_digests(namespace) == single_platform_digests(image)


@pytest.mark.parametrize("name", ["single", "small-chunks"])
def test_a_second_node_pulls_it_from_the_first_as_its_lan_peer(
    name: str, p2pimg_serve: P2pimgServe, skopeo: Skopeo, tmp_path: Path
) -> None:
    image = fixture(name)
    gateway = IpfsGateway(image.blocks).start()
    try:
        peer_port = free_port()
        first = p2pimg_serve(
            tmp_path / "first",
            extra_args=["--ipfs-gateway", gateway.url, "--peer-listen", f"127.0.0.1:{peer_port}"],
        )
        ref = f"{first.host}/{image.name}:latest"
        digests = skopeo_copy(skopeo, ref, image, tmp_path / "from-first")
        assert digests == image.digests()
        asked = len(gateway.requests)
        # The second node knows no gateway: descriptor, manifests, the layers' dag-pb nodes and
        # the blobs can only come from its peer.
        second = p2pimg_serve(tmp_path / "second", extra_args=["--peer", f"http://127.0.0.1:{peer_port}"])
        ref = f"{second.host}/{image.name}:latest"
        digests = skopeo_copy(skopeo, ref, image, tmp_path / "from-second")
        assert digests == image.digests()
        assert len(gateway.requests) == asked, "the second node's pull reached the gateway"
        assert metric(second.host, "p2pimg_source_bytes_total", source="peer") > 0
        assert metric(second.host, "p2pimg_source_bytes_total", source="gateway") == 0
    finally:
        gateway.stop()
