"""`s3://BUCKET[/PREFIX]?endpoint=URL[&region=R]`: an origin in any S3 store (Storj's gateway included).

Requests go path-style (`endpoint/bucket/key`) through httpx and are signed with botocore's SigV4.
Large blobs are uploaded as resumable multipart uploads (`multipart.upload_multipart`), one part
per 64 MiB segment, each sent with its Content-MD5, which is also its ETag.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Mapping
from typing import NoReturn
from urllib.parse import quote, unquote, urlsplit

import httpx
import trio
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from p2pimg.errors import InvalidInput, OriginError, OriginNotFound
from p2pimg.sources.httpbody import read_capped
from p2pimg.sources.origins.base import BlobReader, ObjectInfo, Origin, iso_seconds, open_source, read_source
from p2pimg.sources.origins.multipart import (
    MultipartBackend,
    Part,
    StoredPart,
    UploadStats,
    completion_key,
    part_count,
    upload_multipart,
)
from p2pimg.sources.origins.s3url import S3Location, credentials_from_env, parse_s3_url

# Keys are restricted to characters that need no URI encoding, so the canonical path SigV4 signs
# is the path httpx sends, whichever normalization a signer applies.
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*/?$")

_UNSIGNED = "UNSIGNED-PAYLOAD"
_PIECE = 1 << 20  # bytes per read from a source while streaming a single PUT
_MAX_PARTS = 10_000  # S3's limit on parts in one multipart upload
_ERROR_BODY_CAP = 64 << 10
# A ListObjectsV2 page holds at most 1000 keys of at most 1 KiB each plus metadata: ~1.5 MB.
_LISTING_CAP = 8 << 20
_MAX_LISTING_PAGES = 100  # of in-progress uploads for one key: more means something is wrong


def _md5(data: bytes) -> bytes:
    return hashlib.md5(data, usedforsecurity=False).digest()


def _query(params: Mapping[str, str]) -> str:
    # Encoded the way SigV4 canonicalizes it, so the query botocore signs is the one sent.
    return "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(params.items()))


def _xml(body: bytes, what: str) -> ET.Element:
    # The stdlib parser expands internal entities; no S3 response has a DTD, so refuse any.
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise OriginError(f"{what}: unexpected DTD in the response")
    try:
        return ET.fromstring(body)
    except ET.ParseError as exc:
        raise OriginError(f"{what}: malformed XML response ({exc})") from None


def _local(elem: ET.Element) -> str:
    return elem.tag.rpartition("}")[2]


def _text(elem: ET.Element, name: str) -> str | None:
    child = elem.find(f"{{*}}{name}")  # any namespace: S3's, or none from some gateways
    return None if child is None else (child.text or "")


def _truncated(elem: ET.Element) -> bool:
    return (_text(elem, "IsTruncated") or "").strip().lower() == "true"


class S3Origin(Origin):
    """An origin in an S3 bucket, under an optional key prefix."""

    segment_size: int = 64 << 20  # one multipart part; on Storj one part is one segment
    parallel_parts = 2  # parts uploaded at once: memory stays at this many parts
    max_connections = 32  # enough for parallel ranged reads of several blobs
    list_page_size = 1000  # keys per ListObjectsV2 page (S3's maximum)

    def __init__(self, location: S3Location | str, *, credentials: Credentials | None = None) -> None:
        self.location = parse_s3_url(location) if isinstance(location, str) else location
        self.url = self.location.url
        self._credentials = credentials or credentials_from_env()
        self._signer = SigV4Auth(self._credentials, "s3", self.location.region)
        self._host = urlsplit(self.location.endpoint).netloc
        self._bucket_url = f"{self.location.endpoint}/{self.location.bucket}"
        self._client: httpx.AsyncClient | None = None
        self._client_run: object = None
        self.stats = UploadStats()

    # -- plumbing --------------------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        run = trio.lowlevel.current_trio_token()
        if self._client is None or self._client_run is not run:
            # Pooled connections belong to the trio run that opened them, and the CLI may call
            # trio.run more than once with one origin: each run gets its own client.
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(60.0, connect=10.0),
                limits=httpx.Limits(
                    max_connections=self.max_connections, max_keepalive_connections=self.max_connections
                ),
                # Ranged reads must come back byte for byte, never transfer-decoded.
                headers={"Accept-Encoding": "identity"},
            )
            self._client_run = run
        return self._client

    def prepare(self) -> None:
        self._http()

    def _key(self, key: str, *, prefix: bool = False) -> str:
        """The bucket key of an origin key (or of a listing prefix, which ends with '/')."""
        if not _KEY_RE.match(key) or key.endswith("/") != prefix or ".." in key.split("/"):
            raise InvalidInput(f"invalid origin key {key[:100]!r}")
        return f"{self.location.prefix}/{key}" if self.location.prefix else key

    def _sign(self, method: str, url: str, headers: Mapping[str, str], payload_hash: str) -> dict[str, str]:
        request = AWSRequest(
            method=method,
            url=url,
            headers={**headers, "Host": self._host, "X-Amz-Content-SHA256": payload_hash},
        )
        self._signer.add_auth(request)
        return dict(request.headers.items())

    @contextlib.asynccontextmanager
    async def _request(
        self,
        method: str,
        bucket_key: str | None,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | AsyncIterator[bytes] = b"",
        payload_hash: str | None = None,
        content_length: int | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """A signed request whose response streams; transport failures become OriginError."""
        url = self._bucket_url + (f"/{bucket_key}" if bucket_key is not None else "")
        if params:
            url += "?" + _query(params)
        if payload_hash is None:
            payload_hash = hashlib.sha256(body).hexdigest() if isinstance(body, bytes) else _UNSIGNED
        signed = self._sign(method, url, headers or {}, payload_hash)
        if content_length is not None:
            # Sent unsigned: S3 needs a length for a streamed body (it takes no chunked uploads).
            signed["Content-Length"] = str(content_length)
        where = f"{method} {bucket_key or self.location.bucket} at {self.location.endpoint}"
        try:
            async with self._http().stream(method, url, headers=signed, content=body) as response:
                yield response
        except httpx.HTTPError as exc:
            raise OriginError(f"{where} failed: {type(exc).__name__}: {exc}") from None

    async def _read_capped(self, response: httpx.Response, cap: int, what: str) -> bytes:
        """An XML document from the store (decoded, should it come compressed), within `cap`."""
        data = await read_capped(response, cap, decoded=True)
        if data is None:
            raise OriginError(f"{what}: response exceeds {cap} bytes")
        return data

    async def _fail(self, response: httpx.Response, what: str, key: str | None = None) -> NoReturn:
        """Raise the error an unexpected response stands for: OriginNotFound for a missing key."""
        code = message = ""
        with contextlib.suppress(OriginError):
            body = await self._read_capped(response, _ERROR_BODY_CAP, what)
            if body.strip():
                root = _xml(body, what)
                code, message = _text(root, "Code") or "", _text(root, "Message") or ""
        status = response.status_code
        if key is not None and status == 404 and code in ("", "NoSuchKey"):
            raise OriginNotFound(f"origin has no {key}")
        if code == "NoSuchBucket":
            raise OriginError(f"bucket {self.location.bucket!r} does not exist at {self.location.endpoint}")
        detail = ": ".join(p for p in (code, message) if p) or response.reason_phrase.capitalize()
        if status == 403:
            detail += " (check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and the region)"
        raise OriginError(f"{what} on {self.url}: HTTP {status} {detail}")

    # -- reads -----------------------------------------------------------------------------

    def read_range(self, key: str, offset: int, length: int) -> AsyncIterator[bytes]:
        return self._read(key, offset, length, shorter=False)

    def read_head(self, key: str, length: int) -> AsyncIterator[bytes]:
        return self._read(key, 0, length, shorter=True)

    async def _read(self, key: str, offset: int, length: int, *, shorter: bool) -> AsyncIterator[bytes]:
        """Bytes [offset, offset+length) of `key`; fewer if `shorter` and the object ends before."""
        if offset < 0 or length < 0:
            raise InvalidInput(f"invalid range {offset}+{length} of {key}")
        bucket_key = self._key(key)
        if length == 0:
            return
        last = offset + length - 1
        what = f"reading {key} [{offset}, {offset + length})"
        async with self._request("GET", bucket_key, headers={"Range": f"bytes={offset}-{last}"}) as response:
            if response.status_code == 206:
                content_range = response.headers.get("Content-Range", "")
                match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", content_range.strip())
                if not match or int(match[1]) != offset or int(match[2]) > last:
                    raise OriginError(f"{what}: unexpected Content-Range {content_range[:100]!r}")
                if int(match[2]) != last and not shorter:
                    raise OriginError(f"{key} in {self.url} is shorter than expected")
                length = int(match[2]) - offset + 1
            elif response.status_code == 200:
                # A store may ignore Range; that is only usable when the whole object was asked for.
                size = response.headers.get("Content-Length", "")
                if offset != 0 or not (
                    size == str(length) or (shorter and size.isdigit() and int(size) < length)
                ):
                    raise OriginError(f"{what}: the store ignored the Range header")
                length = int(size)
            elif response.status_code == 416 and shorter and offset == 0:
                return  # an empty object: no byte to read
            else:
                await self._fail(response, what, key)
            received = 0
            # Raw: bytes as stored, never decoded by httpx whatever Content-Encoding an object has.
            async for piece in response.aiter_raw():
                received += len(piece)
                if received > length:
                    raise OriginError(f"{what}: the store sent more bytes than asked for")
                yield piece
            if received != length:
                raise OriginError(f"{what}: the store sent {received} bytes")

    async def get(self, key: str, *, max_size: int) -> bytes:
        what = f"reading {key}"
        async with self._request("GET", self._key(key)) as response:
            if response.status_code != 200:
                await self._fail(response, what, key)
            data = await read_capped(response, max_size)
            if data is None:
                raise OriginError(f"{key} in {self.url} exceeds {max_size} bytes")
            return data

    async def exists(self, key: str) -> bool:
        async with self._request("HEAD", self._key(key)) as response:
            if response.status_code == 200:
                return True
            if response.status_code == 404:
                return False
            await self._fail(response, f"checking {key}")

    async def _size(self, bucket_key: str, key: str) -> int:
        async with self._request("HEAD", bucket_key) as response:
            if response.status_code != 200:
                await self._fail(response, f"checking {key}", key)
            declared = response.headers.get("Content-Length", "")
            if not declared.isdigit():
                raise OriginError(f"checking {key}: no Content-Length in the response")
            return int(declared)

    async def list_info(self, prefix: str) -> list[ObjectInfo]:
        listed = await self._listing(prefix)
        if undated := [key for key, modified in listed if modified is None]:
            raise OriginError(f"listing {prefix}: no valid LastModified for {undated[0][:100]!r}")
        return [ObjectInfo(key, modified) for key, modified in listed if modified is not None]

    async def _listing(self, prefix: str) -> list[tuple[str, float | None]]:
        """(key, LastModified) of the objects below `prefix`, sorted."""
        bucket_prefix = self._key(prefix, prefix=True)
        strip = len(bucket_prefix) - len(prefix)
        what = f"listing {prefix}"
        keys: list[tuple[str, float | None]] = []
        token: str | None = None
        seen: set[str] = set()
        while True:
            # encoding-type=url: a foreign key with characters XML 1.0 cannot carry still parses.
            params = {
                "list-type": "2",
                "prefix": bucket_prefix,
                "encoding-type": "url",
                "max-keys": str(self.list_page_size),
            }
            if token is not None:
                params["continuation-token"] = token
            async with self._request("GET", None, params=params) as response:
                if response.status_code != 200:
                    await self._fail(response, what)
                root = _xml(await self._read_capped(response, _LISTING_CAP, what), what)
            if _local(root) != "ListBucketResult":
                raise OriginError(f"{what}: unexpected response <{_local(root)[:40]}>")
            url_encoded = (_text(root, "EncodingType") or "").lower() == "url"
            for contents in root.iterfind("{*}Contents"):
                name = _text(contents, "Key") or ""
                name = unquote(name) if url_encoded else name
                if name.startswith(bucket_prefix):
                    keys.append((name[strip:], iso_seconds(_text(contents, "LastModified"))))
            if not _truncated(root):
                break
            token = _text(root, "NextContinuationToken")
            if not token or token in seen:
                raise OriginError(f"{what}: truncated listing without a new continuation token")
            seen.add(token)
        return sorted(keys, key=lambda listed: listed[0])

    async def list(self, prefix: str) -> list[str]:
        return [key for key, _modified in await self._listing(prefix)]

    # -- writes ----------------------------------------------------------------------------

    async def put_bytes(self, key: str, data: bytes) -> None:
        headers = {"Content-MD5": base64.b64encode(_md5(data)).decode()}
        async with self._request("PUT", self._key(key), headers=headers, body=data) as response:
            if response.status_code != 200:
                await self._fail(response, f"writing {key}")

    async def delete(self, key: str) -> None:
        async with self._request("DELETE", self._key(key)) as response:
            if response.status_code not in (200, 204, 404):
                await self._fail(response, f"deleting {key}")

    async def put_blob(self, key: str, open_reader: BlobReader, size: int) -> None:
        bucket_key = self._key(key)
        if size <= self.segment_size:
            await self._put_single(key, bucket_key, open_reader, size)
        else:
            await self._put_multipart(key, bucket_key, open_reader, size)
        stored = await self._size(bucket_key, key)
        if stored != size:
            raise OriginError(f"{key} in {self.url} has {stored} bytes after upload, expected {size}")

    async def _put_single(self, key: str, bucket_key: str, open_reader: BlobReader, size: int) -> None:
        # Content-MD5 must go in the headers, before the body: a first pass hashes the source, the
        # second streams it, so memory stays at one piece and the store checks what it received.
        def md5_of_source() -> bytes:
            md5 = hashlib.md5(usedforsecurity=False)
            with open_source(open_reader, key, self.url) as src:
                remaining = size
                while remaining:
                    piece = read_source(src, min(_PIECE, remaining), key, self.url)
                    md5.update(piece)
                    remaining -= len(piece)
            return md5.digest()

        digest = await trio.to_thread.run_sync(md5_of_source)

        async def body() -> AsyncIterator[bytes]:
            md5 = hashlib.md5(usedforsecurity=False)
            src = await trio.to_thread.run_sync(open_source, open_reader, key, self.url)
            try:
                remaining = size
                while remaining:
                    piece = await trio.to_thread.run_sync(
                        read_source, src, min(_PIECE, remaining), key, self.url
                    )
                    md5.update(piece)
                    remaining -= len(piece)
                    # Checked before the last piece goes out: a source that changed between the
                    # passes leaves the request unfinished, so no store can keep it, checking or not.
                    if not remaining and md5.digest() != digest:
                        raise OriginError(f"the source of {key} changed while it was uploaded")
                    yield piece
            finally:
                with trio.CancelScope(shield=True):  # closed even when cancelled
                    await trio.to_thread.run_sync(src.close)

        headers = {"Content-MD5": base64.b64encode(digest).decode()}
        async with self._request(
            "PUT", bucket_key, headers=headers, body=body(), payload_hash=_UNSIGNED, content_length=size
        ) as response:
            if response.status_code != 200:
                await self._fail(response, f"writing {key}")
        self.stats.parts_uploaded += 1
        self.stats.bytes_uploaded += size

    async def _put_multipart(self, key: str, bucket_key: str, open_reader: BlobReader, size: int) -> None:
        part_size = self.segment_size
        if part_count(size, part_size) > _MAX_PARTS:
            raise OriginError(f"{key}: {size} bytes need more than {_MAX_PARTS} parts of {part_size}")
        await upload_multipart(
            _S3Upload(self, key, bucket_key),
            open_reader,
            size,
            part_size,
            key=key,
            url=self.url,
            parallel=self.parallel_parts,
            stats=self.stats,
        )

    async def _find_upload(self, key: str, bucket_key: str) -> tuple[str, dict[int, StoredPart]] | None:
        """The newest in-progress upload of exactly this key with its parts, if there is one."""
        what = f"looking for an upload of {key} to resume"
        newest: tuple[float, str] | None = None
        markers: dict[str, str] = {}
        for _page in range(_MAX_LISTING_PAGES):
            params = {"uploads": "", "prefix": bucket_key, **markers}
            async with self._request("GET", None, params=params) as response:
                if response.status_code != 200:
                    await self._fail(response, what)
                root = _xml(await self._read_capped(response, _LISTING_CAP, what), what)
            for upload in root.iterfind("{*}Upload"):
                upload_id = _text(upload, "UploadId")
                if _text(upload, "Key") != bucket_key or not upload_id:
                    continue
                started = iso_seconds(_text(upload, "Initiated"))
                if started is None:
                    continue
                # `>=`: S3 lists one key's uploads oldest first, so on equal times the later wins.
                if newest is None or started >= newest[0]:
                    newest = (started, upload_id)
            next_markers = {
                "key-marker": _text(root, "NextKeyMarker") or "",
                "upload-id-marker": _text(root, "NextUploadIdMarker") or "",
            }
            if not _truncated(root) or next_markers == markers:
                break
            markers = next_markers
        if newest is None:
            return None
        parts = await self._list_parts(key, bucket_key, newest[1])
        return None if parts is None else (newest[1], parts)

    async def _list_parts(self, key: str, bucket_key: str, upload_id: str) -> dict[int, StoredPart] | None:
        """Parts of an upload, or None if it is gone (completed or aborted meanwhile)."""
        what = f"listing uploaded parts of {key}"
        parts: dict[int, StoredPart] = {}
        marker = "0"
        for _page in range(_MAX_PARTS // 1000 + 1):
            params = {"uploadId": upload_id, "part-number-marker": marker}
            async with self._request("GET", bucket_key, params=params) as response:
                if response.status_code == 404:
                    return None
                if response.status_code != 200:
                    await self._fail(response, what)
                root = _xml(await self._read_capped(response, _LISTING_CAP, what), what)
            for part in root.iterfind("{*}Part"):
                number, part_size = _text(part, "PartNumber") or "", _text(part, "Size") or ""
                if number.isdigit() and part_size.isdigit():
                    parts[int(number)] = StoredPart(int(part_size), _text(part, "ETag") or "")
            next_marker = _text(root, "NextPartNumberMarker") or ""
            if not _truncated(root) or not next_marker.isdigit() or int(next_marker) <= int(marker):
                break
            marker = next_marker
        return parts

    async def _create_upload(self, key: str, bucket_key: str) -> str:
        what = f"starting an upload of {key}"
        async with self._request("POST", bucket_key, params={"uploads": ""}) as response:
            if response.status_code != 200:
                await self._fail(response, what)
            root = _xml(await self._read_capped(response, _ERROR_BODY_CAP, what), what)
        upload_id = _text(root, "UploadId")
        if not upload_id:
            raise OriginError(f"{what}: no UploadId in the response")
        return upload_id

    async def _upload_part(
        self, key: str, bucket_key: str, upload_id: str, number: int, data: bytes, md5: bytes
    ) -> str:
        params = {"partNumber": str(number), "uploadId": upload_id}
        # Content-MD5 lets the store refuse a damaged part; hashing 64 MiB again for a signed
        # payload would add nothing but CPU time.
        headers = {"Content-MD5": base64.b64encode(md5).decode()}
        async with self._request(
            "PUT", bucket_key, params=params, headers=headers, body=data, payload_hash=_UNSIGNED
        ) as response:
            if response.status_code != 200:
                await self._fail(response, f"uploading part {number} of {key}")
            etag: str | None = response.headers.get("ETag")
        if not etag:
            raise OriginError(f"uploading part {number} of {key}: no ETag in the response")
        return etag

    async def _complete_upload(
        self, key: str, bucket_key: str, upload_id: str, etags: dict[int, str]
    ) -> None:
        what = f"completing the upload of {key}"
        root = ET.Element("CompleteMultipartUpload", xmlns="http://s3.amazonaws.com/doc/2006-03-01/")
        for number in sorted(etags):
            part = ET.SubElement(root, "Part")
            ET.SubElement(part, "PartNumber").text = str(number)
            ET.SubElement(part, "ETag").text = etags[number]
        body = ET.tostring(root, encoding="utf-8", xml_declaration=False)
        async with self._request(
            "POST",
            bucket_key,
            params={"uploadId": upload_id},
            headers={"Content-Type": "application/xml"},
            body=body,
        ) as response:
            if response.status_code != 200:
                await self._fail(response, what)
            # S3 may answer 200 and still fail: the error then is the body.
            result = _xml(await self._read_capped(response, _ERROR_BODY_CAP, what), what)
        if _local(result) == "Error":
            detail = ": ".join(p for p in (_text(result, "Code"), _text(result, "Message")) if p)
            raise OriginError(f"{what} on {self.url}: {detail}")

    async def aclose(self) -> None:
        client, self._client = self._client, None
        # A client from an earlier trio run cannot be closed from this one; its sockets are dropped.
        if client is not None and self._client_run is trio.lowlevel.current_trio_token():
            await client.aclose()


class _S3Upload(MultipartBackend):
    """One key's multipart upload, for `upload_multipart`: parts carry their MD5 as Content-MD5,
    which lets the store refuse a damaged part, and is the ETag S3 lists for it."""

    def __init__(self, origin: S3Origin, key: str, bucket_key: str) -> None:
        self.origin, self.key, self.bucket_key = origin, key, bucket_key

    async def find(self) -> tuple[str, dict[int, StoredPart]] | None:
        return await self.origin._find_upload(self.key, self.bucket_key)

    async def begin(self) -> str:
        return await self.origin._create_upload(self.key, self.bucket_key)

    def etag_of(self, data: bytes) -> str:
        return _md5(data).hex()

    async def send(self, upload_id: str, part: Part, data: bytes, etag: str) -> str:
        return await self.origin._upload_part(
            self.key, self.bucket_key, upload_id, part.number, data, bytes.fromhex(etag)
        )

    async def stamp_completion(self) -> None:
        await self.origin.put_bytes(completion_key(self.key), b"")

    async def complete(self, upload_id: str, etags: dict[int, str]) -> None:
        await self.origin._complete_upload(self.key, self.bucket_key, upload_id, etags)
