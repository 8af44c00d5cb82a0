"""Publish inputs: OCI image layouts, `docker save` archives and images in a registry, read as an
image graph.

Every manifest and index is kept as its exact bytes (digests never change), and every other
blob as something that can be opened and streamed. Nothing here writes anywhere; nothing holds
a layer in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tarfile
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, cast

import trio

from p2pimg.content.cid import digest_of, parse_digest
from p2pimg.content.graph import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    SourceBlob,
    SourceImage,
    descriptor,
    graph_walk,
    parse_json,
    walk_graph,
)
from p2pimg.content.model import MAX_MANIFEST_SIZE
from p2pimg.content.referrers import add_referrers, is_referrers_tag, layout_manifests, manifest_subject
from p2pimg.errors import SourceInvalid

if TYPE_CHECKING:
    from p2pimg.sources.upstream.client import UpstreamClient, UpstreamManifest

_REF_ANNOTATION = "org.opencontainers.image.ref.name"
_MAX_INDEX_JSON = 4 << 20
_MAX_ARCHIVE_MANIFEST = 1 << 20


def read_oci_layout(spec: str) -> SourceImage:
    """`DIR[:TAG]`: an OCI image layout; the tag is the `ref.name` annotation in index.json.

    The manifests of the layout whose `subject` is one of the image's manifests (signatures, SBOMs,
    attestations that oras, cosign or a build tool put there) come with the image as its referrers.
    """
    path, tag = Path(spec), ""
    if not (path / "index.json").is_file() and ":" in spec:
        head, _, tag = spec.rpartition(":")
        path = Path(head)
    if not path.is_dir():
        raise SourceInvalid(f"OCI layout {str(path)!r} does not exist")
    if not (path / "oci-layout").is_file() or not (path / "index.json").is_file():
        raise SourceInvalid(f"{str(path)!r} is not an OCI image layout (no oci-layout/index.json)")
    raw = (path / "index.json").read_bytes()[: _MAX_INDEX_JSON + 1]
    if len(raw) > _MAX_INDEX_JSON:
        raise SourceInvalid("index.json is too large")
    index = parse_json(raw, "index.json")
    entries = index.get("manifests")
    if not isinstance(entries, list) or not entries:
        raise SourceInvalid(f"{str(path)!r}: index.json lists no images")
    if tag:
        chosen = [
            e
            for e in entries
            if isinstance(e, dict) and (e.get("annotations") or {}).get(_REF_ANNOTATION) == tag
        ]
        if not chosen:
            known = sorted(
                {
                    str((e.get("annotations") or {}).get(_REF_ANNOTATION))
                    for e in entries
                    if isinstance(e, dict)
                }
                - {"None"}
            )
            raise SourceInvalid(
                f"OCI layout has no image tagged {tag!r} (tags: {', '.join(known) or 'none'})"
            )
    blobs_dir = path / "blobs" / "sha256"

    def blob_path(digest: str, size: int) -> Path:
        p = blobs_dir / parse_digest(digest)
        if not p.is_file():
            raise SourceInvalid(f"OCI layout is missing blob {digest}")
        if size >= 0 and p.stat().st_size != size:
            raise SourceInvalid(f"blob {digest} has {p.stat().st_size} bytes, descriptor says {size}")
        return p

    def read_manifest(digest: str, size: int) -> bytes:
        p = blob_path(digest, size)
        if p.stat().st_size > MAX_MANIFEST_SIZE:
            raise SourceInvalid(f"manifest {digest} exceeds {MAX_MANIFEST_SIZE} bytes")
        return p.read_bytes()

    def blob(digest: str, size: int) -> SourceBlob:
        p = blob_path(digest, size)
        return SourceBlob(digest, size, lambda: open(p, "rb"))

    described = [descriptor(e, "index.json") for e in entries]
    manifests = None  # every manifest the layout holds, read once, when they are needed
    if not tag and len(entries) == 1:
        chosen = entries
    elif not tag:
        # The image is the one entry that is not a referrer (nor a referrers tag schema index).
        manifests = layout_manifests(described, read_manifest)
        chosen = [
            e
            for e, (digest, _, _) in zip(entries, described, strict=True)
            if digest in manifests
            and manifest_subject(manifests[digest][2], digest) is None
            and not is_referrers_tag(str((e.get("annotations") or {}).get(_REF_ANNOTATION, "")))
        ]
        if len(chosen) != 1:
            raise SourceInvalid(f"OCI layout holds {len(chosen)} images: name one as oci:DIR:TAG")
    top, _, media = descriptor(chosen[0], "index.json")
    image = walk_graph(top, media, read_manifest, blob)
    # Its referrers: the layout's manifests whose subject is one of its manifests.
    add_referrers(image, manifests or layout_manifests(described, read_manifest), read_manifest, blob)
    return image


# -- docker save archives ------------------------------------------------------------------


def _compression(head: bytes) -> str:
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    return "none"


def read_docker_archive(spec: str) -> SourceImage:
    """`FILE[:NAME:TAG]`: a `docker save` tarball, given a Docker schema 2 manifest as skopeo does."""
    path, want = Path(spec), ""
    if not path.is_file() and ":" in spec:
        head, _, rest = spec.partition(":")
        path, want = Path(head), rest
    if not path.is_file():
        raise SourceInvalid(f"docker archive {str(path)!r} does not exist")
    try:
        tar = tarfile.open(path)  # noqa: SIM115 - closed by the `with tar:` below
    except (tarfile.TarError, OSError) as exc:
        # tarfile's own message lists every compression it tried, one line each: keep the gist.
        why = str(exc).splitlines()[0].rstrip(":") if str(exc) else type(exc).__name__
        raise SourceInvalid(f"{str(path)!r} is not a tar archive ({why})") from None
    with tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers()}

        def member(name: str) -> tarfile.TarInfo:
            m = members.get(name)
            if m is None or not m.isfile():
                raise SourceInvalid(f"docker archive has no file {name!r}")
            return m

        def read_small(name: str, limit: int) -> bytes:
            m = member(name)
            if m.size > limit:
                raise SourceInvalid(f"{name!r} in the archive is too large")
            f = tar.extractfile(m)
            assert f is not None
            return f.read()

        try:
            listing = (
                json.loads(read_small("manifest.json", _MAX_ARCHIVE_MANIFEST) or b"null")
                if "manifest.json" in members
                else None
            )
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise SourceInvalid(f"{str(path)!r}: manifest.json is not valid JSON") from None
        if not isinstance(listing, list) or not listing:
            raise SourceInvalid(f"{str(path)!r} is not a docker save archive (no manifest.json)")
        if want:
            chosen = [e for e in listing if isinstance(e, dict) and want in (e.get("RepoTags") or [])]
            if not chosen:
                raise SourceInvalid(f"docker archive has no image {want!r}")
        elif len(listing) == 1:
            chosen = listing
        else:
            raise SourceInvalid(
                f"docker archive holds {len(listing)} images: name one as docker-archive:FILE:NAME:TAG"
            )
        entry = chosen[0]
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("Config"), str)
            or not isinstance(entry.get("Layers"), list)
        ):
            raise SourceInvalid("docker archive manifest.json entry needs Config and Layers")
        config = read_small(entry["Config"], MAX_MANIFEST_SIZE)
        parse_json(config, "image config")
        layers = []
        for name in entry["Layers"]:
            if not isinstance(name, str):
                raise SourceInvalid("docker archive manifest.json has a non-string layer")
            m = member(name)
            f = tar.extractfile(m)
            assert f is not None
            kind = _compression(f.read(4))
            h = hashlib.sha256()
            f.seek(0)
            while piece := f.read(1 << 20):
                h.update(piece)
            layers.append((name, m.size, "sha256:" + h.hexdigest(), DOCKER_LAYER[kind]))

    def opener(name: str) -> Callable[[], BinaryIO]:
        def open_member() -> BinaryIO:
            t = tarfile.open(path)  # noqa: SIM115 - owned and closed by the returned stream
            f = t.extractfile(t.getmember(members[name].name))
            assert f is not None
            return cast(BinaryIO, _Closing(f, t))

        return open_member

    config_digest = digest_of(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "size": len(config), "digest": config_digest},
        "layers": [{"mediaType": media, "size": size, "digest": digest} for _, size, digest, media in layers],
    }
    data = json.dumps(manifest, indent=3).encode()
    image = SourceImage(top=digest_of(data))
    image.manifests[image.top] = (data, DOCKER_MANIFEST)
    image.blobs[config_digest] = SourceBlob(config_digest, len(config), lambda: io.BytesIO(config))
    for name, size, digest, _ in layers:
        image.blobs.setdefault(digest, SourceBlob(digest, size, opener(name)))
    return image


class _Closing(io.RawIOBase):
    """A tar member stream that also closes its archive."""

    def __init__(self, f: IO[bytes], tar: tarfile.TarFile) -> None:
        self._f, self._tar = f, tar

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self._f.read(size)

    def readinto(self, b: Any) -> int:
        data = self._f.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._tar.close()
        super().close()


def read_source(spec: str) -> SourceImage:
    """Read a file SOURCE: `oci:DIR[:TAG]` or `docker-archive:FILE[:NAME:TAG]` (blocking: run it in a
    thread)."""
    transport, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise SourceInvalid(
            f"invalid source {spec!r}: expected oci:DIR[:TAG], "
            "docker-archive:FILE[:NAME:TAG] or docker://HOST/REPO:TAG"
        )
    if transport == "oci":
        return read_oci_layout(rest)
    if transport == "docker-archive":
        return read_docker_archive(rest)
    if transport == "docker":
        raise SourceInvalid(f"{spec[:200]!r} is in a registry: it is read by open_source, on trio")
    raise SourceInvalid(f"unsupported source transport {transport!r}: expected oci, docker-archive or docker")


@contextlib.asynccontextmanager
async def open_source(
    spec: str, *, docker_config: Path | None = None, plain_http: bool | None = None, timeout: float = 30.0
) -> AsyncIterator[SourceImage]:
    """A publish SOURCE as an image graph, usable until the block ends: `oci:DIR[:TAG]`,
    `docker-archive:FILE[:NAME:TAG]` or `docker://HOST/REPO:TAG` (whose blobs stream from the registry
    while the block runs). The registry options only apply to `docker://`."""
    transport, sep, rest = spec.partition(":")
    if transport == "docker" and sep and rest:
        async with _registry_image(spec, docker_config, plain_http, timeout) as image:
            yield image
    else:
        yield await trio.to_thread.run_sync(read_source, spec)


# -- registries ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _registry_image(
    url: str, docker_config: Path | None, plain_http: bool | None, timeout: float
) -> AsyncIterator[SourceImage]:
    """`docker://HOST/REPO:TAG` (or `@DIGEST`) through the async registry client.

    Every manifest (for an index, every child too) is fetched byte for byte and checked before
    this yields, and so are the image's referrers (`_add_registry_referrers`); a blob is only
    requested when publish opens it, as one streamed, verified GET.
    """
    # The registry client is only needed here: `publish oci:...` never imports httpx.
    from p2pimg.sources.upstream.client import UpstreamClient
    from p2pimg.sources.upstream.refs import parse_image_url

    ref = parse_image_url(url, plain_http=plain_http)
    async with UpstreamClient(ref.base_url, docker_config=docker_config, timeout=timeout) as client:
        top = await client.get_manifest(ref.repo, ref.reference)

        def blob(digest: str, size: int) -> SourceBlob:
            return SourceBlob(
                digest,
                size,
                lambda: cast(BinaryIO, _ThreadedBlob(client.read_blob(ref.repo, digest, size=size))),
            )

        image = await _walk_registry(client, ref.repo, top, blob)
        await _add_registry_referrers(client, ref.repo, image, blob)
        yield image


async def _walk_registry(
    client: UpstreamClient, repo: str, top: UpstreamManifest, blob: Callable[[str, int], SourceBlob]
) -> SourceImage:
    """The graph under `top`: every manifest below it fetched and checked, blobs to be opened."""
    walk = graph_walk(top.digest, top.media_type, blob)
    try:
        digest, size = next(walk)
        while True:
            if digest == top.digest:
                data = top.data
            elif size > MAX_MANIFEST_SIZE:
                raise SourceInvalid(f"manifest {digest} exceeds {MAX_MANIFEST_SIZE} bytes")
            else:
                data = (await client.get_manifest(repo, digest)).data
            digest, size = walk.send(data)
    except StopIteration as stop:
        image: SourceImage = stop.value
    return image


_MAX_REFERRERS = 1000


async def _add_registry_referrers(
    client: UpstreamClient, repo: str, image: SourceImage, blob: Callable[[str, int], SourceBlob]
) -> None:
    """Add to `image` the referrers the registry lists for each of its manifests (signatures,
    SBOMs: through the referrers API, or the referrers tag schema's `sha256-<hex>` tag where the
    registry has no API), each with all it refers to, as `read_oci_layout` does with a layout's;
    also the referrers of a referrer. A listed manifest whose `subject` is not the manifest it is
    listed for (a stale tag schema index) is left out."""
    pending = sorted(image.manifests)
    asked = set(pending)
    added = 0
    while pending:
        subject = pending.pop()
        for digest, size, _media in await client.get_referrers(repo, subject):
            if digest in image.manifests:
                continue
            if size > MAX_MANIFEST_SIZE:
                raise SourceInvalid(f"referrer {digest} exceeds {MAX_MANIFEST_SIZE} bytes")
            added += 1
            if added > _MAX_REFERRERS:
                raise SourceInvalid(f"the image has more than {_MAX_REFERRERS} referrers")
            manifest = await client.get_manifest(repo, digest)
            if manifest_subject(manifest.data, f"manifest {digest}") != subject:
                continue
            graph = await _walk_registry(client, repo, manifest, blob)
            for d, entry in graph.manifests.items():
                image.manifests.setdefault(d, entry)
                if d not in asked:
                    asked.add(d)
                    pending.append(d)
            for d, b in graph.blobs.items():
                image.blobs.setdefault(d, b)
            image.referrers.setdefault(subject, set()).add(digest)


class _ThreadedBlob(io.RawIOBase):
    """A registry blob as a file for publish's worker threads, which hash and upload from files.

    Each read takes the client's next piece on the trio thread (`trio.from_thread.run`, as part
    of the task that started the worker, so cancelling it cancels the read): the blob streams,
    one piece in memory, and its digest is checked before its last piece is handed out.
    """

    def __init__(self, pieces: AsyncGenerator[bytes, None]) -> None:
        self._pieces = pieces
        self._piece = b""
        self._pos = 0
        self._eof = False

    def readable(self) -> bool:
        return True

    async def _next(self) -> bytes | None:
        return await anext(self._pieces, None)

    def _fill(self) -> bool:
        """Whether bytes are at hand, taking the next piece from the client when none are."""
        while self._pos >= len(self._piece):
            if self._eof:
                return False
            piece = trio.from_thread.run(self._next)
            if piece is None:
                self._eof = True
                return False
            self._piece, self._pos = piece, 0
        return True

    def read(self, size: int | None = -1) -> bytes:
        # At most the rest of one piece: an upload asks for a whole 64 MiB part at once, which
        # RawIOBase.read would allocate (and zero) in full for every piece it returns.
        if size is None or size < 0:
            return self.readall()
        if size == 0 or not self._fill():
            return b""
        start = self._pos
        self._pos = min(len(self._piece), start + size)
        return self._piece if start == 0 and self._pos == len(self._piece) else self._piece[start : self._pos]

    def readinto(self, b: Any) -> int:
        if not self._fill():
            return 0
        out = memoryview(b).cast("B")
        n = min(len(out), len(self._piece) - self._pos)
        out[:n] = memoryview(self._piece)[self._pos : self._pos + n]
        self._pos += n
        return n

    async def _aclose(self) -> None:
        # Shielded: the response goes back to the pool, cancelled or not. Its errors are dropped:
        # closing runs after the outcome worth reporting (the bytes, or the error that stopped them).
        with trio.CancelScope(shield=True), contextlib.suppress(Exception):
            await self._pieces.aclose()

    def close(self) -> None:
        if not self.closed:
            try:
                if trio.lowlevel.in_trio_task():
                    # Closed on the trio thread itself, which must not block: a system task closes.
                    trio.lowlevel.spawn_system_task(self._aclose)
                else:
                    trio.from_thread.run(self._aclose)
            except RuntimeError:
                pass  # no trio run to go back to (it has ended): its finalizer has the generator
            finally:
                super().close()
