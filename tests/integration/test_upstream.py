"""The upstream registry client against Debian's `docker-registry` (distribution 2.8) on loopback.

Three real registries: no auth (the shared session fixture), htpasswd basic auth, and token
auth backed by a token service that runs here in a thread. distribution 2.8 verifies a token
against its `rootcertbundle` and must find the signing key from the JWT header: we send the
self-signed certificate as a one-element `x5c` chain (it is its own root in the bundle), sign
RS256, and put the service in `aud` as a plain string (2.8 rejects an `aud` array).

A scripted registry (also a thread) covers what the real one never does: redirects to another
host, lying digests, oversized and schema 1 manifests, rate limits, a Range it ignores.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import secrets
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import bcrypt
import httpx
import pytest
import trio
from conftest import Daemon, free_port, http_status, make_bucket, run_command, start_or_fail
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from p2pimg.cli.clientconfig import containerd_hosts_toml, podman_registries_conf
from p2pimg.content.cid import Cid, digest_of
from p2pimg.content.graph import SourceBlob
from p2pimg.errors import BlobUnknown, ManifestUnknown, NotFound, VerificationError
from p2pimg.node.swarmkey import SwarmAuth
from p2pimg.ops.inputs import open_source
from p2pimg.ops.publish import publish, publish_image
from p2pimg.ops.sample import LayerSpec, write_oci_layout
from p2pimg.sources.origins import FileOrigin, blob_key
from p2pimg.sources.origins.s3 import S3Origin
from p2pimg.sources.upstream.client import UpstreamClient
from p2pimg.sources.upstream.errors import (
    ManifestUnsupported,
    UpstreamAuthError,
    UpstreamError,
    UpstreamRateLimited,
)

if TYPE_CHECKING:
    from conftest import (
        Containerd,
        P2pimgServe,
        Podman,
        PushReference,
        Registry,
        Sample,
        SampleCache,
        Skopeo,
    )

USER, PASSWORD = "alice", "wonderland-7"
SERVICE, ISSUER = "p2pimg-test-registry", "p2pimg-test-token-issuer"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # httpx honours *_PROXY variables; every request here must go straight to 127.0.0.1.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "*")
    # The developer's own ~/.docker/config.json must not change what a test sees (podman reads
    # it too, and insists that it exists).
    empty = tmp_path / "empty-docker-config"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    monkeypatch.setenv("DOCKER_CONFIG", str(empty))


def skopeo_raw(skopeo: Skopeo, ref: str, *flags: str) -> bytes:
    result = skopeo("inspect", "--raw", "--tls-verify=false", *flags, f"docker://{ref}")
    return result.stdout.encode("utf-8", "surrogateescape")  # exact bytes (see run_command)


def push(skopeo: Skopeo, sample: Sample, host: str, repo: str, creds: str | None = None) -> str:
    """Push an OCI-layout sample digest-for-digest to `host/repo:tag`."""
    ref = f"{host}/{repo}:{sample.tag}"
    flags = ["--dest-creds", creds] if creds else []
    all_flag = ["--all"] if sample.is_index else []
    skopeo(
        "copy",
        "--dest-tls-verify=false",
        "--preserve-digests",
        *all_flag,
        *flags,
        f"oci:{sample.path}:{sample.tag}",
        f"docker://{ref}",
    )
    return ref


def write_docker_config(path: Path, key: str, entry: dict[str, str]) -> Path:
    path.write_text(json.dumps({"auths": {key: entry}}))
    return path


def auth_entry(user: str = USER, password: str = PASSWORD) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def sample_manifests(sample: Sample) -> dict[str, bytes]:
    """Every manifest of a sample by digest: the top one and, for an index, its children."""
    _, top = sample.top_manifest()
    out = {digest_of(top): top}
    for desc in json.loads(top).get("manifests", []):
        out[desc["digest"]] = sample.blob(desc["digest"])
    return out


def sample_blobs(sample: Sample) -> dict[str, int]:
    """Config and layer digests of every manifest of a sample, with their sizes."""
    out: dict[str, int] = {}
    for data in sample_manifests(sample).values():
        doc = json.loads(data)
        for desc in [*([doc["config"]] if "config" in doc else []), *doc.get("layers", [])]:
            out[desc["digest"]] = desc["size"]
    return out


async def read_all(
    client: UpstreamClient,
    repo: str,
    digest: str,
    offset: int = 0,
    length: int | None = None,
    *,
    size: int | None = None,
) -> bytes:
    return b"".join([piece async for piece in client.read_blob(repo, digest, offset, length, size=size)])


async def read_source_blob(blob: SourceBlob) -> bytes:
    """A publish source's blob, read whole from a worker thread as publish reads it."""

    def read() -> bytes:
        with blob.open() as f:
            return f.read()

    return await trio.to_thread.run_sync(read)


def start_docker_registry(base: Path, auth_yaml: str) -> tuple[Daemon, str]:
    """docker-registry with an `auth:` section; ready once /v2/ challenges (401)."""
    storage = base / "storage"
    storage.mkdir(parents=True, exist_ok=True)

    def launch(port: int) -> Daemon:
        config = base / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {json.dumps(str(storage))}\n"
            f"http:\n  addr: 127.0.0.1:{port}\n" + auth_yaml
        )
        return Daemon("docker-registry", ["docker-registry", "serve", config], logdir=base)

    daemon, port = start_or_fail(
        "docker-registry with auth did not start",
        "docker-registry",
        launch,
        lambda p: http_status(f"http://127.0.0.1:{p}/v2/") == 401,
    )
    return daemon, f"127.0.0.1:{port}"


class Handler(BaseHTTPRequestHandler):
    """Quiet HTTP/1.1 handler with a one-call reply."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hang up on purpose here (refused bodies, finished ranges): not worth a trace.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextlib.contextmanager
def serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Run an HTTP server on 127.0.0.1 in a thread; yields its `host:port`."""
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# --------------------------------------------------------------------------------------------
# The token service
# --------------------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenService:
    """Issues registry JWTs: `alice` gets every action asked for; anyone may pull `public/*`."""

    key: rsa.RSAPrivateKey
    cert: x509.Certificate
    expires_in: int = 300
    requests: list[tuple[str | None, list[str]]] = field(default_factory=list)

    def issue(self, user: str | None, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = actions.split(",")
            granted = wanted if user else [a for a in wanted if a == "pull" and name.startswith("public/")]
            if granted:
                access.append({"type": kind, "name": name, "actions": granted})
        now = int(time.time())
        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        # The JWT stays valid for 10 minutes whatever `expires_in` says, so a test can make the
        # client renew early without the registry ever seeing an expired token.
        claims = {
            "iss": ISSUER,
            "sub": user or "",
            "aud": SERVICE,
            "exp": now + 600,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{b64url(signature)}"

    def handler(self) -> type[Handler]:
        service = self

        class TokenHandler(Handler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                if url.path != "/token" or query.get("service") != [SERVICE]:
                    return self.reply(400, b'{"details": "bad token request"}')
                user = None
                header = self.headers.get("Authorization")
                if header:
                    scheme, _, value = header.partition(" ")
                    pair = base64.b64decode(value).decode(errors="replace") if scheme == "Basic" else ""
                    if pair != f"{USER}:{PASSWORD}":
                        service.requests.append(("<rejected>", query.get("scope", [])))
                        return self.reply(
                            401,
                            b'{"details": "incorrect username or password"}',
                            {"Content-Type": "application/json"},
                        )
                    user = USER
                service.requests.append((user, query.get("scope", [])))
                token = service.issue(user, query.get("scope", []))
                body = json.dumps(
                    {
                        "token": token,
                        "access_token": token,
                        "expires_in": service.expires_in,
                        "issued_at": datetime.datetime.now(datetime.UTC).isoformat(),
                    }
                )
                return self.reply(200, body.encode(), {"Content-Type": "application/json"})

        return TokenHandler


def make_signing_cert() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p2pimg test token signer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


# --------------------------------------------------------------------------------------------
# Registries
# --------------------------------------------------------------------------------------------


@dataclass
class AuthRegistry:
    host: str
    tokens: TokenService | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}"


@pytest.fixture(scope="module")
def plain(registry: Registry, push_reference: PushReference, samples: SampleCache) -> Registry:
    for key in ("one_layer", "multi_arch", "docker_types"):
        push_reference(samples.get(key))
    return registry


@pytest.fixture(scope="module")
def basic_registry(
    tmp_path_factory: pytest.TempPathFactory, skopeo: Skopeo, samples: SampleCache
) -> Iterator[AuthRegistry]:
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is not installed (apt-get install docker-registry)")
    base = tmp_path_factory.mktemp("registry-basic")
    htpasswd = base / "htpasswd"
    # distribution only accepts bcrypt hashes; cost 4 (the minimum) keeps every request fast.
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    htpasswd.write_text(f"{USER}:{hashed}\n")
    auth = f"auth:\n  htpasswd:\n    realm: p2pimg-test\n    path: {json.dumps(str(htpasswd))}\n"
    daemon, host = start_docker_registry(base, auth)
    try:
        push(skopeo, samples.one_layer, host, "private/one-layer", f"{USER}:{PASSWORD}")
        yield AuthRegistry(host)
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory, skopeo: Skopeo, samples: SampleCache
) -> Iterator[AuthRegistry]:
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is not installed (apt-get install docker-registry)")
    base = tmp_path_factory.mktemp("registry-token")
    key, cert = make_signing_cert()
    bundle = base / "token-root.pem"
    bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tokens = TokenService(key, cert)
    with serve(tokens.handler()) as token_host:
        auth = (
            "auth:\n  token:\n"
            f"    realm: http://{token_host}/token\n"
            f"    service: {SERVICE}\n"
            f"    issuer: {ISSUER}\n"
            f"    rootcertbundle: {json.dumps(str(bundle))}\n"
        )
        daemon, host = start_docker_registry(base, auth)
        try:
            creds = f"{USER}:{PASSWORD}"
            push(skopeo, samples.multi_arch, host, "public/multi-arch", creds)
            push(skopeo, samples.one_layer, host, "private/one-layer", creds)
            yield AuthRegistry(host, tokens)
        finally:
            daemon.stop()


# --------------------------------------------------------------------------------------------
# No auth
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["one_layer", "multi_arch", "docker_types"])
async def test_manifest_by_tag_and_digest_is_byte_for_byte(
    key: str, plain: Registry, samples: SampleCache, skopeo: Skopeo
) -> None:
    sample = samples.get(key)
    media, top = sample.top_manifest()
    expected = skopeo_raw(skopeo, plain.ref(sample))
    assert expected == top
    async with UpstreamClient(plain.url) as client:
        assert client.host == plain.host
        by_tag = await client.get_manifest(sample.repo, sample.tag)
        assert (by_tag.data, by_tag.digest, by_tag.media_type) == (expected, digest_of(expected), media)
        by_digest = await client.get_manifest(sample.repo, by_tag.digest)
        assert by_digest == by_tag
        assert await client.head_manifest(sample.repo, sample.tag) == (by_tag.digest, media, len(expected))
        for digest, data in sample_manifests(sample).items():
            assert (await client.get_manifest(sample.repo, digest)).data == data


async def test_read_blob_whole_and_ranged(plain: Registry, samples: SampleCache) -> None:
    sample = samples.one_layer
    layer = json.loads(sample.top_manifest()[1])["layers"][0]["digest"]
    data = sample.blob(layer)
    async with UpstreamClient(plain.url) as client:
        assert await client.blob_size(sample.repo, layer) == len(data)
        assert await read_all(client, sample.repo, layer) == data
        assert await read_all(client, sample.repo, layer, 1000, 70_000) == data[1000:71_000]
        assert await read_all(client, sample.repo, layer, len(data) - 10) == data[-10:]
        assert await read_all(client, sample.repo, layer, 5, 0) == b""
        # A range running past the end is cut by the registry; the client reports it short.
        with pytest.raises(UpstreamError, match="early"):
            await read_all(client, sample.repo, layer, len(data) - 10, 20)


async def test_unknown_names_map_to_not_found(plain: Registry, samples: SampleCache) -> None:
    sample = samples.one_layer
    missing = "sha256:" + "0" * 64
    async with UpstreamClient(plain.url) as client:
        with pytest.raises(ManifestUnknown, match=plain.host):
            await client.get_manifest(sample.repo, "no-such-tag")
        with pytest.raises(NotFound):
            await client.get_manifest("no/such-repo", "v1")
        with pytest.raises(ManifestUnknown):
            await client.head_manifest(sample.repo, missing)
        with pytest.raises(BlobUnknown):
            await read_all(client, sample.repo, missing)
        with pytest.raises(BlobUnknown):
            await client.blob_size(sample.repo, missing)


async def test_unreachable_registry_is_an_upstream_error() -> None:
    port = free_port()  # nothing listens there
    async with UpstreamClient(f"http://127.0.0.1:{port}", timeout=5) as client:
        with pytest.raises(UpstreamError, match=f"127.0.0.1:{port}"):
            await client.get_manifest("some/repo", "v1")


async def test_registry_source_multi_arch(plain: Registry, samples: SampleCache, tmp_path: Path) -> None:
    sample = samples.multi_arch
    async with open_source(f"docker://{plain.ref(sample)}") as image:
        expected = sample_manifests(sample)
        assert image.top == sample.image.top_digest
        assert {d: data for d, (data, _) in image.manifests.items()} == expected
        assert {d: b.size for d, b in image.blobs.items()} == sample_blobs(sample)
        for digest, blob in image.blobs.items():
            assert await read_source_blob(blob) == sample.blob(digest)
        # The source works for a real publish, which reads blob streams from worker threads.
        report = await publish_image(image, "mirror/multi-arch", "v1", FileOrigin(tmp_path / "origin"))
    assert report.blobs_uploaded == len(image.blobs)


async def test_registry_source_missing_tag(plain: Registry, samples: SampleCache) -> None:
    with pytest.raises(ManifestUnknown):
        async with open_source(f"docker://{plain.host}/{samples.one_layer.repo}:nope"):
            raise AssertionError("opened a tag that does not exist")


async def test_cancelled_publish_from_a_registry_returns_its_streams(
    plain: Registry, samples: SampleCache, tmp_path: Path
) -> None:
    """Cancelled while a worker thread reads a blob: its next read from the registry is cancelled
    with the task that started the thread, and the stream is closed all the same."""
    sample = samples.multi_arch
    with trio.CancelScope() as scope:
        async with open_source(f"docker://{plain.ref(sample)}") as image:
            blob = max(image.blobs.values(), key=lambda b: b.size)
            assert blob.size > 128 << 10  # pieces of at most 64 KiB: reads after the cancel reach trio

            def read_then_cancel() -> None:
                with blob.open() as f:
                    f.read(1 << 10)
                    trio.from_thread.run_sync(scope.cancel)
                    while f.read(1 << 10):
                        pass
                raise AssertionError("the blob was read to its end after the cancellation")

            await trio.to_thread.run_sync(read_then_cancel)
    assert scope.cancelled_caught


async def test_publish_from_a_registry_to_s3_in_parts(
    registry: Registry, skopeo: Skopeo, moto: str, aws_env: None, tmp_path: Path
) -> None:
    """A layer larger than a part streams from the registry into a multipart upload: each part is
    read from the registry stream as publish's worker threads ask for it, never the whole layer."""
    image = write_oci_layout(tmp_path / "img", [LayerSpec(11 << 20, "none")], tag="1", seed=71)
    repo = f"parts/{uuid.uuid4().hex[:8]}"
    skopeo(
        "copy",
        "--dest-tls-verify=false",
        "--preserve-digests",
        f"oci:{image.path}:1",
        f"docker://{registry.host}/{repo}:1",
    )
    origin = S3Origin(f"s3://{make_bucket(moto)}?endpoint={moto}")
    origin.segment_size = 5 << 20  # S3's smallest part: three parts for the layer
    try:
        report = await publish(f"docker://{registry.host}/{repo}:1", "parts/app", "1", origin)
        blobs = [d for d in image.blob_digests if d != image.top_digest]  # config and layer
        assert report.blobs_uploaded == len(blobs) == 2
        assert origin.stats.parts_uploaded == 3 + 1  # the layer's three parts, the config's one PUT
        for digest in blobs:
            assert digest_of(await origin.get(blob_key(digest), max_size=32 << 20)) == digest
    finally:
        await origin.aclose()


# --------------------------------------------------------------------------------------------
# Basic auth
# --------------------------------------------------------------------------------------------


async def test_basic_auth_with_docker_config(
    basic_registry: AuthRegistry, samples: SampleCache, tmp_path: Path
) -> None:
    sample = samples.one_layer
    config = write_docker_config(
        tmp_path / "config.json",
        f"http://{basic_registry.host}/v1/",
        {"username": USER, "password": PASSWORD},
    )
    async with UpstreamClient(basic_registry.url, docker_config=config) as client:
        manifest = await client.get_manifest("private/one-layer", sample.tag)
        assert manifest.data == sample.top_manifest()[1]
        layer = json.loads(manifest.data)["layers"][0]["digest"]
        assert await read_all(client, "private/one-layer", layer) == sample.blob(layer)
    async with open_source(
        f"docker://{basic_registry.host}/private/one-layer:v1", docker_config=config
    ) as image:
        assert image.top == manifest.digest


async def test_basic_auth_without_credentials(basic_registry: AuthRegistry, tmp_path: Path) -> None:
    empty = write_docker_config(tmp_path / "config.json", "other.example:5000", auth_entry())
    async with UpstreamClient(basic_registry.url, docker_config=empty) as client:
        with pytest.raises(UpstreamAuthError, match="docker login") as info:
            await client.get_manifest("private/one-layer", "v1")
    assert basic_registry.host in str(info.value)


async def test_basic_auth_wrong_password(basic_registry: AuthRegistry, tmp_path: Path) -> None:
    config = write_docker_config(tmp_path / "config.json", basic_registry.host, auth_entry(password="nope"))
    async with UpstreamClient(basic_registry.url, docker_config=config) as client:
        with pytest.raises(UpstreamAuthError) as info:
            await client.get_manifest("private/one-layer", "v1")
    message = str(info.value)
    assert USER in message and str(config) in message and "nope" not in message


# --------------------------------------------------------------------------------------------
# Token auth
# --------------------------------------------------------------------------------------------


async def test_token_anonymous_pull(
    token_registry: AuthRegistry, samples: SampleCache, skopeo: Skopeo, tmp_path: Path
) -> None:
    tokens = token_registry.tokens
    assert tokens is not None
    sample = samples.multi_arch
    repo = "public/multi-arch"
    expected = skopeo_raw(skopeo, f"{token_registry.host}/{repo}:v1")
    nothing = write_docker_config(tmp_path / "config.json", "other.example", auth_entry())
    tokens.requests.clear()
    async with UpstreamClient(token_registry.url, docker_config=nothing) as client:
        manifest = await client.get_manifest(repo, "v1")
        assert manifest.data == expected == sample.top_manifest()[1]
        assert await client.head_manifest(repo, manifest.digest) == (
            manifest.digest,
            manifest.media_type,
            len(expected),
        )
        for digest in sample_blobs(sample):
            assert await read_all(client, repo, digest) == sample.blob(digest)
    # One anonymous token for the whole session: cached for its scope, not fetched per request.
    assert tokens.requests == [(None, [f"repository:{repo}:pull"])]


async def test_token_anonymous_denied_private(token_registry: AuthRegistry, tmp_path: Path) -> None:
    nothing = write_docker_config(tmp_path / "config.json", "other.example", auth_entry())
    async with UpstreamClient(token_registry.url, docker_config=nothing) as client:
        with pytest.raises(UpstreamAuthError, match="needs credentials"):
            await client.get_manifest("private/one-layer", "v1")


async def test_token_with_credentials(
    token_registry: AuthRegistry, samples: SampleCache, tmp_path: Path
) -> None:
    tokens = token_registry.tokens
    assert tokens is not None
    sample = samples.one_layer
    config = write_docker_config(tmp_path / "config.json", token_registry.host, auth_entry())
    tokens.requests.clear()
    async with UpstreamClient(token_registry.url, docker_config=config) as client:
        manifest = await client.get_manifest("private/one-layer", "v1")
        assert manifest.data == sample.top_manifest()[1]
        layer = json.loads(manifest.data)["layers"][0]["digest"]
        assert await read_all(client, "private/one-layer", layer, 7, 100) == sample.blob(layer)[7:107]
    assert tokens.requests == [(USER, ["repository:private/one-layer:pull"])]
    # The same credentials serve publish from the registry.
    async with open_source(
        f"docker://{token_registry.host}/private/one-layer:v1", docker_config=config
    ) as image:
        assert set(image.blobs) == set(sample_blobs(sample))
        assert await read_source_blob(image.blobs[layer]) == sample.blob(layer)


async def test_token_wrong_credentials(token_registry: AuthRegistry, tmp_path: Path) -> None:
    config = write_docker_config(
        tmp_path / "config.json", f"https://{token_registry.host}", auth_entry(password="wrong-secret")
    )
    async with UpstreamClient(token_registry.url, docker_config=config) as client:
        with pytest.raises(UpstreamAuthError, match="rejected the credentials") as info:
            await client.get_manifest("public/multi-arch", "v1")
    assert "wrong-secret" not in str(info.value) and str(config) in str(info.value)


async def test_token_renewed_after_expiry(token_registry: AuthRegistry, tmp_path: Path) -> None:
    tokens = token_registry.tokens
    assert tokens is not None
    nothing = write_docker_config(tmp_path / "config.json", "other.example", auth_entry())
    tokens.requests.clear()
    tokens.expires_in = 1
    try:
        async with UpstreamClient(token_registry.url, docker_config=nothing) as client:
            digest = (await client.get_manifest("public/multi-arch", "v1")).digest
            await client.head_manifest("public/multi-arch", digest)
            assert len(tokens.requests) == 1
            await trio.sleep(1.0)
            await client.head_manifest("public/multi-arch", digest)
            assert len(tokens.requests) == 2
    finally:
        tokens.expires_in = 300


# --------------------------------------------------------------------------------------------
# A scripted registry: redirects, lies and limits
# --------------------------------------------------------------------------------------------

BLOB = bytes(range(256)) * 1200  # ~300 KB: several pieces on the wire
BLOB_DIGEST = digest_of(BLOB)
BAD_DIGEST = digest_of(b"what the registry should have sent")
NORANGE_DIGEST = digest_of(BLOB + b"!")
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": BLOB_DIGEST,
            "size": len(BLOB),
        },
        "layers": [],
    }
).encode()
CORRUPT = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": BAD_DIGEST,
            "size": len(BLOB),
        },
        "layers": [],
    }
).encode()
SCHEMA1 = json.dumps({"schemaVersion": 1, "name": "fake/repo", "tag": "old", "fsLayers": []}).encode()


@dataclass
class Scripted:
    host: str
    storage_headers: list[dict[str, str]]


@pytest.fixture(scope="module")
def scripted() -> Iterator[Scripted]:
    storage_headers: list[dict[str, str]] = []

    class Storage(Handler):
        def do_GET(self) -> None:
            storage_headers.append({k.lower(): v for k, v in self.headers.items()})
            self.reply(200, BLOB, {"Content-Type": "application/octet-stream"})

    with serve(Storage) as storage_host:
        routes: dict[str, Callable[[Handler], None]] = {
            "/v2/fake/repo/manifests/good": lambda h: h.reply(
                200,
                MANIFEST,
                {
                    "Content-Type": OCI_MANIFEST,
                    # HEAD without a digest: the client must fall back to a GET.
                    **({} if h.command == "HEAD" else {"Docker-Content-Digest": digest_of(MANIFEST)}),
                },
            ),
            "/v2/fake/repo/manifests/corrupt": lambda h: h.reply(
                200, CORRUPT, {"Content-Type": OCI_MANIFEST}
            ),
            "/v2/fake/repo/manifests/lying": lambda h: h.reply(
                200, MANIFEST, {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": "sha256:" + "1" * 64}
            ),
            f"/v2/fake/repo/manifests/{BAD_DIGEST}": lambda h: h.reply(
                200, MANIFEST, {"Content-Type": OCI_MANIFEST}
            ),
            "/v2/fake/repo/manifests/huge": lambda h: h.reply(
                200, b" " * (4 << 20) + b"{}", {"Content-Type": OCI_MANIFEST}
            ),
            "/v2/fake/repo/manifests/huge-stream": _close_delimited(b" " * (5 << 20)),
            "/v2/fake/repo/manifests/old": lambda h: h.reply(
                200, SCHEMA1, {"Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws"}
            ),
            "/v2/fake/repo/manifests/limited": lambda h: h.reply(
                429,
                json.dumps({"errors": [{"code": "TOOMANYREQUESTS", "message": "pull rate limit"}]}).encode(),
                {"Retry-After": "30"},
            ),
            "/v2/fake/repo/manifests/loop": lambda h: h.reply(
                307, b"", {"Location": "/v2/fake/repo/manifests/loop"}
            ),
            f"/v2/fake/repo/blobs/{BLOB_DIGEST}": lambda h: h.reply(
                307, b"", {"Location": f"http://{storage_host}/storage/blob?signature=xyz"}
            ),
            f"/v2/fake/repo/blobs/{BAD_DIGEST}": lambda h: h.reply(200, BLOB),
            # Ignores Range and answers 200 with the whole blob, as some servers do.
            f"/v2/fake/repo/blobs/{NORANGE_DIGEST}": lambda h: h.reply(200, BLOB + b"!"),
        }

        class Registry(Handler):
            def do_GET(self) -> None:
                if (
                    self.headers.get("Authorization")
                    != "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                ):
                    return self.reply(401, b"", {"WWW-Authenticate": 'Basic realm="fake"'})
                route = routes.get(self.path)
                if route is None:
                    return self.reply(404, json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN"}]}).encode())
                route(self)

            do_HEAD = do_GET

        with serve(Registry) as host:
            yield Scripted(host, storage_headers)


def _close_delimited(body: bytes) -> Callable[[Handler], None]:
    """A body with no Content-Length, ended by closing: only a streaming cap can stop it."""

    def send(h: Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", OCI_MANIFEST)
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        with contextlib.suppress(OSError):
            h.wfile.write(body)

    return send


@pytest.fixture
async def fake(scripted: Scripted, tmp_path: Path) -> Any:
    config = write_docker_config(tmp_path / "config.json", scripted.host, auth_entry())
    async with UpstreamClient(f"http://{scripted.host}", docker_config=config, timeout=10) as client:
        yield client


async def test_scripted_good_manifest_and_head_fallback(fake: UpstreamClient) -> None:
    manifest = await fake.get_manifest("fake/repo", "good")
    assert manifest.data == MANIFEST and manifest.media_type == OCI_MANIFEST
    assert await fake.head_manifest("fake/repo", "good") == (digest_of(MANIFEST), OCI_MANIFEST, len(MANIFEST))


@pytest.mark.parametrize(
    ("reference", "error", "match"),
    [
        ("lying", VerificationError, "hash to"),
        (BAD_DIGEST, VerificationError, "digest"),
        ("huge", UpstreamError, "more than"),
        ("huge-stream", UpstreamError, "more than"),
        ("old", ManifestUnsupported, "schema 1"),
        ("limited", UpstreamRateLimited, "rate limiting"),
        ("loop", UpstreamError, "redirects"),
    ],
)
async def test_scripted_manifest_failures(
    fake: UpstreamClient, reference: str, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        await fake.get_manifest("fake/repo", reference)


async def test_blob_redirect_drops_credentials(fake: UpstreamClient, scripted: Scripted) -> None:
    scripted.storage_headers.clear()
    assert await read_all(fake, "fake/repo", BLOB_DIGEST) == BLOB
    assert await read_all(fake, "fake/repo", BLOB_DIGEST, 300, 1000) == BLOB[300:1300]
    assert len(scripted.storage_headers) == 2
    # Storage on another origin must never see the registry's credentials.
    assert all("authorization" not in h for h in scripted.storage_headers)
    assert scripted.storage_headers[1]["range"] == "bytes=300-1299"


async def test_blob_corruption_is_caught_before_the_last_piece(fake: UpstreamClient) -> None:
    seen = bytearray()
    with pytest.raises(VerificationError):
        async for piece in fake.read_blob("fake/repo", BAD_DIGEST):
            seen += piece
    assert len(seen) < len(BLOB)


async def test_registry_source_streams_verified_blobs(scripted: Scripted, tmp_path: Path) -> None:
    config = write_docker_config(tmp_path / "config.json", scripted.host, auth_entry())
    async with open_source(f"docker://{scripted.host}/fake/repo:good", docker_config=config) as good:
        assert await read_source_blob(good.blobs[BLOB_DIGEST]) == BLOB  # through the redirect to storage
    async with open_source(f"docker://{scripted.host}/fake/repo:corrupt", docker_config=config) as corrupt:

        def read_to_size() -> int:
            got = 0
            with corrupt.blobs[BAD_DIGEST].open() as f, pytest.raises(VerificationError):
                # A reader that stops at `size` bytes and never asks for EOF is told all the same.
                while got < len(BLOB):
                    got += len(f.read(len(BLOB) - got))
            return got

        assert await trio.to_thread.run_sync(read_to_size) < len(BLOB)


async def test_whole_read_of_a_known_size(fake: UpstreamClient) -> None:
    """With the descriptor's size, a whole read stops there and is checked there."""
    assert await read_all(fake, "fake/repo", BLOB_DIGEST, size=len(BLOB)) == BLOB
    with pytest.raises(UpstreamError, match="ended .* early"):
        await read_all(fake, "fake/repo", BLOB_DIGEST, size=len(BLOB) + 1)
    # The registry sends one byte more than the size: cut there, the digest cannot match.
    with pytest.raises(VerificationError):
        await read_all(fake, "fake/repo", NORANGE_DIGEST, size=len(BLOB))
    assert await read_all(fake, "fake/repo", NORANGE_DIGEST, size=len(BLOB) + 1) == BLOB + b"!"


async def test_range_ignored_by_server_is_cut_by_the_client(fake: UpstreamClient) -> None:
    data = BLOB + b"!"
    assert await read_all(fake, "fake/repo", NORANGE_DIGEST, 1000, 5000) == data[1000:6000]
    assert await read_all(fake, "fake/repo", NORANGE_DIGEST, len(data) - 3) == data[-3:]


# --------------------------------------------------------------------------------------------
# The generated client configuration, used by the real clients
# --------------------------------------------------------------------------------------------

# A registry name in the loopback range with nothing behind it: only the mirror can serve.
UNSERVED = "127.0.0.2:5999"


def test_containerd_pulls_through_generated_hosts_toml(
    containerd: Containerd, plain: Registry, samples: SampleCache, tmp_path: Path
) -> None:
    sample = samples.one_layer
    hosts = tmp_path / "hosts"
    (hosts / UNSERVED).mkdir(parents=True)
    (hosts / UNSERVED / "hosts.toml").write_text(
        containerd_hosts_toml(UNSERVED, plain.url, server=f"http://{UNSERVED}")
    )
    ref = f"{UNSERVED}/{sample.name_tag}"
    containerd.ctr("content", "fetch", "--hosts-dir", str(hosts), ref, namespace="upstream-mirror")
    assert sample.image.top_digest in containerd.content_digests("upstream-mirror")


def test_podman_pulls_through_generated_registries_conf(
    podman: Podman, plain: Registry, samples: SampleCache, tmp_path: Path
) -> None:
    sample = samples.one_layer
    conf = tmp_path / "registries.conf"
    conf.write_text("unqualified-search-registries = []\n\n" + podman_registries_conf(UNSERVED, plain.url))
    root = tmp_path / "podman"
    env = {**podman.env(root), "CONTAINERS_REGISTRIES_CONF": str(conf)}
    ref = f"{UNSERVED}/{sample.name_tag}"
    run_command([*podman.argv(root), "pull", "--signature-policy", str(podman.config.policy), ref], env=env)
    out = run_command([*podman.argv(root), "image", "inspect", ref], env=env).stdout
    assert json.loads(out)[0]["Digest"] == sample.image.top_digest


def test_mirror_with_basic_auth(
    basic_registry: AuthRegistry,
    samples: SampleCache,
    skopeo: Skopeo,
    p2pimg_serve: P2pimgServe,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`serve --upstream` takes the registry credentials from the Docker config, and without
    them refuses clearly instead of serving anything."""
    sample = samples.one_layer
    config_dir = tmp_path / "docker"
    config_dir.mkdir()
    write_docker_config(config_dir / "config.json", basic_registry.host, auth_entry())
    monkeypatch.setenv("DOCKER_CONFIG", str(config_dir))
    server = p2pimg_serve(tmp_path / "home", extra_args=["--upstream", basic_registry.url])
    dest = tmp_path / "out"
    skopeo(
        "copy",
        "--src-tls-verify=false",
        "--preserve-digests",
        f"docker://{server.host}/private/one-layer:{sample.tag}",
        f"oci:{dest}:x",
    )
    assert json.loads((dest / "index.json").read_text())["manifests"][0]["digest"] == digest_of(
        sample.top_manifest()[1]
    )

    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "empty-docker-config"))
    anonymous = p2pimg_serve(tmp_path / "home2", extra_args=["--upstream", basic_registry.url])
    url = f"http://{anonymous.host}/v2/private/one-layer/manifests/{sample.tag}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener.open(url, timeout=30)
    error = json.loads(refused.value.read())["errors"][0]
    assert refused.value.code == 502 and error["code"] == "DENIED"
    assert basic_registry.host in error["message"] and "credentials" in error["message"].lower()


def test_credentialed_content_reaches_peers_only_with_a_swarm_key(
    basic_registry: AuthRegistry,
    plain: Registry,
    samples: SampleCache,
    skopeo: Skopeo,
    p2pimg_serve: P2pimgServe,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a mirror brought with the user's registry credentials is private: without a swarm key
    the peer listener answers exactly as for content it does not have (blob, inventory, and the
    manifest and whole-blob blocks), while anonymously mirrored content is shared as usual; with a
    swarm key, keyed peers get it. (Mirrored blobs have no chunk CIDs: nothing else names them.)"""
    sample = samples.one_layer
    top = sample.top_manifest()[1]
    layer = json.loads(top)["layers"][0]["digest"]
    layer_bytes = sample.blob(layer)
    assert len(layer_bytes) > 128 << 10  # several 64 KiB chunks
    config_dir = tmp_path / "docker"
    config_dir.mkdir()
    write_docker_config(config_dir / "config.json", basic_registry.host, auth_entry())
    monkeypatch.setenv("DOCKER_CONFIG", str(config_dir))

    def mirror(home: Path, upstream: str, repo: str, *extra: str) -> str:
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text('chunk_size = "64K"\n')
        peer = f"127.0.0.1:{free_port()}"
        server = p2pimg_serve(home, extra_args=["--upstream", upstream, "--peer-listen", peer, *extra])
        skopeo(
            "copy",
            "--src-tls-verify=false",
            "--preserve-digests",
            f"docker://{server.host}/{repo}:{sample.tag}",
            f"oci:{home.parent / (home.name + '-out')}:x",
        )
        return f"http://{peer}"

    absent_digest = "sha256:" + "0" * 64

    def peer_paths(digest: str = layer) -> dict[str, str]:
        """Peer paths naming the layer (or, as `digest`, content that is nowhere)."""
        real = digest == layer
        return {
            "blob": f"/p2pimg/v1/blobs/{digest}",
            "inventory": f"/p2pimg/v1/have/{digest}",
            "manifest block": f"/ipfs/{Cid.from_digest(digest_of(top) if real else digest)}",
            "whole-blob block": f"/ipfs/{Cid.from_digest(digest)}",
        }

    def answer(r: httpx.Response, path: str) -> tuple[int, str]:
        """Status and body, with the name asked for taken out (to compare present with absent)."""
        return r.status_code, r.text.replace(path.rpartition("/")[2], "<asked>")

    private = mirror(tmp_path / "private", basic_registry.url, "private/one-layer")
    public = mirror(tmp_path / "public", plain.url, sample.repo)
    with httpx.Client(trust_env=False, timeout=30) as client:
        nowhere = peer_paths(absent_digest)
        for what, path in peer_paths().items():
            got = answer(client.get(private + path), path)
            assert got[0] == 404, f"private {what} reached a keyless peer"
            assert got == answer(client.get(private + nowhere[what]), nowhere[what]), (
                f"the answer for private {what} differs from the one for absent content"
            )
            assert client.get(public + path).status_code == 200, f"public {what} was not shared"
        got_blob = client.get(public + peer_paths()["blob"]).content
        assert digest_of(got_blob) == layer

        # The same home behind a swarm key: strangers get 401, keyed peers get the private bytes.
        key = tmp_path / "swarm.key"
        key.write_text(secrets.token_hex(32))
        keyed = mirror(
            tmp_path / "private", basic_registry.url, "private/one-layer", "--swarm-key-file", str(key)
        )
        assert client.get(keyed + peer_paths()["blob"]).status_code == 401
        auth = SwarmAuth(key.read_text().strip().encode())
        for what, path in peer_paths().items():
            r = client.get(keyed + path, auth=auth)
            assert r.status_code == 200, f"{what}: {r.status_code} {r.text[:200]}"
        assert digest_of(client.get(keyed + peer_paths()["blob"], auth=auth).content) == layer
