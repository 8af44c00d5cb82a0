"""Reading a response body from another machine without trusting its size."""

from __future__ import annotations

import httpx


async def read_capped(
    response: httpx.Response, limit: int, *, decoded: bool = False, truncate: bool = False
) -> bytes | None:
    """The body of a streamed response, never more than `limit` bytes of it in memory.

    None as soon as the body is (or its Content-Length says it will be) longer than `limit`; with
    `truncate`, its first `limit` bytes instead. Bytes stay as sent unless `decoded` (documents a
    server may have compressed with a Content-Encoding)."""
    declared = response.headers.get("content-length", "")
    if not truncate and declared.isdigit() and int(declared) > limit:
        return None
    data = bytearray()
    async for piece in response.aiter_bytes() if decoded else response.aiter_raw():
        data += piece
        if len(data) > limit:
            return bytes(data[:limit]) if truncate else None
    return bytes(data)
