"""`p2pimg publish` and `resolve`: what lands in the origin, and refusals of bad sources."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from p2pimg.content import dagcbor
from p2pimg.content.cid import Cid
from p2pimg.content.graph import DOCKER_MANIFEST
from p2pimg.content.model import BlobMap, ImageRoot, TagRecord
from p2pimg.errors import SourceInvalid
from p2pimg.ops.publish import publish
from p2pimg.ops.sample import LayerSpec, SampleImage, write_docker_archive, write_oci_layout
from p2pimg.sources.origins import FileOrigin, blob_key, block_key, tag_key

CHUNK = 64 << 10


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pimg", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def load_root(origin: FileOrigin, cid: Cid) -> ImageRoot:
    block = await origin.get(block_key(cid), max_size=1 << 20)
    return ImageRoot.from_node(dagcbor.decode_verified(block, cid))


async def test_publish_writes_the_layout(tmp_path: Path, sample: SampleImage) -> None:
    origin = FileOrigin(tmp_path / "origin")
    report = await publish(f"oci:{sample.path}:1", "demo/app", "1", origin, chunk_size=CHUNK)
    root = await load_root(origin, report.root)
    assert root.top == sample.top_digest
    published = set(root.manifests) | set(root.blobs)
    assert published == set(sample.blob_digests)
    for digest, entry in root.blobs.items():
        data = (tmp_path / "origin" / blob_key(digest)).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest[7:]
        bmap = BlobMap.from_node(
            dagcbor.decode_verified(await origin.get(block_key(entry.map), max_size=1 << 20), entry.map)
        )
        assert bmap.size == len(data) == entry.size and bmap.chunk_size == CHUNK
        assert [Cid.of_raw(data[i : i + CHUNK]) for i in range(0, len(data), CHUNK)] == list(bmap.chunks)
    for digest, m in root.manifests.items():
        raw = await origin.get(block_key(m.cid), max_size=1 << 20)
        assert hashlib.sha256(raw).hexdigest() == digest[7:]  # byte for byte
    record = TagRecord.decode(
        await origin.get(tag_key("demo/app", "1"), max_size=4096), name="demo/app", tag="1"
    )
    assert record.root == report.root


async def test_republish_skips_blobs_and_bumps_seq(tmp_path: Path, sample: SampleImage) -> None:
    origin = FileOrigin(tmp_path / "origin")
    first = await publish(f"oci:{sample.path}:1", "demo/app", "1", origin, chunk_size=CHUNK)
    second = await publish(f"oci:{sample.path}:1", "demo/app", "1", origin, chunk_size=CHUNK)
    assert first.blobs_uploaded == len(sample.blob_digests) - 1  # the manifest is a block
    assert second.blobs_uploaded == 0 and second.blobs_skipped == first.blobs_uploaded
    assert second.root == first.root  # same content, same identity
    assert second.record.seq > first.record.seq


async def test_multi_arch_index(tmp_path: Path) -> None:
    image = write_oci_layout(
        tmp_path / "multi", [LayerSpec(100 << 10)], tag="1", platforms=("linux/amd64", "linux/arm64")
    )
    origin = FileOrigin(tmp_path / "origin")
    report = await publish(f"oci:{image.path}:1", "demo/multi", "1", origin)
    root = await load_root(origin, report.root)
    assert root.manifests[root.top].media_type == "application/vnd.oci.image.index.v1+json"
    assert len(root.manifests) == 3  # the index and one manifest per platform
    assert set(root.manifests) | set(root.blobs) == set(image.blob_digests)


async def test_docker_archive(tmp_path: Path) -> None:
    archive = write_docker_archive(
        tmp_path / "img.tar", [LayerSpec(200 << 10), LayerSpec(50 << 10, "none")], repo_tag="x/y:1"
    )
    origin = FileOrigin(tmp_path / "origin")
    report = await publish(f"docker-archive:{archive.path}", "demo/archive", "1", origin)
    root = await load_root(origin, report.root)
    top = root.manifests[root.top]
    assert top.media_type == DOCKER_MANIFEST
    manifest = json.loads(await origin.get(block_key(top.cid), max_size=1 << 20))
    assert manifest["mediaType"] == DOCKER_MANIFEST
    with tarfile.open(archive.path) as tar:
        listing = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        config = tar.extractfile(listing[0]["Config"]).read()  # type: ignore[union-attr]
        layer_files = [tar.extractfile(n).read() for n in listing[0]["Layers"]]  # type: ignore[union-attr]
    assert manifest["config"]["digest"] == "sha256:" + hashlib.sha256(config).hexdigest()
    assert [d["digest"] for d in manifest["layers"]] == [
        "sha256:" + hashlib.sha256(f).hexdigest() for f in layer_files
    ]
    # Media types follow each layer's actual compression; nothing was recompressed.
    assert [d["mediaType"] for d in manifest["layers"]] == [
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.diff.tar",
    ]
    assert [d["size"] for d in manifest["layers"]] == [len(f) for f in layer_files]


@pytest.mark.parametrize(
    "source,message",
    [
        ("oci:/nonexistent/dir", "does not exist"),
        ("docker-archive:/nonexistent.tar", "does not exist"),
        ("tarball:/x", "unsupported source transport"),
        ("oci:", "expected oci:DIR"),
        ("nonsense", "expected oci:DIR"),
    ],
)
async def test_missing_sources(tmp_path: Path, source: str, message: str) -> None:
    with pytest.raises(SourceInvalid, match=message):
        await publish(source, "demo/app", "1", FileOrigin(tmp_path / "origin"))
    assert not (tmp_path / "origin").exists() or not any((tmp_path / "origin").rglob("tags/*"))


async def test_malformed_layouts(tmp_path: Path, sample: SampleImage) -> None:
    import shutil

    origin = FileOrigin(tmp_path / "origin")
    broken = tmp_path / "broken"

    def fresh() -> Path:
        shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(sample.path, broken)
        return broken

    layout = fresh()
    (layout / "index.json").write_text("{not json")
    with pytest.raises(SourceInvalid, match="not valid JSON"):
        await publish(f"oci:{layout}:1", "demo/app", "1", origin)

    layout = fresh()
    with pytest.raises(SourceInvalid, match="no image tagged 'nope'"):
        await publish(f"oci:{layout}:nope", "demo/app", "1", origin)

    layout = fresh()
    victim = next(p for p in (layout / "blobs" / "sha256").iterdir() if p.stat().st_size > 100_000)
    flipped = bytearray(victim.read_bytes())
    flipped[len(flipped) // 2] ^= 0x01
    victim.write_bytes(flipped)
    with pytest.raises(SourceInvalid, match="does not match its digest"):
        await publish(f"oci:{layout}:1", "demo/app", "1", origin)

    layout = fresh()
    next(p for p in (layout / "blobs" / "sha256").iterdir() if p.stat().st_size > 100_000).unlink()
    with pytest.raises(SourceInvalid, match="missing blob"):
        await publish(f"oci:{layout}:1", "demo/app", "1", origin)
    # Nothing got tagged by any of the failed publishes.
    assert not (tmp_path / "origin" / "p2pimg" / "tags").exists()


def test_cli_publish_of_a_corrupt_layout_is_one_clear_line(tmp_path: Path, sample: SampleImage) -> None:
    """`p2pimg publish` of a layout with one corrupt blob: exit 2 (bad input, as the README says)
    and one line naming the blob, not a traceback nor an ExceptionGroup (Debian 12's Python
    3.11.2 wraps an exception raised inside `except*`; this runs on whichever the suite uses)."""
    import shutil

    layout = tmp_path / "layout"
    shutil.copytree(sample.path, layout)
    victim = next(p for p in (layout / "blobs" / "sha256").iterdir() if p.stat().st_size > 100_000)
    flipped = bytearray(victim.read_bytes())
    flipped[len(flipped) // 2] ^= 0x01
    victim.write_bytes(flipped)
    result = run_cli("publish", f"oci:{layout}:1", "demo/app:1", home=tmp_path / "home")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "does not match its digest" in lines[0] and f"sha256:{victim.name}" in lines[0], lines[0]
    assert "Traceback" not in result.stderr and "ExceptionGroup" not in result.stderr
    assert not (tmp_path / "home" / "origin" / "p2pimg" / "tags").exists()


def test_cli_publish_and_resolve(tmp_path: Path, sample: SampleImage) -> None:
    home = tmp_path / "home"
    result = run_cli("publish", f"oci:{sample.path}:1", "demo/app:1", home=home)
    assert result.returncode == 0, result.stderr
    cid = result.stdout.strip().splitlines()[-1]
    assert Cid.parse(cid).codec_name == "dag-cbor"
    resolved = run_cli("resolve", "demo/app:1", home=home)
    assert resolved.returncode == 0 and resolved.stdout.strip() == cid
    # P2PIMG_ORIGIN / --origin choose another origin: nothing is published there.
    other = run_cli("resolve", "demo/app:1", "--origin", (tmp_path / "elsewhere").as_uri(), home=home)
    assert other.returncode == 3 and "not published" in other.stderr


@pytest.mark.parametrize(
    "args,code,message",
    [
        (("publish", "oci:/nope", "demo/app:1"), 2, "does not exist"),
        (("publish", "oci:/nope", "Demo/App:1"), 2, "invalid repository name"),
        (("publish", "oci:/nope", "demo/app"), 2, "expected NAME:TAG"),
        (("publish", "oci:/nope", "demo/app:1", "--chunk-size", "3000"), 2, "not a power of two"),
        (("resolve", "demo/app:1", "--origin", "ftp://x/y"), 2, "unsupported origin"),
        (("serve", "--listen", "nowhere"), 2, "invalid listen address"),
    ],
)
def test_cli_errors(tmp_path: Path, args: tuple[str, ...], code: int, message: str) -> None:
    result = run_cli(*args, home=tmp_path / "home")
    assert result.returncode == code, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
