"""The registry's HTTP contract, in process: routes, headers, ranges, errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest
from _support import Node, wait_cached

from p2pimg.errors import SPEC_CODES
from p2pimg.ops.sample import SampleImage

API = "registry/2.0"


def layout_blob(sample: SampleImage, digest: str) -> bytes:
    return (Path(sample.path) / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


def layers(sample: SampleImage) -> list[str]:
    manifest = json.loads(layout_blob(sample, sample.top_digest))
    return [d["digest"] for d in manifest["layers"]]


def error_code(response: object) -> str:
    body = response.json()  # type: ignore[attr-defined]
    assert set(body) == {"errors"}, body
    code: str = body["errors"][0]["code"]
    assert body["errors"][0]["message"]
    assert code in SPEC_CODES, code  # a JSON error body's code MUST be one of the spec's
    return code


def plain_error(response: httpx.Response) -> str:
    """An error the spec has no code for (a byte range): its message as plain text, no JSON code."""
    assert response.headers["content-type"].startswith("text/plain"), response.headers
    assert response.text.strip() and not response.text.startswith("{"), response.text
    return response.text


async def test_api_version(node: Node) -> None:
    for method in ("GET", "HEAD"):
        r = await node.client.request(method, "/v2/")
        assert r.status_code == 200
        assert r.headers["docker-distribution-api-version"] == API


@pytest.mark.parametrize("by", ["tag", "digest", "ipfs"])
async def test_manifest_byte_for_byte(node: Node, sample: SampleImage, by: str) -> None:
    path = {
        "tag": "/v2/demo/app/manifests/1",
        "digest": f"/v2/demo/app/manifests/{sample.top_digest}",
        "ipfs": f"/v2/ipfs/{node.root}/manifests/latest",
    }[by]
    expected = layout_blob(sample, sample.top_digest)
    r = await node.client.get(path)
    assert r.status_code == 200, r.text
    assert r.content == expected
    assert r.headers["docker-content-digest"] == sample.top_digest
    assert r.headers["content-type"] == "application/vnd.oci.image.manifest.v1+json"
    assert int(r.headers["content-length"]) == len(expected)
    head = await node.client.head(path)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(expected))
    assert head.headers["docker-content-digest"] == sample.top_digest


async def test_blobs_whole_and_head(node: Node, sample: SampleImage) -> None:
    for digest in layers(sample):
        expected = layout_blob(sample, digest)
        head = await node.client.head(f"/v2/demo/app/blobs/{digest}")
        assert head.status_code == 200 and head.headers["content-length"] == str(len(expected))
        for name in ("demo/app", f"ipfs/{node.root}"):
            r = await node.client.get(f"/v2/{name}/blobs/{digest}")
            assert r.status_code == 200
            assert r.headers["docker-content-digest"] == digest
            assert hashlib.sha256(r.content).hexdigest() == digest.removeprefix("sha256:")
    # Every blob is now complete in the cache and served from there.
    for digest in layers(sample):
        await wait_cached(node.store, digest)


@pytest.mark.parametrize("cached", [False, True])
async def test_ranges(node: Node, sample: SampleImage, cached: bool) -> None:
    digest = layers(sample)[0]
    data = layout_blob(sample, digest)
    size = len(data)
    if cached:
        await node.client.get(f"/v2/demo/app/blobs/{digest}")
        await wait_cached(node.store, digest)
    url = f"/v2/demo/app/blobs/{digest}"
    for header, (start, end) in {
        "bytes=0-0": (0, 1),
        "bytes=100-": (100, size),
        "bytes=-10": (size - 10, size),
        f"bytes=70000-{size + 999}": (70000, size),
        "bytes=65535-131072": (65535, 131073),  # straddles chunk boundaries
    }.items():
        r = await node.client.get(url, headers={"Range": header})
        assert r.status_code == 206, (header, r.text)
        assert r.content == data[start:end], header
        assert r.headers["content-range"] == f"bytes {start}-{end - 1}/{size}"
    r = await node.client.get(url, headers={"Range": f"bytes={size}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{size}"
    assert "range starts at" in plain_error(r)  # no code: the spec has none for ranges
    for bad, status in (
        ("bytes=5-1", 400),
        ("bytes=x-y", 400),
        ("bytes=", 400),
        ("bytes=" + "9" * 30 + "-", 416),
    ):
        r = await node.client.get(url, headers={"Range": bad})
        assert r.status_code == status, bad
        plain_error(r)
        head = await node.client.head(url, headers={"Range": bad})
        assert head.status_code == status and head.content == b"", bad
    # A unit other than bytes is ignored (RFC 9110 §14.2), and so are several ranges (no
    # multipart responses here): the whole blob, 200.
    for ignored in ("lines=0-1", "bytes=0-1,5-6"):
        r = await node.client.get(url, headers={"Range": ignored})
        assert r.status_code == 200 and r.content == data, ignored
        assert "content-range" not in r.headers


async def test_empty_blob(node: Node, sample: SampleImage, tmp_path: Path) -> None:
    # LayerSpec(0) is a tiny tar, not empty: publish a layout holding a true zero-length blob.
    from p2pimg.content.graph import SourceBlob
    from p2pimg.ops.inputs import read_source
    from p2pimg.ops.publish import publish_image

    image = read_source(f"oci:{sample.path}:1")
    empty = "sha256:" + hashlib.sha256(b"").hexdigest()
    import io

    image.blobs[empty] = SourceBlob(empty, 0, lambda: io.BytesIO(b""))
    await publish_image(image, "demo/empty", "1", node.origin)
    r = await node.client.get(f"/v2/demo/empty/blobs/{empty}")
    assert r.status_code == 200 and r.content == b"" and r.headers["content-length"] == "0"
    await wait_cached(node.store, empty)
    r = await node.client.get(f"/v2/demo/empty/blobs/{empty}", headers={"Range": "bytes=0-"})
    assert r.status_code == 416


async def test_tags_list(node: Node) -> None:
    r = await node.client.get("/v2/demo/app/tags/list")
    assert r.status_code == 200 and r.json() == {"name": "demo/app", "tags": ["1"]}
    r = await node.client.get(f"/v2/ipfs/{node.root}/tags/list")
    assert r.json()["tags"] == ["latest"]
    # n=0 asks for nothing: an empty page and no Link (a client following one would loop).
    for name in ("demo/app", f"ipfs/{node.root}"):
        r = await node.client.get(f"/v2/{name}/tags/list", params={"n": "0"})
        assert r.status_code == 200 and r.json()["tags"] == [] and "link" not in r.headers


async def test_a_cid_name_answers_only_its_own_tag(node: Node, sample: SampleImage) -> None:
    """`ipfs/<CID>` lists one tag, `latest`: that tag (and digests) answer, any other tag is
    MANIFEST_UNKNOWN, as for a published name."""
    r = await node.client.get(f"/v2/ipfs/{node.root}/manifests/latest")
    assert r.status_code == 200 and r.headers["docker-content-digest"] == sample.top_digest
    r = await node.client.get(f"/v2/ipfs/{node.root}/manifests/{sample.top_digest}")
    assert r.status_code == 200
    for method in ("GET", "HEAD"):
        r = await node.client.request(method, f"/v2/ipfs/{node.root}/manifests/v1")
        assert r.status_code == 404, method
    assert error_code(await node.client.get(f"/v2/ipfs/{node.root}/manifests/v1")) == "MANIFEST_UNKNOWN"


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE", "PATCH"])
async def test_writes_refused(node: Node, sample: SampleImage, method: str) -> None:
    for path in (
        "/v2/demo/app/manifests/1",
        "/v2/demo/app/blobs/uploads/",
        f"/v2/demo/app/blobs/{sample.top_digest}",
        "/v2/",
    ):
        r = await node.client.request(method, path, content=b"x" * 10)
        assert r.status_code == 405, (method, path)
        assert error_code(r) == "UNSUPPORTED"
    # Nothing was written: the tag still resolves to the same image.
    r = await node.client.get("/v2/demo/app/manifests/1")
    assert r.headers["docker-content-digest"] == sample.top_digest


async def test_unknown_things(node: Node, sample: SampleImage) -> None:
    zero = "sha256:" + "0" * 64
    cases = {
        "/v2/nobody/here/manifests/1": "NAME_UNKNOWN",
        "/v2/nobody/here/tags/list": "NAME_UNKNOWN",
        "/v2/demo/app/manifests/2": "MANIFEST_UNKNOWN",
        f"/v2/demo/app/manifests/{zero}": "MANIFEST_UNKNOWN",
        f"/v2/demo/app/blobs/{zero}": "BLOB_UNKNOWN",
        # a real digest, but not of a blob of this image
        f"/v2/demo/app/blobs/{sample.top_digest}": "BLOB_UNKNOWN",
    }
    for path, code in cases.items():
        r = await node.client.get(path)
        assert r.status_code == 404, path
        assert error_code(r) == code, path
    # an ipfs root that is well-formed but not in the origin
    missing_root = "bafyreiaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
    r = await node.client.get(f"/v2/ipfs/{missing_root}/manifests/latest")
    assert r.status_code == 404 and error_code(r) == "NAME_UNKNOWN"


async def test_malformed_input(node: Node, sample: SampleImage) -> None:
    digest = layers(sample)[0]
    cases = {
        "/v2/Demo/App/manifests/1": "NAME_INVALID",
        "/v2/demo//app/manifests/1": "NAME_INVALID",
        "/v2/ipfs/notacid/manifests/latest": "NAME_INVALID",
        "/v2/ipfs/qmyfoo/manifests/latest": "NAME_INVALID",
        "/v2/demo/app/blobs/sha256:1234": "DIGEST_INVALID",
        "/v2/demo/app/blobs/md5:d41d8cd98f00b204e9800998ecf8427e": "DIGEST_INVALID",
        "/v2/demo/app/manifests/sha256:XYZ": "DIGEST_INVALID",
        f"/v2/demo/%2e%2e/%2e%2e/blobs/{digest}": "NAME_INVALID",
        "/v2/demo/app/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd": "DIGEST_INVALID",
        "/v2/demo/app/referrers/sha256:1234": "DIGEST_INVALID",
    }
    for path, code in cases.items():
        r = await node.client.get(path)
        assert r.status_code == 400, (path, r.status_code, r.text)
        assert error_code(r) == code, path
    # A string that cannot be a tag names no manifest: 404 MANIFEST_UNKNOWN (the spec has no code
    # for a malformed tag; TAG_INVALID is a legacy Docker one), the message saying why.
    for path in (
        "/v2/demo/app/manifests/.hidden",
        "/v2/demo/app/manifests/..%2f..%2ftags",
        f"/v2/ipfs/{node.root}/manifests/-x",
    ):
        for method in ("GET", "HEAD"):
            r = await node.client.request(method, path)
            assert r.status_code == 404, (method, path, r.status_code)
        r = await node.client.get(path)
        assert error_code(r) == "MANIFEST_UNKNOWN" and "invalid tag" in r.text, path


async def test_unknown_endpoints(node: Node) -> None:
    """A path that is no endpoint: 404 with the spec's UNSUPPORTED (there is no NOT_FOUND code)."""
    for path in ("/v3/", "/v2/demo/app/", "/v2/demo/app/other/x", "/favicon.ico"):
        r = await node.client.get(path)
        assert r.status_code == 404 and error_code(r) == "UNSUPPORTED", path


async def test_referrers_of_an_image_without_any(node: Node, sample: SampleImage) -> None:
    """The referrers API answers an empty index (never a 404) for a published name or root."""
    for name in ("demo/app", f"ipfs/{node.root}"):
        r = await node.client.get(f"/v2/{name}/referrers/{sample.top_digest}")
        assert r.status_code == 200 and r.headers["content-type"] == "application/vnd.oci.image.index.v1+json"
        assert r.json() == {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [],
        }
    r = await node.client.get(f"/v2/nobody/referrers/{sample.top_digest}")
    assert r.status_code == 404 and error_code(r) == "NAME_UNKNOWN"


async def test_raw_path_traversal(node: Node) -> None:
    """Targets httpx would normalise, sent as raw bytes."""
    import trio

    host, port = node.url.removeprefix("http://").split(":")
    for target in (
        b"/v2/../../etc/passwd",
        b"/v2/demo/app/blobs/../../../../etc/passwd",
        b"/v2/demo/../../../manifests/1",
        b"//etc/passwd",
        b"*",
    ):
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(b"GET " + target + b" HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        response = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                response += chunk
        await stream.aclose()
        status = int(response.split(b" ", 2)[1])
        assert status in (400, 404), (target, response[:200])
        assert b"root:" not in response


async def test_unknown_digests_do_not_list_the_origin_every_time(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A miss re-lists the name's tags (a tag may have moved), but at most once per tag TTL:
    a client asking again and again for digests that are not there costs no origin listings."""
    listings = 0
    real_list = node.origin.list

    async def counting_list(prefix: str) -> list[str]:
        nonlocal listings
        listings += 1
        return await real_list(prefix)

    monkeypatch.setattr(node.origin, "list", counting_list)
    for i in range(20):
        missing = "sha256:" + hashlib.sha256(b"not here %d" % i).hexdigest()
        r = await node.client.get(f"/v2/demo/app/blobs/{missing}")
        assert r.status_code == 404 and error_code(r) == "BLOB_UNKNOWN"
    assert listings <= 2, f"{listings} origin listings for 20 misses"  # the first look + one re-list
    r = await node.client.get("/v2/demo/app/manifests/1")
    assert r.status_code == 200  # what is there is still found
