"""Upstream registry helpers without a network: docker config credentials, names, challenges,
the authentication flow driven by hand, and the generated containerd/podman configuration."""

from __future__ import annotations

import base64
import json
import logging
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest

from p2pimg.cli.clientconfig import containerd_hosts_toml, podman_registries_conf
from p2pimg.errors import DigestInvalid, InvalidInput, NameInvalid, TagInvalid
from p2pimg.sources.upstream.auth import AuthState, Step, TokenCache, parse_www_authenticate
from p2pimg.sources.upstream.dockerconfig import Credentials, load_credentials
from p2pimg.sources.upstream.errors import UpstreamAuthError, UpstreamError
from p2pimg.sources.upstream.refs import DOCKER_HUB_URL, normalize_repo, parse_image_url, registry_base

DIGEST = "sha256:" + "ab" * 32


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def config(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(doc))
    return path


# -- docker config -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["127.0.0.1:5000", "https://127.0.0.1:5000", "http://127.0.0.1:5000/v1/", "HTTPS://127.0.0.1:5000/v2/"],
)
def test_auths_key_variants(tmp_path: Path, key: str) -> None:
    path = config(tmp_path, {"auths": {key: {"auth": b64("bob:secret")}}})
    assert load_credentials("127.0.0.1:5000", path) == Credentials("bob", "secret", str(path))
    assert load_credentials("127.0.0.1:5001", path) is None


@pytest.mark.parametrize(
    "key", ["https://index.docker.io/v1/", "docker.io", "registry-1.docker.io", "https://index.docker.io/v2/"]
)
def test_docker_hub_keys(tmp_path: Path, key: str) -> None:
    path = config(tmp_path, {"auths": {key: {"auth": b64("hubuser:pw")}}})
    assert load_credentials("docker.io", path) == Credentials("hubuser", "pw", str(path))
    assert load_credentials("registry-1.docker.io", path) == Credentials("hubuser", "pw", str(path))


def test_base64_auth_keeps_colons_in_the_password(tmp_path: Path) -> None:
    path = config(tmp_path, {"auths": {"r.example": {"auth": b64("u:p:a:ss")}}})
    creds = load_credentials("r.example", path)
    assert creds is not None and (creds.username, creds.password) == ("u", "p:a:ss")


def test_username_and_password_fields(tmp_path: Path) -> None:
    path = config(tmp_path, {"auths": {"r.example": {"username": "u", "password": "pw"}}})
    assert load_credentials("r.example", path) == Credentials("u", "pw", str(path))


def test_exact_key_wins_over_another_spelling(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        {"auths": {"http://r.example/v1/": {"auth": b64("old:1")}, "r.example": {"auth": b64("new:2")}}},
    )
    creds = load_credentials("r.example", path)
    assert creds is not None and creds.username == "new"


def test_invalid_auth_is_refused_without_showing_it(tmp_path: Path) -> None:
    bad = b64("no-colon-here")
    path = config(tmp_path, {"auths": {"r.example": {"auth": bad}}})
    with pytest.raises(InvalidInput) as info:
        load_credentials("r.example", path)
    assert bad not in str(info.value) and "no-colon-here" not in str(info.value)


def test_password_never_in_repr() -> None:
    assert "hunter2" not in repr(Credentials("u", "hunter2", "/x"))


def test_cred_helper_warns_and_falls_back_to_anonymous(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = config(
        tmp_path, {"auths": {"r.example": {"auth": b64("u:p")}}, "credHelpers": {"r.example": "ecr-login"}}
    )
    with caplog.at_level(logging.WARNING, logger="p2pimg.sources.upstream.dockerconfig"):
        assert load_credentials("r.example", path) is None
    assert "ecr-login" in caplog.text and "not supported" in caplog.text and "anonymous" in caplog.text


def test_creds_store_warns_when_there_is_no_inline_auth(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = config(
        tmp_path, {"auths": {"r.example": {}, "other.example": {"auth": b64("u:p")}}, "credsStore": "desktop"}
    )
    with caplog.at_level(logging.WARNING, logger="p2pimg.sources.upstream.dockerconfig"):
        assert load_credentials("r.example", path) is None
        assert "desktop" in caplog.text and "not supported" in caplog.text
        caplog.clear()
        assert load_credentials("other.example", path) is not None
    assert caplog.text == ""


def test_identity_token_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = config(tmp_path, {"auths": {"r.example": {"identitytoken": "xyz"}}})
    with caplog.at_level(logging.WARNING, logger="p2pimg.sources.upstream.dockerconfig"):
        assert load_credentials("r.example", path) is None
    assert "token" in caplog.text and "xyz" not in caplog.text


def test_config_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home, custom = tmp_path / "home", tmp_path / "custom"
    (home / ".docker").mkdir(parents=True)
    custom.mkdir()
    (home / ".docker" / "config.json").write_text(json.dumps({"auths": {"r.example": {"auth": b64("h:1")}}}))
    (custom / "config.json").write_text(json.dumps({"auths": {"r.example": {"auth": b64("c:2")}}}))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    assert getattr(load_credentials("r.example"), "username", None) == "h"
    monkeypatch.setenv("DOCKER_CONFIG", str(custom))
    assert getattr(load_credentials("r.example"), "username", None) == "c"
    # An explicit path (a file or its directory) wins over both.
    assert getattr(load_credentials("r.example", home / ".docker"), "username", None) == "h"
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "nowhere"))
    assert load_credentials("r.example") is None  # no config at all: anonymous
    with pytest.raises(InvalidInput, match="does not exist"):
        load_credentials("r.example", tmp_path / "missing.json")


def test_malformed_config_is_refused_without_quoting_it(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"auths": {"r.example": {"auth": "c2VjcmV0"}')
    with pytest.raises(InvalidInput, match="not valid JSON") as info:
        load_credentials("r.example", path)
    assert "c2VjcmV0" not in str(info.value)


# -- names and addresses -----------------------------------------------------------------------


def test_normalize_repo() -> None:
    assert normalize_repo("docker.io", "alpine") == "library/alpine"
    assert normalize_repo("docker.io", "library/alpine") == "library/alpine"
    assert normalize_repo("docker.io", "bitnami/redis") == "bitnami/redis"
    assert normalize_repo("ghcr.io", "alpine") == "alpine"
    assert normalize_repo("127.0.0.1:5000", "a/b/c") == "a/b/c"
    with pytest.raises(NameInvalid):
        normalize_repo("docker.io", "Alpine")
    with pytest.raises(NameInvalid):
        normalize_repo("ghcr.io", "../etc")


@pytest.mark.parametrize(
    ("url", "base", "host"),
    [
        ("https://registry-1.docker.io", DOCKER_HUB_URL, "docker.io"),
        ("https://index.docker.io/", DOCKER_HUB_URL, "docker.io"),
        ("docker.io", DOCKER_HUB_URL, "docker.io"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000", "127.0.0.1:5000"),
        ("http://127.0.0.1:5000/", "http://127.0.0.1:5000", "127.0.0.1:5000"),
        ("localhost:5000", "http://localhost:5000", "localhost:5000"),
        ("ghcr.io", "https://ghcr.io", "ghcr.io"),
        ("https://GHCR.io:443", "https://ghcr.io", "ghcr.io"),
        ("https://r.example:8443", "https://r.example:8443", "r.example:8443"),
        ("http://[::1]:5000", "http://[::1]:5000", "[::1]:5000"),
    ],
)
def test_registry_base(url: str, base: str, host: str) -> None:
    assert registry_base(url) == (base, host)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://r.example",
        "http://u:p@r.example",
        "http://r.example/v2",
        "http://r.example?x=1",
        "https://",
        "http://r.example:99999",
    ],
)
def test_registry_base_refuses(url: str) -> None:
    with pytest.raises(InvalidInput) as info:
        registry_base(url)
    assert ":p@" not in str(info.value)


def test_parse_image_url() -> None:
    hub = parse_image_url("docker://alpine:3.19")
    assert (hub.base_url, hub.host, hub.repo, hub.reference) == (
        DOCKER_HUB_URL,
        "docker.io",
        "library/alpine",
        "3.19",
    )
    local = parse_image_url("docker://127.0.0.1:5000/samples/multi-arch:v1")
    assert (local.base_url, local.repo, local.reference) == (
        "http://127.0.0.1:5000",
        "samples/multi-arch",
        "v1",
    )
    pinned = parse_image_url(f"ghcr.io/org/app:1.0@{DIGEST}")
    assert (pinned.base_url, pinned.repo, pinned.reference) == ("https://ghcr.io", "org/app", DIGEST)
    assert parse_image_url("docker://r.example/app:v1", plain_http=True).base_url == "http://r.example"
    assert parse_image_url("localhost/app:v1").host == "localhost"
    assert parse_image_url("docker://docker.io/bitnami/redis:7").repo == "bitnami/redis"


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("docker://127.0.0.1:5000/samples/x", InvalidInput),
        ("docker://alpine", InvalidInput),
        ("docker://r.example/app:bad/tag", InvalidInput),
        ("docker://r.example/app:-bad", TagInvalid),
        ("docker://r.example/app@sha256:1234", DigestInvalid),
        ("docker://r.example/App:v1", NameInvalid),
    ],
)
def test_parse_image_url_refuses(url: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_image_url(url)


# -- challenges and the auth flow --------------------------------------------------------------


def test_parse_www_authenticate() -> None:
    bearer = parse_www_authenticate(
        [
            'Bearer realm="https://auth.example/token",service="registry.example",'
            'scope="repository:a/b:pull,push",error="insufficient_scope"'
        ]
    )
    assert bearer is not None and bearer.scheme == "bearer"
    assert bearer.params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:a/b:pull,push",
        "error": "insufficient_scope",
    }
    basic = parse_www_authenticate(['Basic realm="fake \\"quoted\\" realm"'])
    assert basic is not None and basic.scheme == "basic" and basic.params == {"realm": 'fake "quoted" realm'}
    both = parse_www_authenticate(['Basic realm="x"', "bearer realm=https://a.example/t"])
    assert both is not None and both.scheme == "bearer" and both.params["realm"] == "https://a.example/t"
    assert parse_www_authenticate([]) is None
    assert parse_www_authenticate(["Negotiate abc"]) is None


CHALLENGE = 'Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull"'


def drive(
    state: AuthState,
    replies: list[tuple[int, dict[str, str], bytes]],
    url: str = "https://reg.example/v2/a/b/manifests/v1",
) -> tuple[list[httpx.Request], int]:
    """Run one flow against canned replies; returns what it sent and the final status."""
    flow = state.flow(httpx.Request("GET", url), "repository:a/b:pull")
    sent: list[httpx.Request] = []
    step: Step = next(flow)
    for status, headers, body in replies:
        sent.append(step.request)
        response = httpx.Response(status, headers=headers, content=body, request=step.request)
        try:
            step = flow.send((response, body))
        except StopIteration as stop:
            return sent, stop.value[0].status_code
    raise AssertionError(f"flow wanted more than {len(replies)} replies")


def token_body(token: str, expires_in: int = 300) -> bytes:
    return json.dumps({"token": token, "expires_in": expires_in}).encode()


def test_bearer_flow_fetches_once_and_caches() -> None:
    creds = Credentials("u", "pw", "/cfg")
    state = AuthState("reg.example", creds, secure=True)
    sent, status = drive(
        state, [(401, {"WWW-Authenticate": CHALLENGE}, b""), (200, {}, token_body("tok-1")), (200, {}, b"{}")]
    )
    assert status == 200
    token_request = sent[1]
    assert token_request.url.host == "auth.example"
    assert dict(token_request.url.params.multi_items()) == {"service": "reg", "scope": "repository:a/b:pull"}
    assert token_request.headers["Authorization"] == "Basic " + b64("u:pw")
    assert sent[2].headers["Authorization"] == "Bearer tok-1"
    # Next request: the cached token is sent up front, no challenge, no token request.
    sent, status = drive(state, [(200, {}, b"{}")])
    assert status == 200 and sent[0].headers["Authorization"] == "Bearer tok-1"


def test_bearer_flow_renews_a_rejected_token_once() -> None:
    state = AuthState("reg.example", None, secure=True)
    drive(state, [(401, {"WWW-Authenticate": CHALLENGE}, b""), (200, {}, token_body("old")), (200, {}, b"")])
    sent, status = drive(
        state,
        [
            (401, {"WWW-Authenticate": CHALLENGE}, b""),
            (200, {}, token_body("new")),
            (401, {"WWW-Authenticate": CHALLENGE}, b""),
        ],
    )
    assert status == 401  # tried once more with a fresh token, then gave up: the caller reports
    assert [r.headers.get("Authorization") for r in sent] == ["Bearer old", None, "Bearer new"]


def test_expired_token_is_not_reused() -> None:
    now = [1000.0]
    state = AuthState("reg.example", None, secure=True, clock=lambda: now[0])
    drive(
        state, [(401, {"WWW-Authenticate": CHALLENGE}, b""), (200, {}, token_body("t1", 100)), (200, {}, b"")]
    )
    now[0] += 89  # renewed at 90% of its lifetime: still good
    sent, _ = drive(state, [(200, {}, b"")])
    assert sent[0].headers["Authorization"] == "Bearer t1"
    now[0] += 1
    sent, _ = drive(state, [(200, {}, token_body("t2")), (200, {}, b"")])
    assert sent[0].url.host == "auth.example" and sent[1].headers["Authorization"] == "Bearer t2"


@pytest.mark.parametrize(
    ("expires_in", "kept_for"), [(None, 54), (0, 54), (True, 54), (7200, 6480), (10**9, 24 * 3600 * 0.9)]
)
def test_token_lifetimes(expires_in: object, kept_for: float) -> None:
    """A token service that gives no usable lifetime means the spec's 60 s; at most a day is kept."""
    now = [0.0]
    state = AuthState("reg.example", None, secure=True, clock=lambda: now[0])
    body = json.dumps({"token": "t", **({} if expires_in is None else {"expires_in": expires_in})}).encode()
    drive(state, [(401, {"WWW-Authenticate": CHALLENGE}, b""), (200, {}, body), (200, {}, b"")])
    now[0] = kept_for - 0.001
    assert state.tokens.get("repository:a/b:pull") == "t"
    now[0] = kept_for
    assert state.tokens.get("repository:a/b:pull") is None


def test_token_cache_drops_the_least_recently_used() -> None:
    cache = TokenCache(capacity=2, clock=lambda: 0.0)
    cache.put("a", "ta", 60)
    cache.put("b", "tb", 60)
    assert cache.get("a") == "ta"  # a is now the most recently used
    cache.put("c", "tc", 60)
    assert (cache.get("a"), cache.get("b"), cache.get("c"), len(cache)) == ("ta", None, "tc", 2)


def test_no_credentials_to_a_plain_http_realm_of_an_https_registry(caplog: pytest.LogCaptureFixture) -> None:
    state = AuthState("reg.example", Credentials("u", "pw"), secure=True)
    challenge = 'Bearer realm="http://auth.example/token",service="reg"'
    with caplog.at_level(logging.WARNING, logger="p2pimg.sources.upstream.auth"):
        sent, _ = drive(
            state, [(401, {"WWW-Authenticate": challenge}, b""), (200, {}, token_body("t")), (200, {}, b"")]
        )
    assert "Authorization" not in sent[1].headers and "not sending credentials" in caplog.text
    assert "pw" not in caplog.text


def test_token_service_rejecting_credentials() -> None:
    state = AuthState("reg.example", Credentials("u", "pw", "/cfg/config.json"), secure=True)
    with pytest.raises(UpstreamAuthError, match="rejected the credentials of user 'u' from /cfg/config.json"):
        drive(state, [(401, {"WWW-Authenticate": CHALLENGE}, b""), (401, {}, b"")])


@pytest.mark.parametrize("body", [b"not json", b"{}", json.dumps({"token": "a\r\nX-Evil: 1"}).encode()])
def test_unusable_token_response(body: bytes) -> None:
    state = AuthState("reg.example", None, secure=True)
    with pytest.raises(UpstreamError, match="no usable token"):
        drive(state, [(401, {"WWW-Authenticate": CHALLENGE}, b""), (200, {}, body)])


def test_invalid_realm() -> None:
    state = AuthState("reg.example", None, secure=True)
    with pytest.raises(UpstreamError, match="invalid token service"):
        drive(state, [(401, {"WWW-Authenticate": 'Bearer realm="file:///etc/passwd"'}, b"")])


def test_basic_flow() -> None:
    state = AuthState("reg.example", Credentials("u", "pw"), secure=True)
    sent, status = drive(state, [(401, {"WWW-Authenticate": 'Basic realm="r"'}, b""), (200, {}, b"")])
    assert status == 200 and sent[1].headers["Authorization"] == "Basic " + b64("u:pw")
    sent, _ = drive(state, [(200, {}, b"")])  # known to want basic: sent up front
    assert sent[0].headers["Authorization"] == "Basic " + b64("u:pw")
    anonymous = AuthState("reg.example", None, secure=True)
    assert drive(anonymous, [(401, {"WWW-Authenticate": 'Basic realm="r"'}, b"")])[1] == 401


# -- generated client configuration ------------------------------------------------------------


def test_containerd_hosts_toml_docker_hub() -> None:
    doc = tomllib.loads(containerd_hosts_toml("docker.io", "http://127.0.0.1:5050"))
    assert doc["server"] == "https://registry-1.docker.io"
    assert doc["host"] == {"http://127.0.0.1:5050": {"capabilities": ["pull", "resolve"]}}


def test_containerd_hosts_toml_other_registry_and_tls_options() -> None:
    doc = tomllib.loads(containerd_hosts_toml("ghcr.io", "127.0.0.1:5050"))
    assert doc["server"] == "https://ghcr.io"
    # A bare mirror is plain HTTP (as p2pimg serves); skip_verify is about TLS, so never here.
    assert doc["host"] == {"http://127.0.0.1:5050": {"capabilities": ["pull", "resolve"]}}
    plain = tomllib.loads(containerd_hosts_toml("ghcr.io", "http://127.0.0.1:5050", skip_verify=True))
    assert "skip_verify" not in plain["host"]["http://127.0.0.1:5050"]
    tls = tomllib.loads(
        containerd_hosts_toml("index.docker.io", "https://mirror.local:5443", skip_verify=True)
    )
    assert tls["server"] == "https://registry-1.docker.io"
    assert tls["host"]["https://mirror.local:5443"] == {
        "capabilities": ["pull", "resolve"],
        "skip_verify": True,
    }
    local = tomllib.loads(
        containerd_hosts_toml("127.0.0.1:5000", "http://127.0.0.1:5050", server="http://127.0.0.1:5000")
    )
    assert local["server"] == "http://127.0.0.1:5000"


@pytest.mark.parametrize(
    ("registry", "mirror"),
    [
        ('docker.io"\nx = "', "http://127.0.0.1:5050"),
        ("docker.io", 'http://127.0.0.1:5050"]\n'),
        ("docker.io", "http://127.0.0.1:5050/path"),
        ("docker.io", "ftp://127.0.0.1:5050"),
        ("https://docker.io", "http://127.0.0.1:5050"),
    ],
)
def test_config_generators_refuse_bad_input(registry: str, mirror: str) -> None:
    with pytest.raises(InvalidInput):
        containerd_hosts_toml(registry, mirror)
    with pytest.raises(InvalidInput):
        podman_registries_conf(registry, mirror)


def test_podman_registries_conf() -> None:
    doc = tomllib.loads(podman_registries_conf("docker.io", "http://127.0.0.1:5050"))
    assert doc == {
        "registry": [{"location": "docker.io", "mirror": [{"location": "127.0.0.1:5050", "insecure": True}]}]
    }
    tls = tomllib.loads(podman_registries_conf("registry-1.docker.io", "https://mirror.local:5443"))
    assert tls["registry"][0]["location"] == "docker.io"
    assert tls["registry"][0]["mirror"] == [{"location": "mirror.local:5443", "insecure": False}]
