"""What `nerdctl push ipfs://` would put into IPFS for an image, as a CAR v1 file and a JSON sidecar.

    python -m tools.nerdctl_fixture LAYOUT OUT.car [--tag TAG] [--platform OS/ARCH ...]
                                   [--chunk-size N] [--max-links N]
    python -m tools.nerdctl_fixture --make-fixtures DIR     # the committed tests/fixtures/nerdctl

The push is done as nerdctl does it (nerdctl `pkg/ipfs`, stargz-snapshotter `ipfs/converter.go`,
containerd `images/converter/default.go` with docker2oci and a post-convert hook):

- Every blob the image reaches (layers, configs, each manifest, the index) is added as a UnixFS
  file with `ipfs add --cid-version=1` defaults (256 KiB chunks, raw leaves, balanced, 174 links;
  `--chunk-size`/`--max-links` change them, for small fixtures with deep trees). Its descriptor
  gets `urls: ["ipfs://<CID>"]` (replacing any URLs it had).
- Docker media types become OCI ones, in descriptors and in the manifests' and index's own
  `mediaType`. Manifests and the index are decoded into Go's OCI structs and re-marshalled by
  Go's encoding/json: fields in struct order, unknown fields dropped, no spaces, map keys sorted,
  `<`, `>`, `&` escaped. Their digests change; configs and layers are unchanged bytes.
- An index keeps the manifests of the platforms asked for (all by default here; nerdctl's own
  default is the host's platform, `--all-platforms` all of them); entries without a platform stay.
- The image CID is the UnixFS file (one raw block) of the JSON of the converted top descriptor:
  the image's target as containerd pulled it (`mediaType`, `digest`, `size`), now with `urls`.

The CAR's root is the image CID; its blocks are the root, then each blob's DAG in depth-first
order (root node before children), blobs in the order the descriptors are walked, each block
once. The sidecar names the image CID, the top descriptor, the manifests and the platforms.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pimg.content.car import write_car
from p2pimg.content.cid import IPFS_CODECS as IPFS
from p2pimg.content.cid import Cid
from p2pimg.content.unixfs import CHUNK_SIZE, KUBO_MAX_LINKS, decode_pb_node, import_file
from p2pimg.ops.sample import LayerSpec, write_oci_layout

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_REF_NAME = "org.opencontainers.image.ref.name"

# containerd's ConvertDockerMediaTypeToOCI.
DOCKER_TO_OCI = {
    "application/vnd.docker.distribution.manifest.list.v2+json": OCI_INDEX,
    "application/vnd.docker.distribution.manifest.v2+json": OCI_MANIFEST,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": (
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
    ),
    "application/vnd.docker.image.rootfs.diff.tar": "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.docker.image.rootfs.foreign.diff.tar": (
        "application/vnd.oci.image.layer.nondistributable.v1.tar"
    ),
    "application/vnd.docker.container.image.v1+json": "application/vnd.oci.image.config.v1+json",
}
_INDEX_TYPES = {OCI_INDEX, "application/vnd.docker.distribution.manifest.list.v2+json"}
_MANIFEST_TYPES = {OCI_MANIFEST, "application/vnd.docker.distribution.manifest.v2+json"}


def go_json(value: Any) -> bytes:
    """What Go's json.Marshal writes for `value` (dicts already in struct-field order)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e")):
        text = text.replace(char, escaped)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").encode()


def go_platform(p: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"architecture": p.get("architecture", ""), "os": p.get("os", "")}
    for key in ("os.version", "os.features", "variant"):
        if p.get(key):
            out[key] = p[key]
    return out


def go_descriptor(d: dict[str, Any]) -> dict[str, Any]:
    """ocispec.Descriptor as Go marshals it (unknown fields dropped, omitempty honoured)."""
    out: dict[str, Any] = {"mediaType": d.get("mediaType", ""), "digest": d["digest"], "size": d["size"]}
    if d.get("urls"):
        out["urls"] = d["urls"]
    if d.get("annotations"):
        out["annotations"] = dict(sorted(d["annotations"].items()))
    if d.get("data"):
        out["data"] = d["data"]
    if d.get("platform"):
        out["platform"] = go_platform(d["platform"])
    if d.get("artifactType"):
        out["artifactType"] = d["artifactType"]
    return out


def _go_document(doc: dict[str, Any], children: str, converted: list[dict[str, Any]]) -> bytes:
    """ocispec.Manifest / ocispec.Index re-marshalled: schemaVersion, mediaType, artifactType,
    (config, layers | manifests), subject, annotations."""
    out: dict[str, Any] = {"schemaVersion": doc.get("schemaVersion", 0)}
    for key in ("mediaType", "artifactType"):
        if doc.get(key):
            out[key] = doc[key]
    if children == "layers":
        out["config"] = converted[0]
        out["layers"] = converted[1:]
    else:
        out["manifests"] = converted or None  # a nil slice marshals as null
    if doc.get("subject"):
        out["subject"] = go_descriptor(doc["subject"])
    if doc.get("annotations"):
        out["annotations"] = dict(sorted(doc["annotations"].items()))
    return go_json(out)


@dataclass
class Pushed:
    """An image as nerdctl put it into IPFS."""

    image_cid: Cid
    top: dict[str, Any]
    blocks: dict[Cid, bytes] = field(default_factory=dict)  # every block, in CAR order
    manifests: list[str] = field(default_factory=list)  # converted manifest digests, walk order
    platforms: list[str] = field(default_factory=list)
    blob_cids: dict[str, str] = field(default_factory=dict)  # digest -> CID, walk order


def _dfs(root: Cid, dag: dict[Cid, bytes]) -> Iterator[Cid]:
    """A blob's DAG from its root, depth first, a node before its children."""
    stack = [root]
    while stack:
        cid = stack.pop()
        yield cid
        if cid.codec_name == "dag-pb":
            stack.extend(reversed([link.cid for link in decode_pb_node(dag[cid]).links]))


class _Pusher:
    def __init__(self, layout: Path, platforms: Sequence[str] | None, chunk_size: int, max_links: int):
        self.layout = layout
        self.platforms = set(platforms) if platforms else None
        self.chunk_size = chunk_size
        self.max_links = max_links
        self.dags: dict[Cid, dict[Cid, bytes]] = {}  # each added file's root -> its blocks
        self.children: dict[Cid, list[Cid]] = {}  # a manifest's or index's file -> its blobs' files
        self.manifests: list[str] = []
        self.pushed_platforms: list[str] = []
        self.blob_cids: dict[str, str] = {}

    def read(self, digest: str) -> bytes:
        return (self.layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()

    def add(self, data: bytes) -> Cid:
        """`ipfs add --cid-version=1`: the blob as a UnixFS file; its root CID."""
        dag: dict[Cid, bytes] = {}
        root = None
        for cid, block in import_file([data], chunk_size=self.chunk_size, max_links=self.max_links):
            dag[cid] = block
            root = cid
        assert root is not None
        self.dags[root] = dag
        return root

    def wanted(self, platform: dict[str, Any] | None) -> bool:
        if platform is None or self.platforms is None:
            return True
        name = f"{platform.get('os')}/{platform.get('architecture')}"
        variant = platform.get("variant")
        return name in self.platforms or (variant is not None and f"{name}/{variant}" in self.platforms)

    def convert(self, desc: dict[str, Any]) -> dict[str, Any]:
        """containerd's DefaultConverter.Convert with nerdctl's hook: the new descriptor."""
        media = desc.get("mediaType", "")
        new = dict(desc)
        children: list[dict[str, Any]] = []
        if media in _MANIFEST_TYPES:
            content = self._manifest(desc, children)
        elif media in _INDEX_TYPES:
            content = self._index(desc, children)
        else:  # configs, layers and anything else: the same bytes
            content = self.read(desc["digest"])
        new["digest"] = "sha256:" + Cid.of_raw(content).digest.hex()
        new["size"] = len(content)
        cid = self.add(content)  # the post-convert hook: add the (new) blob, record its URL
        self.children[cid] = [Cid.parse(c["urls"][0].removeprefix("ipfs://"), codecs=IPFS) for c in children]
        self.blob_cids[new["digest"]] = str(cid)
        new["urls"] = [f"ipfs://{cid}"]
        new["mediaType"] = DOCKER_TO_OCI.get(media, media)
        return go_descriptor(new)

    def _manifest(self, desc: dict[str, Any], children: list[dict[str, Any]]) -> bytes:
        doc = json.loads(self.read(desc["digest"]))
        doc["mediaType"] = DOCKER_TO_OCI.get(doc.get("mediaType", ""), doc.get("mediaType", ""))
        layers = [self.convert(layer) for layer in doc.get("layers") or []]
        config = self.convert(doc["config"])
        children += [config, *layers]
        content = _go_document(doc, "layers", [config, *layers])
        self.manifests.append("sha256:" + Cid.of_raw(content).digest.hex())
        # The platform: the index's word for it, else the config's.
        p = desc.get("platform") or json.loads(self.read(doc["config"]["digest"]))
        self.pushed_platforms.append(
            "/".join(filter(None, (p.get("os"), p.get("architecture"), p.get("variant"))))
        )
        return content

    def _index(self, desc: dict[str, Any], children: list[dict[str, Any]]) -> bytes:
        doc = json.loads(self.read(desc["digest"]))
        doc["mediaType"] = DOCKER_TO_OCI.get(doc.get("mediaType", ""), doc.get("mediaType", ""))
        children += [self.convert(m) for m in doc.get("manifests") or [] if self.wanted(m.get("platform"))]
        return _go_document(doc, "manifests", children)


def top_descriptor(layout: Path, tag: str) -> dict[str, Any]:
    """The image's target as containerd holds it after a pull: mediaType, digest, size."""
    entries = json.loads((layout / "index.json").read_bytes())["manifests"]
    tagged = [e for e in entries if e.get("annotations", {}).get(_REF_NAME) == tag]
    if len(tagged) != 1:
        raise SystemExit(f"{layout}: {len(tagged)} entries tagged {tag!r} in index.json")
    return {k: tagged[0][k] for k in ("mediaType", "digest", "size")}


def push(
    layout: Path,
    *,
    tag: str = "latest",
    platforms: Sequence[str] | None = None,
    chunk_size: int = CHUNK_SIZE,
    max_links: int = KUBO_MAX_LINKS,
) -> Pushed:
    pusher = _Pusher(Path(layout), platforms, chunk_size, max_links)
    top = pusher.convert(top_descriptor(Path(layout), tag))
    image_cid = pusher.add(go_json(top))
    pushed = Pushed(image_cid, top, manifests=pusher.manifests, platforms=pusher.pushed_platforms)
    pushed.blob_cids = pusher.blob_cids
    # The root, then the blobs from the top down in document order, each file depth first.
    files = [image_cid, Cid.parse(top["urls"][0].removeprefix("ipfs://"), codecs=IPFS)]
    while files:
        file = files.pop(0)
        for cid in _dfs(file, pusher.dags[file]):
            pushed.blocks.setdefault(cid, pusher.dags[file][cid])
        files[:0] = pusher.children.get(file, [])
    return pushed


def car_bytes(pushed: Pushed) -> bytes:
    return b"".join(write_car([pushed.image_cid], pushed.blocks.items()))


def sidecar(pushed: Pushed, *, chunk_size: int, max_links: int) -> dict[str, Any]:
    return {
        "image_cid": str(pushed.image_cid),
        "top": pushed.top,
        "top_digest": pushed.top["digest"],
        "manifests": pushed.manifests,
        "platforms": pushed.platforms,
        "blobs": pushed.blob_cids,
        "chunk_size": chunk_size,
        "max_links": max_links,
    }


def sidecar_bytes(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=2).encode() + b"\n"


# The committed fixtures: a sample image each, and how it is pushed. Layers are small, with one
# blob over 256 KiB in each so that it is a dag-pb file over raw leaves.
KIB = 1024
FIXTURES: dict[str, dict[str, Any]] = {
    # Docker media types, one platform: the manifest is rewritten to OCI types.
    "single": {
        "layers": [LayerSpec(300 * KIB, "gzip"), LayerSpec(40 * KIB, "none")],
        "sample": {"platforms": ("linux/amd64",), "media": "docker", "seed": 1},
        "push": {},
    },
    # An OCI index of two platforms, all pushed.
    "multi": {
        "layers": [LayerSpec(270 * KIB, "gzip"), LayerSpec(8 * KIB, "none")],
        "sample": {"platforms": ("linux/amd64", "linux/arm64/v8"), "media": "oci", "seed": 2},
        "push": {},
    },
    # The same kind of index pushed for one platform: an index of one manifest.
    "multi-amd64": {
        "layers": [LayerSpec(20 * KIB, "gzip")],
        "sample": {"platforms": ("linux/amd64", "linux/arm64/v8"), "media": "oci", "seed": 3},
        "push": {"platforms": ["linux/amd64"]},
    },
    # 4 KiB chunks and 8 links: a 300 KiB layer is a three-level tree.
    "small-chunks": {
        "layers": [LayerSpec(300 * KIB, "none"), LayerSpec(5 * KIB, "gzip")],
        "sample": {"platforms": ("linux/amd64",), "media": "oci", "seed": 4},
        "push": {"chunk_size": 4 * KIB, "max_links": 8},
    },
}


def build_fixture(name: str, scratch: Path) -> tuple[bytes, bytes]:
    """A committed fixture's CAR and sidecar, made afresh from its sample image in `scratch`."""
    spec = FIXTURES[name]
    layout = scratch / name
    write_oci_layout(layout, spec["layers"], **spec["sample"])
    opts = {"chunk_size": CHUNK_SIZE, "max_links": KUBO_MAX_LINKS, **spec["push"]}
    pushed = push(layout, **opts)
    doc = sidecar(pushed, chunk_size=opts["chunk_size"], max_links=opts["max_links"])
    return car_bytes(pushed), sidecar_bytes(doc)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.nerdctl_fixture", description=__doc__.split("\n")[0])
    ap.add_argument("layout", nargs="?", type=Path, help="an OCI image layout")
    ap.add_argument("out", nargs="?", type=Path, help="the CAR to write (the sidecar: .json beside it)")
    ap.add_argument("--tag", default="latest")
    ap.add_argument("--platform", action="append", help="push only these platforms of an index")
    ap.add_argument("--chunk-size", type=int, default=CHUNK_SIZE)
    ap.add_argument("--max-links", type=int, default=KUBO_MAX_LINKS)
    ap.add_argument("--make-fixtures", type=Path, metavar="DIR", help="write every committed fixture")
    args = ap.parse_args(argv)
    if args.make_fixtures:
        args.make_fixtures.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as scratch:
            for name in FIXTURES:
                car, side = build_fixture(name, Path(scratch))
                (args.make_fixtures / f"{name}.car").write_bytes(car)
                (args.make_fixtures / f"{name}.json").write_bytes(side)
                print(f"{name}: {len(car)} bytes, image {json.loads(side)['image_cid']}")
        return 0
    if args.layout is None or args.out is None:
        ap.error("LAYOUT and OUT are required (or --make-fixtures DIR)")
    pushed = push(
        args.layout,
        tag=args.tag,
        platforms=args.platform,
        chunk_size=args.chunk_size,
        max_links=args.max_links,
    )
    args.out.write_bytes(car_bytes(pushed))
    doc = sidecar(pushed, chunk_size=args.chunk_size, max_links=args.max_links)
    args.out.with_suffix(".json").write_bytes(sidecar_bytes(doc))
    print(pushed.image_cid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
