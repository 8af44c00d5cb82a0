"""S3Origin against a real moto server that checks every request's SigV4 signature."""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import boto3
import httpx
import pytest
import trio
from botocore.credentials import Credentials

from p2pimg.errors import InvalidInput, OriginError, OriginNotFound
from p2pimg.ops.sample import SampleImage
from p2pimg.sources.origins import open_origin
from p2pimg.sources.origins.s3 import S3Origin
from p2pimg.sources.origins.s3url import S3Location, parse_s3_url

MiB = 1 << 20
PART = 64 * MiB
BIG = 150 * MiB + 12_345  # three parts: 64 MiB, 64 MiB and the rest


@dataclass(frozen=True)
class Moto:
    endpoint: str
    access_key: str
    secret_key: str

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, "moto server exited; see moto.log"
            try:
                if httpx.get(f"{endpoint}/moto-api/data.json", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "moto server did not start in 30 s"
            time.sleep(0.1)
        # moto checks no signature by default. An IAM user with a real key pair, then auth on for
        # every later request, makes a badly signed request fail as it would against a real store.
        iam = boto3.client(
            "iam",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )
        iam.create_user(UserName="p2pimg")
        iam.put_user_policy(
            UserName="p2pimg",
            PolicyName="s3",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
                }
            ),
        )
        key = iam.create_access_key(UserName="p2pimg")["AccessKey"]
        httpx.post(f"{endpoint}/moto-api/reset-auth", content=b"0").raise_for_status()
        yield Moto(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(autouse=True)
def aws_env(moto: Moto, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto.secret_key)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)


_buckets = itertools.count()


@pytest.fixture
def bucket(moto: Moto) -> str:
    name = f"p2pimg-test-{os.getpid()}-{next(_buckets)}"
    moto.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
async def origin(moto: Moto, bucket: str) -> AsyncIterator[S3Origin]:
    o = S3Origin(f"s3://{bucket}/pfx?endpoint={moto.endpoint}")
    yield o
    await o.aclose()


@pytest.fixture(scope="session")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """BIG random bytes on disk (no two parts alike) and their sha256."""
    path = tmp_path_factory.mktemp("big") / "blob"
    sha = hashlib.sha256()
    with path.open("wb") as f:
        remaining = BIG
        while remaining:
            piece = os.urandom(min(8 * MiB, remaining))
            sha.update(piece)
            f.write(piece)
            remaining -= len(piece)
    return path, sha.hexdigest()


async def _read(origin: S3Origin, key: str, offset: int, length: int) -> bytes:
    return b"".join([piece async for piece in origin.read_range(key, offset, length)])


def _file_bytes(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


class _Source(io.RawIOBase):
    """A file opened for put_blob that counts what is read and can fail at a given offset."""

    def __init__(self, path: Path, *, fail_at: int | None = None, before_failing: Any = None) -> None:
        self._f = path.open("rb")
        self.fail_at = fail_at
        self.before_failing = before_failing
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.fail_at is not None and self.bytes_read + max(n, 1) > self.fail_at:
            if self.before_failing is not None:
                self.before_failing()
            raise OSError("source went away")
        data = self._f.read(n)
        self.bytes_read += len(data)
        return data

    def close(self) -> None:
        self._f.close()
        super().close()


def _wait_for_uploads(origin: S3Origin, count: int) -> None:
    """Block (a source's worker thread) until the origin has had `count` part uploads answered.

    Waiting for the answer, not for the part to be listed: moto computes a part's ETag lazily, and
    a ListParts racing the PUT that stores the part can cache a wrong one.
    """
    deadline = time.monotonic() + 60
    while origin.stats.parts_uploaded < count:
        assert time.monotonic() < deadline, f"no {count} parts were uploaded"
        time.sleep(0.01)


def _parts(moto: Moto, bucket: str, key: str) -> list[dict[str, Any]]:
    """Parts of the newest in-progress upload of `key`."""
    s3 = moto.client()
    uploads = s3.list_multipart_uploads(Bucket=bucket, Prefix=key)["Uploads"]
    parts: list[dict[str, Any]] = s3.list_parts(Bucket=bucket, Key=key, UploadId=uploads[-1]["UploadId"])[
        "Parts"
    ]
    return parts


# -- URLs and credentials --------------------------------------------------------------------


def test_parse_s3_url() -> None:
    assert parse_s3_url("s3://my-bucket?endpoint=https://gateway.storjshare.io") == S3Location(
        "my-bucket", "", "https://gateway.storjshare.io", "us-east-1"
    )
    loc = parse_s3_url("s3://b.k-t/a/b/?endpoint=http://127.0.0.1:9000/&region=eu-west-1")
    assert loc == S3Location("b.k-t", "a/b", "http://127.0.0.1:9000", "eu-west-1")
    assert parse_s3_url(loc.url) == loc
    assert parse_s3_url("s3://bkt?endpoint=http://[::1]:9000").endpoint == "http://[::1]:9000"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://?endpoint=http://h", "needs a bucket"),
        ("s3://Bucket?endpoint=http://h", "invalid bucket name"),
        ("s3://ab?endpoint=http://h", "invalid bucket name"),
        ("s3://-bucket?endpoint=http://h", "invalid bucket name"),
        ("s3://my_bucket?endpoint=http://h", "invalid bucket name"),
        ("s3://a..b?endpoint=http://h", "no '..'"),
        ("s3://192.168.10.1?endpoint=http://h", "IP address"),
        ("s3://xn--bucket?endpoint=http://h", "reserved"),
        ("s3://" + "b" * 64 + "?endpoint=http://h", "invalid bucket name"),
        ("s3://key:secret@bucket?endpoint=http://h", "AWS_ACCESS_KEY_ID"),
        ("s3://bucket", "needs an endpoint"),
        ("s3://bucket?endpoint=", "needs an endpoint"),
        ("s3://bucket?endpoint=ftp://h", "http:// or https://"),
        ("s3://bucket?endpoint=gateway.storjshare.io", "http:// or https://"),
        ("s3://bucket?endpoint=http://", "no host"),
        ("s3://bucket?endpoint=http://h:99999", "invalid port"),
        ("s3://bucket?endpoint=http://h/base", "no path"),
        ("s3://bucket?endpoint=http://u:p@h", "must not carry credentials"),
        ("s3://bucket?endpoint=http://h&endpoint=http://g", "given twice"),
        ("s3://bucket?endpoint=http://h&acl=public", "unknown s3 origin URL parameter"),
        ("s3://bucket?endpoint=http://h&region=EU%20West", "invalid s3 region"),
        ("s3://bucket/a/../b?endpoint=http://h", "invalid s3 key prefix"),
        ("s3://bucket/a//b?endpoint=http://h", "invalid s3 key prefix"),
        ("s3://bucket/a b?endpoint=http://h", "invalid s3 key prefix"),
        ("s3://bucket?endpoint=http://h#frag", "fragment"),
        ("file:///tmp", "not an s3:// URL"),
    ],
)
def test_parse_s3_url_errors(url: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_s3_url(url)


def test_missing_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(InvalidInput, match="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        S3Origin("s3://bucket?endpoint=http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    with pytest.raises(InvalidInput, match=r"set AWS_SECRET_ACCESS_KEY \("):
        open_origin("s3://bucket?endpoint=http://127.0.0.1:1", tmp_path)


def test_open_origin_makes_s3_origin(tmp_path: Path) -> None:
    origin = open_origin("s3://bucket/x?endpoint=http://127.0.0.1:1", tmp_path)
    assert isinstance(origin, S3Origin)
    assert origin.url == "s3://bucket/x?endpoint=http://127.0.0.1:1"


async def test_bad_signature_is_refused(moto: Moto, bucket: str) -> None:
    bad = S3Origin(
        f"s3://{bucket}?endpoint={moto.endpoint}", credentials=Credentials(moto.access_key, "not-the-secret")
    )
    with pytest.raises(OriginError, match="SignatureDoesNotMatch"):
        await bad.get("p2pimg/tags/demo/app/1", max_size=10)
    with pytest.raises(OriginError, match="403"):
        await bad.exists("p2pimg/tags/demo/app/1")
    await bad.aclose()


async def test_missing_bucket(moto: Moto) -> None:
    origin = S3Origin(f"s3://no-such-bucket?endpoint={moto.endpoint}")
    with pytest.raises(OriginError, match="bucket 'no-such-bucket' does not exist") as info:
        await origin.get("p2pimg/tags/demo/app/1", max_size=10)
    assert not isinstance(info.value, OriginNotFound)
    await origin.aclose()


async def test_unreachable_endpoint() -> None:
    origin = S3Origin(f"s3://bucket?endpoint=http://127.0.0.1:{_free_port()}")
    with pytest.raises(OriginError, match="failed: ConnectError"):
        await origin.exists("p2pimg/tags/demo/app/1")
    await origin.aclose()


# -- small objects -----------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "/some/prefix"])
async def test_round_trips(moto: Moto, bucket: str, prefix: str) -> None:
    origin = S3Origin(f"s3://{bucket}{prefix}?endpoint={moto.endpoint}")
    keys = [
        "p2pimg/tags/demo/app/2",
        "p2pimg/tags/demo/app/1",
        "p2pimg/tags/demo/app/sub/x",
        "p2pimg/tags/demo/apple/1",
    ]
    for i, key in enumerate(keys):
        await origin.put_bytes(key, f"record {i}".encode())
    assert await origin.get(keys[0], max_size=64) == b"record 0"
    assert await origin.exists(keys[1])
    assert not await origin.exists("p2pimg/tags/demo/app/3")
    assert await origin.list("p2pimg/tags/demo/app/") == sorted(keys[:3])
    assert await origin.list("p2pimg/tags/nobody/") == []

    stored = [o["Key"] for o in moto.client().list_objects_v2(Bucket=bucket)["Contents"]]
    base = prefix.strip("/") + "/" if prefix else ""
    assert sorted(stored) == sorted(base + k for k in keys)

    await origin.put_bytes(keys[0], b"replaced")
    assert await origin.get(keys[0], max_size=64) == b"replaced"
    await origin.put_bytes("p2pimg/blocks/empty", b"")
    assert await origin.get("p2pimg/blocks/empty", max_size=0) == b""

    await origin.delete(keys[0])
    await origin.delete(keys[0])  # already gone: not an error
    assert not await origin.exists(keys[0])
    assert await origin.list("p2pimg/tags/demo/app/") == sorted(keys[1:3])
    await origin.aclose()


async def test_list_pages(origin: S3Origin) -> None:
    origin.list_page_size = 2  # five keys: three pages, two continuation tokens
    keys = [f"p2pimg/tags/demo/app/{i}" for i in range(5)]
    for key in keys:
        await origin.put_bytes(key, b"x")
    assert await origin.list("p2pimg/tags/demo/app/") == keys


async def test_list_info_dates_objects_by_last_modified(moto: Moto, bucket: str, origin: S3Origin) -> None:
    origin.list_page_size = 2  # over pages, as list
    keys = [f"p2pimg/blocks/b{i}" for i in range(3)]
    before = time.time()
    for key in keys:
        await origin.put_bytes(key, b"x")
    infos = await origin.list_info("p2pimg/blocks/")
    assert [info.key for info in infos] == keys == await origin.list("p2pimg/blocks/")
    stored = {
        o["Key"]: o["LastModified"].timestamp()
        for o in moto.client().list_objects_v2(Bucket=bucket)["Contents"]
    }
    assert {info.key: info.modified for info in infos} == {k: stored[f"pfx/{k}"] for k in keys}
    # S3 dates to the second or the millisecond, and moto's clock is this machine's.
    assert all(before - 2 <= info.modified <= time.time() + 1 for info in infos)


async def test_gc_spares_young_objects(origin: S3Origin, sample: SampleImage) -> None:
    """gc over S3: an unreachable object goes only once its LastModified is past the grace."""
    from p2pimg.ops import admin
    from p2pimg.ops.publish import publish

    await publish(f"oci:{sample.path}:1", "demo/app", "1", origin)
    orphan = "p2pimg/blobs/sha256/" + "ab" * 32
    await origin.put_bytes(orphan, b"uploaded by a publish whose tag is not written yet")
    now = time.time()
    fresh = await admin.plan_gc(origin, now=now)
    assert not fresh.problems and fresh.garbage == [] and fresh.young == [orphan]
    later = await admin.plan_gc(origin, now=now + admin.DEFAULT_GRACE + 60)
    assert later.garbage == [orphan] and later.young == []
    assert await admin.run_gc(origin, later) == 1
    assert not await origin.exists(orphan)
    assert (await admin.plan_gc(origin, grace=0)).garbage == []  # the published image is whole


async def test_missing_keys(origin: S3Origin) -> None:
    with pytest.raises(OriginNotFound):
        await origin.get("p2pimg/blocks/nothing", max_size=100)
    with pytest.raises(OriginNotFound):
        await _read(origin, "p2pimg/blocks/nothing", 0, 10)
    assert await _read(origin, "p2pimg/blocks/nothing", 5, 0) == b""  # no request at all


async def test_prepare_makes_the_client_the_first_request_uses(origin: S3Origin) -> None:
    await origin.put_bytes("p2pimg/blocks/first", b"x")
    fresh = S3Origin(origin.location)
    assert fresh._client is None  # made by the first request, unless prepared
    fresh.prepare()  # as `serve` does at start: not on the first pull's critical path
    client = fresh._client
    assert client is not None
    assert await fresh.get("p2pimg/blocks/first", max_size=10) == b"x"
    assert fresh._client is client
    await fresh.aclose()


async def test_get_refuses_over_max_size(origin: S3Origin) -> None:
    await origin.put_bytes("p2pimg/blocks/big", b"x" * 1000)
    assert len(await origin.get("p2pimg/blocks/big", max_size=1000)) == 1000
    with pytest.raises(OriginError, match="exceeds 999 bytes"):
        await origin.get("p2pimg/blocks/big", max_size=999)


async def test_invalid_keys(origin: S3Origin) -> None:
    for key in ("../etc/passwd", "p2pimg/../x", "p2pimg//x", "/abs", "p2pimg/dir/", "p2pimg/a b"):
        with pytest.raises(InvalidInput):
            await origin.exists(key)
    with pytest.raises(InvalidInput):
        await origin.list("p2pimg/tags")  # a listing prefix ends with '/'


# -- ranged reads and blobs ----------------------------------------------------------------------


async def test_read_range(origin: S3Origin) -> None:
    data = os.urandom(3 * MiB + 17)
    await origin.put_blob("p2pimg/blobs/sha256/small", lambda: io.BytesIO(data), len(data))
    size = len(data)
    for offset, length in [
        (0, 1),
        (size - 1, 1),
        (0, size),
        (12_345, 2 * MiB),
        (MiB - 1, 2),
        (size - 100, 100),
    ]:
        got = await _read(origin, "p2pimg/blobs/sha256/small", offset, length)
        assert got == data[offset : offset + length]
    with pytest.raises(OriginError, match="shorter than expected"):
        await _read(origin, "p2pimg/blobs/sha256/small", size - 10, 20)
    with pytest.raises(OriginError, match="InvalidRange"):
        await _read(origin, "p2pimg/blobs/sha256/small", size, 1)


async def test_read_head_stops_at_the_length_or_the_object_end(origin: S3Origin) -> None:
    data = os.urandom(MiB + 17)
    key = "p2pimg/blobs/sha256/head"
    await origin.put_blob(key, lambda: io.BytesIO(data), len(data))

    async def head(length: int, of: str = key) -> bytes:
        return b"".join([piece async for piece in origin.read_head(of, length)])

    assert await head(1000) == data[:1000]
    assert await head(len(data)) == data
    assert await head(4 * MiB) == data  # shorter than asked for: all of it, no error
    await origin.put_bytes("p2pimg/blobs/sha256/empty", b"")
    assert await head(MiB, "p2pimg/blobs/sha256/empty") == b""
    with pytest.raises(OriginNotFound):
        await head(MiB, "p2pimg/blobs/sha256/missing")


async def test_put_blob_single_source_errors(origin: S3Origin, tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(b"x" * 100)
    with pytest.raises(OriginError, match="ended early"):
        await origin.put_blob("p2pimg/blobs/sha256/short", lambda: path.open("rb"), 200)
    with pytest.raises(
        OriginError,
        match="^cannot write p2pimg/blobs/sha256/gone to s3://.*: cannot open its source: .*No such file",
    ):
        await origin.put_blob("p2pimg/blobs/sha256/gone", lambda: (tmp_path / "none").open("rb"), 10)
    assert not await origin.exists("p2pimg/blobs/sha256/short")


async def test_put_blob_single_source_changes(origin: S3Origin) -> None:
    """The MD5 is taken in a first pass; a second pass that differs never completes its PUT."""
    size = 3 * MiB
    for second in (os.urandom(size), os.urandom(size // 2)):
        opened = iter([io.BytesIO(os.urandom(size)), io.BytesIO(second)])
        with pytest.raises(OriginError, match="changed while|ended early"):
            await origin.put_blob("p2pimg/blobs/sha256/moving", functools.partial(next, opened), size)
        assert not await origin.exists("p2pimg/blobs/sha256/moving")


async def test_multipart_put_blob(
    moto: Moto, bucket: str, origin: S3Origin, big_file: tuple[Path, str]
) -> None:
    path, sha = big_file
    key = "p2pimg/blobs/sha256/" + sha
    start = time.monotonic()
    await origin.put_blob(key, lambda: path.open("rb"), BIG)
    upload_s = time.monotonic() - start
    assert origin.stats.parts_uploaded == 3 and origin.stats.parts_reused == 0

    head = moto.client().head_object(Bucket=bucket, Key="pfx/" + key)
    assert head["ContentLength"] == BIG
    assert head["ETag"].strip('"').endswith("-3")  # three parts of 64 MiB, 64 MiB, 22 MiB
    assert not moto.client().list_multipart_uploads(Bucket=bucket).get("Uploads")

    # One streamed read of the whole object, then parallel 16 MiB spans as a fetch would do them.
    start = time.monotonic()
    whole = hashlib.sha256()
    async for piece in origin.read_range(key, 0, BIG):
        whole.update(piece)
    stream_s = time.monotonic() - start
    assert whole.hexdigest() == sha

    span = 16 * MiB
    mismatched: list[int] = []

    async def check(offset: int) -> None:
        length = min(span, BIG - offset)
        got = hashlib.sha256(await _read(origin, key, offset, length)).digest()
        if got != hashlib.sha256(_file_bytes(path, offset, length)).digest():
            mismatched.append(offset)

    start = time.monotonic()
    limit = trio.CapacityLimiter(4)

    async def limited(offset: int) -> None:
        async with limit:
            await check(offset)

    async with trio.open_nursery() as nursery:
        for offset in range(0, BIG, span):
            nursery.start_soon(limited, offset)
    spans_s = time.monotonic() - start
    assert not mismatched

    # Spans across the part boundaries, and the last byte.
    for offset, length in [(PART - 100, 200), (2 * PART - 1, 2), (PART - MiB, 2 * MiB + 1), (BIG - 1, 1)]:
        assert await _read(origin, key, offset, length) == _file_bytes(path, offset, length)

    mb = BIG / 1e6
    print(
        f"\nmoto loopback: upload {mb / upload_s:.0f} MB/s, one-stream read {mb / stream_s:.0f} MB/s, "
        f"4 x 16 MiB spans {mb / spans_s:.0f} MB/s"
    )


async def test_multipart_resume(
    moto: Moto, bucket: str, origin: S3Origin, big_file: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, sha = big_file
    key = "p2pimg/blobs/sha256/" + sha
    seen_parts: list[dict[str, Any]] = []

    def wait_for_first_part() -> None:
        # The reader fails on part 2 only once part 1 is stored, so "interrupted after part 1" is
        # what happens, not a race with the cancelled upload of part 1.
        _wait_for_uploads(origin, 1)
        seen_parts.extend(_parts(moto, bucket, "pfx/" + key))

    first = _Source(path, fail_at=PART + 1, before_failing=wait_for_first_part)
    with pytest.raises(OriginError, match="source went away"):
        await origin.put_blob(key, lambda: cast(BinaryIO, first), BIG)
    assert [(p["PartNumber"], p["Size"]) for p in seen_parts] == [(1, PART)]
    assert not await origin.exists(key)
    uploads = moto.client().list_multipart_uploads(Bucket=bucket)["Uploads"]
    assert [u["Key"] for u in uploads] == ["pfx/" + key]  # left in place for the next attempt

    part_puts: list[str] = []
    real_send = httpx.AsyncClient.send

    async def counting_send(self: httpx.AsyncClient, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        if request.method == "PUT" and "partNumber" in request.url.params:
            part_puts.append(request.url.params["partNumber"])
        return await real_send(self, request, **kwargs)

    monkeypatch.setattr(httpx.AsyncClient, "send", counting_send)
    second = _Source(path)
    retry = S3Origin(origin.location)
    await retry.put_blob(key, lambda: cast(BinaryIO, second), BIG)
    await retry.aclose()
    assert sorted(part_puts) == ["2", "3"]  # part 1 was checked against its ETag, not sent again
    assert retry.stats.parts_reused == 1 and retry.stats.parts_uploaded == 2
    assert second.bytes_read == BIG
    assert not moto.client().list_multipart_uploads(Bucket=bucket).get("Uploads")

    head = moto.client().head_object(Bucket=bucket, Key="pfx/" + key)
    assert head["ContentLength"] == BIG and head["ETag"].strip('"').endswith("-3")
    digest = hashlib.sha256()
    async for piece in origin.read_range(key, 0, BIG):
        digest.update(piece)
    assert digest.hexdigest() == sha


async def test_resume_reuploads_changed_parts(moto: Moto, bucket: str, origin: S3Origin) -> None:
    """A stale part (other bytes) is sent again; an upload of a longer key is not taken for ours."""
    origin.segment_size = 5 * MiB  # S3's smallest part: keeps this test fast
    size = 12 * MiB
    old, new = os.urandom(size), os.urandom(size)
    key = "p2pimg/blobs/sha256/k"
    for attempt, attempt_key in enumerate((key, key + "2"), 1):

        def fail_after_part_1(count: int = attempt) -> None:
            _wait_for_uploads(origin, count)

        with pytest.raises(OriginError, match="source went away"):
            await origin.put_blob(attempt_key, lambda: _FailingBytes(old, 5 * MiB, fail_after_part_1), size)
    origin.stats.parts_reused = origin.stats.parts_uploaded = 0

    await origin.put_blob(key, lambda: io.BytesIO(new), size)
    assert origin.stats.parts_reused == 0 and origin.stats.parts_uploaded == 3
    assert await _read(origin, key, 0, size) == new
    # The other key's upload is untouched and still resumable.
    assert [u["Key"] for u in moto.client().list_multipart_uploads(Bucket=bucket)["Uploads"]] == [
        "pfx/" + key + "2"
    ]
    await origin.put_blob(key + "2", lambda: io.BytesIO(old), size)
    assert origin.stats.parts_reused == 1
    assert await _read(origin, key + "2", 0, size) == old


class _FailingBytes(io.BytesIO):
    def __init__(self, data: bytes, fail_at: int, before_failing: Any) -> None:
        super().__init__(data)
        self.fail_at = fail_at
        self.before_failing = before_failing

    def read(self, n: int | None = -1) -> bytes:
        if self.tell() + (n or 1) > self.fail_at:
            self.before_failing()
            raise OSError("source went away")
        return super().read(n)


async def test_parallel_part_uploads_bound_memory(origin: S3Origin, monkeypatch: pytest.MonkeyPatch) -> None:
    """At most `parallel_parts` parts are read ahead of their uploads."""
    origin.segment_size = 5 * MiB
    size = 6 * 5 * MiB
    data = os.urandom(size)
    in_memory = 0
    peak = 0
    lock = threading.Lock()
    real_upload = origin._upload_part

    class Counting(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:
            nonlocal in_memory, peak
            piece = super().read(n)
            with lock:
                in_memory += 1
                peak = max(peak, in_memory)
            return piece

    async def upload(*args: Any) -> str:
        nonlocal in_memory
        try:
            await trio.sleep(0.05)  # slow store: the reader must wait for a free slot
            return await real_upload(*args)
        finally:
            with lock:
                in_memory -= 1

    monkeypatch.setattr(origin, "_upload_part", upload)
    await origin.put_blob("p2pimg/blobs/sha256/many", lambda: Counting(data), size)
    assert peak == origin.parallel_parts
    assert await _read(origin, "p2pimg/blobs/sha256/many", size - 5, 5) == data[-5:]


# -- the CLI end to end --------------------------------------------------------------------------


def test_publish_and_resolve_cli(moto: Moto, bucket: str, sample: SampleImage, tmp_path: Path) -> None:
    url = f"s3://{bucket}/pfx?endpoint={moto.endpoint}"
    env = {**os.environ, "P2PIMG_HOME": str(tmp_path / "home")}

    def p2pimg(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "p2pimg", *args, "--origin", url],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    root = p2pimg("publish", f"oci:{sample.path}:1", "demo/app:1")
    assert root.startswith("b")
    env["P2PIMG_HOME"] = str(tmp_path / "elsewhere")  # a fresh cache: the tag comes from S3
    assert p2pimg("resolve", "demo/app:1") == root
    keys = [o["Key"] for o in moto.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert "pfx/p2pimg/tags/demo/app/1" in keys
    assert any(k.startswith("pfx/p2pimg/blobs/sha256/") for k in keys)


class _DatedByInitiation(S3Origin):
    """S3 as AWS dates a multipart object: by when its upload was *initiated*. moto dates it by
    its completion (its CompleteMultipartUpload stores a new key, dated then), so this listing
    reports, for an object completed from an upload, the initiation time recorded here; the test
    places it two hours back, as for an upload resumed long after its first attempt."""

    initiated: dict[str, float]

    async def _create_upload(self, key: str, bucket_key: str) -> str:
        self.initiated[key] = time.time() - 7200
        return await super()._create_upload(key, bucket_key)

    async def list_info(self, prefix: str) -> list[Any]:
        from p2pimg.sources.origins.base import ObjectInfo

        return [
            ObjectInfo(i.key, self.initiated.get(i.key, i.modified)) for i in await super().list_info(prefix)
        ]


async def test_gc_dates_a_multipart_object_by_its_completion_stamp(moto: Moto, bucket: str) -> None:
    from p2pimg.ops import admin
    from p2pimg.sources.origins.multipart import completion_key

    origin = _DatedByInitiation(f"s3://{bucket}/pfx?endpoint={moto.endpoint}")
    origin.initiated = {}
    origin.segment_size = 5 * MiB  # S3's smallest part: three parts
    data = os.urandom(11 * MiB)
    key = "p2pimg/blobs/sha256/" + hashlib.sha256(data).hexdigest()
    try:
        await origin.put_blob(key, lambda: io.BytesIO(data), len(data))
        assert origin.stats.parts_uploaded == 3 and key in origin.initiated
        stamp = completion_key(key)
        assert await origin.exists(stamp)
        listed = {i.key: i.modified for i in await origin.list_info("p2pimg/")}
        assert time.time() - listed[key] > admin.DEFAULT_GRACE  # dated by its initiation: "old"
        plan = await admin.plan_gc(origin)
        assert plan.garbage == [] and plan.young == [key, stamp]  # young by its stamp
        later = await admin.plan_gc(origin, now=time.time() + admin.DEFAULT_GRACE + 60)
        assert later.garbage == [key, stamp]
        orphan = completion_key("p2pimg/blobs/sha256/" + "ee" * 32)
        await origin.put_bytes(orphan, b"")  # an upload that never completed
        later = await admin.plan_gc(origin, now=time.time() + admin.DEFAULT_GRACE + 60)
        assert later.garbage == [key, stamp, orphan]
        assert await admin.run_gc(origin, later) == 3
        assert await origin.list("p2pimg/") == []
    finally:
        await origin.aclose()
