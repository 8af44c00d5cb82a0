"""The OCI distribution-spec conformance suite's read-only workflows (pull and content discovery,
pre-seeded content), run against p2pimg by name and by `ipfs/<CID>`, and against the Go registry
(Debian's docker-registry, distribution 2.8) for comparison.

The suite itself is Go (github.com/opencontainers/distribution-spec/conformance); CI has neither
Go nor its source, so the checks it makes in read-only mode (`OCI_API_PUSH=false` with
`OCI_RO_DATA_*`: run.go's TestPing, TestEmpty, TestList, TestHead, TestPull, TestReferrers and
TestManifestErrors) are made here, each under the suite's own name, plus a few of its push-mode
checks that read-only content can feed (the referrers' descriptors and the artifactType filter)
and the 404s of the 1.1 suite's pull workflow. `tools/conformance.py` builds and runs the Go
suite itself where its source and Go 1.24 are at hand (test_go_suite below, when configured).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from _referrers import OCI_INDEX, WithReferrers, layout_with_referrers

from p2pimg.content.referrers import layout_manifests
from p2pimg.errors import SPEC_CODES

if TYPE_CHECKING:
    from conftest import P2pimgServe, Registry, RunP2pimg, SampleCache, Skopeo

REPO = "conformance/app"
TAGS = ("v1", "v2")  # two tags: TestList checks `last` only with at least two


@dataclass
class ROData:
    """What the suite is told is there (OCI_RO_DATA_*), plus what it would know in push mode."""

    tags: list[str]
    manifests: dict[str, bytes]  # digest -> exact bytes
    blobs: dict[str, bytes]
    referrers: dict[str, list[dict[str, Any]]]  # subject -> the descriptors listed for it


@dataclass
class Target:
    name: str
    base: str  # http://HOST:PORT
    repo: str
    data: ROData


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_only_data(layout: WithReferrers, tags: list[str]) -> ROData:
    """Every manifest and blob of the image and its referrers, read from the layout."""
    blobs_dir = layout.path / "blobs" / "sha256"

    def read(digest: str, _size: int = -1) -> bytes:
        return (blobs_dir / digest.removeprefix("sha256:")).read_bytes()

    index = json.loads((layout.path / "index.json").read_bytes())
    found = layout_manifests([(d["digest"], d["size"], d["mediaType"]) for d in index["manifests"]], read)
    wanted = [layout.top, *layout.of_top(), layout.sbom_signature]
    manifests = {m.digest: found[m.digest][2] for m in wanted}
    blobs: dict[str, bytes] = {}
    for data in manifests.values():
        doc = json.loads(data)
        for desc in [doc["config"]] if "config" in doc else []:
            blobs[desc["digest"]] = read(desc["digest"])
        for desc in doc.get("layers", []):
            blobs[desc["digest"]] = read(desc["digest"])
    referrers = {
        layout.top.digest: [r.listed() for r in layout.of_top()],
        layout.sbom.digest: [layout.sbom_signature.listed()],
    }
    return ROData(tags, manifests, blobs, referrers)


# -- the checks --------------------------------------------------------------------------------

Check = Callable[[httpx.Client, Target], None]
CHECKS: dict[str, Check] = {}


def check(name: str) -> Callable[[Check], Check]:
    def register(fn: Check) -> Check:
        CHECKS[name] = fn
        return fn

    return register


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def expect_status(r: httpx.Response, *statuses: int) -> None:
    expect(
        r.status_code in statuses,
        f"{r.request.method} {r.request.url.path}: expected {statuses}, got {r.status_code}: {r.text[:200]}",
    )


def expect_spec_error(r: httpx.Response) -> None:
    """A 4xx JSON error body has the spec's format and one of its codes."""
    if r.request.method == "HEAD" or not r.headers.get("content-type", "").startswith("application/json"):
        return
    codes = [e.get("code") for e in r.json().get("errors", [])]
    expect(bool(codes) and all(c in SPEC_CODES for c in codes), f"{r.request.url.path}: error codes {codes}")


def expect_digest(r: httpx.Response, digest: str) -> None:
    header = r.headers.get("docker-content-digest")
    expect(header in (None, digest), f"{r.request.url.path}: Docker-Content-Digest {header}, not {digest}")


def referrers_index(r: httpx.Response) -> list[dict[str, Any]]:
    expect_status(r, 200)
    expect(
        r.headers.get("content-type") == OCI_INDEX, f"referrers content type {r.headers.get('content-type')}"
    )
    doc = r.json()
    expect(
        doc.get("schemaVersion") == 2 and doc.get("mediaType") == OCI_INDEX,
        "referrers response is not a valid OCI index (media type and schema version)",
    )
    manifests: list[dict[str, Any]] = doc["manifests"]
    return manifests


@check("ping")
def ping(c: httpx.Client, t: Target) -> None:
    expect_status(c.get("/v2/"), 200)


@check("empty/tag list")
def empty_tag_list(c: httpx.Client, t: Target) -> None:
    r = c.get(f"/v2/{t.repo}/tags/list")
    expect_status(r, 200, 404)
    if r.status_code == 200:
        expect(isinstance(r.json().get("tags"), list), "tag list without tags")


@check("empty/referrers")
def empty_referrers(c: httpx.Client, t: Target) -> None:
    subject = sha256(secrets.token_bytes(16))
    expect(
        referrers_index(c.get(f"/v2/{t.repo}/referrers/{subject}")) == [],
        "referrers of an unknown subject are not an empty list",
    )


@check("read-only/tag-list")
def tag_list(c: httpx.Client, t: Target) -> None:
    r = c.get(f"/v2/{t.repo}/tags/list")
    expect_status(r, 200)
    tags = r.json()["tags"]
    expect(all(tag in tags for tag in t.data.tags), f"tags {t.data.tags} not all in {tags}")
    if len(tags) >= 2:
        ordered = sorted(tags)
        end = len(ordered) // 2
        r = c.get(f"/v2/{t.repo}/tags/list", params={"last": ordered[end - 1]})
        expect_status(r, 200)
        partial = r.json()["tags"]
        expect(
            not set(ordered[:end]) & set(partial) and set(ordered[end:]) <= set(partial),
            f"last={ordered[end - 1]} gave {partial}",
        )


@check("read-only/head")
def head(c: httpx.Client, t: Target) -> None:
    top = next(iter(t.data.manifests))
    accept = {"accept": f"{OCI_INDEX}, application/vnd.oci.image.manifest.v1+json"}
    for ref, digest in [*((tag, top) for tag in t.data.tags), *((d, d) for d in t.data.manifests)]:
        r = c.head(f"/v2/{t.repo}/manifests/{ref}", headers=accept)
        expect_status(r, 200)
        expect(r.content == b"", f"HEAD {ref} has a body")
        expect_digest(r, digest)
        expect(r.headers.get("content-length") == str(len(t.data.manifests[digest])), f"HEAD {ref} length")
    for digest, data in t.data.blobs.items():
        r = c.head(f"/v2/{t.repo}/blobs/{digest}")
        expect_status(r, 200)
        expect(r.content == b"" and r.headers.get("content-length") == str(len(data)), f"HEAD blob {digest}")
        expect_digest(r, digest)


@check("read-only/pull")
def pull(c: httpx.Client, t: Target) -> None:
    top = next(iter(t.data.manifests))
    accept = {"accept": f"{OCI_INDEX}, application/vnd.oci.image.manifest.v1+json"}
    for ref, digest in [*((tag, top) for tag in t.data.tags), *((d, d) for d in t.data.manifests)]:
        r = c.get(f"/v2/{t.repo}/manifests/{ref}", headers=accept)
        expect_status(r, 200)
        expect(r.content == t.data.manifests[digest], f"GET {ref}: not the manifest's bytes")
        expect(
            r.headers.get("content-type") == json.loads(r.content)["mediaType"], f"GET {ref}: content type"
        )
        expect_digest(r, digest)
    for digest, data in t.data.blobs.items():
        r = c.get(f"/v2/{t.repo}/blobs/{digest}")
        expect_status(r, 200)
        expect(sha256(r.content) == digest == sha256(data), f"GET blob {digest}: other bytes")
        expect_digest(r, digest)


@check("read-only/referrers")
def referrers(c: httpx.Client, t: Target) -> None:
    for subject, goals in t.data.referrers.items():
        listed = referrers_index(c.get(f"/v2/{t.repo}/referrers/{subject}"))
        for goal in goals:  # the push workflow's check: each referrer with its descriptor
            expect(
                any(
                    d["digest"] == goal["digest"]
                    and d["mediaType"] == goal["mediaType"]
                    and d["size"] == goal["size"]
                    and d.get("artifactType") == goal.get("artifactType")
                    and goal.get("annotations", {}).items() <= (d.get("annotations") or {}).items()
                    for d in listed
                ),
                f"referrer {goal} of {subject} not listed: {listed}",
            )
        for artifact_type in {g["artifactType"] for g in goals if "artifactType" in g}:
            r = c.get(f"/v2/{t.repo}/referrers/{subject}", params={"artifactType": artifact_type})
            listed = referrers_index(r)
            applied = [f.strip() for f in r.headers.get("oci-filters-applied", "").split(",")]
            expect("artifactType" in applied, "no OCI-Filters-Applied: artifactType")
            expect(
                sorted(d["digest"] for d in listed)
                == sorted(g["digest"] for g in goals if g.get("artifactType") == artifact_type),
                f"filter {artifact_type}: {listed}",
            )


@check("missing-manifest")
def missing_manifest(c: httpx.Client, t: Target) -> None:
    for ref in (sha256(secrets.token_bytes(1024)), f"missing-{secrets.token_hex(10)}"):
        r = c.get(f"/v2/{t.repo}/manifests/{ref}")
        expect_status(r, 404)
        expect_spec_error(r)
        expect_status(c.head(f"/v2/{t.repo}/manifests/{ref}"), 404)


@check("missing-blob")
def missing_blob(c: httpx.Client, t: Target) -> None:
    digest = sha256(secrets.token_bytes(64))
    for method in ("HEAD", "GET"):
        r = c.request(method, f"/v2/{t.repo}/blobs/{digest}")
        expect_status(r, 404)
        expect_spec_error(r)


@check("invalid-digest-format")
def invalid_digest(c: httpx.Client, t: Target) -> None:
    r = c.get(f"/v2/{t.repo}/manifests/sha256:baddigeststring")
    expect_status(r, 404, 400)
    expect_spec_error(r)


def run_checks(t: Target) -> dict[str, str]:
    """Each check's failure, by the suite's name (none: all passed)."""
    failures: dict[str, str] = {}
    with httpx.Client(base_url=t.base, timeout=30) as client:
        for name, fn in CHECKS.items():
            try:
                fn(client, t)
            except (AssertionError, KeyError, ValueError, httpx.HTTPError) as exc:
                failures[name] = f"{type(exc).__name__}: {exc}"
    return failures


# -- the targets -------------------------------------------------------------------------------


@dataclass
class World:
    layout: WithReferrers
    targets: dict[str, Target] = field(default_factory=dict)


def push_blob(c: httpx.Client, repo: str, data: bytes) -> None:
    r = c.post(f"/v2/{repo}/blobs/uploads/")
    assert r.status_code == 202, r.text
    location = httpx.URL(r.headers["location"]).copy_merge_params({"digest": sha256(data)})
    r = c.put(location, content=data, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 201, r.text


@pytest.fixture(scope="module")
def world(
    samples: SampleCache,
    run_p2pimg: RunP2pimg,
    p2pimg_serve_module: P2pimgServe,
    tmp_path_factory: pytest.TempPathFactory,
) -> World:
    sample = samples.get("multi_layer")
    layout = layout_with_referrers(sample.path, tmp_path_factory.mktemp("seeded") / "layout", tag=sample.tag)
    world = World(layout)
    home = tmp_path_factory.mktemp("p2pimg-home")
    roots = [
        run_p2pimg("publish", f"oci:{layout.path}:{sample.tag}", f"{REPO}:{tag}", home=home)
        .stdout.strip()
        .splitlines()[-1]
        for tag in TAGS
    ]
    assert roots[0] == roots[1]
    server = p2pimg_serve_module(home)
    world.targets["p2pimg by name"] = Target(
        "p2pimg by name", server.url, REPO, read_only_data(layout, list(TAGS))
    )
    world.targets["p2pimg by ipfs/CID"] = Target(
        "p2pimg by ipfs/CID", server.url, f"ipfs/{roots[0]}", read_only_data(layout, ["latest"])
    )
    return world


@pytest.mark.parametrize("target", ["p2pimg by name", "p2pimg by ipfs/CID"])
def test_p2pimg_passes_every_check(world: World, target: str) -> None:
    failures = run_checks(world.targets[target])
    assert failures == {}, json.dumps(failures, indent=1)


def test_the_checks_can_fail(world: World) -> None:
    """The same checks against content that is not there, and a name that is not published."""
    t = world.targets["p2pimg by name"]
    bogus = ROData(
        ["nope"],
        {sha256(b"m"): b"m"},
        {sha256(b"b"): b"b"},
        {next(iter(t.data.referrers)): [{"digest": sha256(b"r"), "mediaType": "x", "size": 1}]},
    )
    failures = run_checks(Target("bogus", t.base, REPO, bogus))
    assert {"read-only/tag-list", "read-only/head", "read-only/pull", "read-only/referrers"} <= set(failures)
    failures = run_checks(Target("unpublished", t.base, "not/published", t.data))
    assert "empty/referrers" in failures and "ping" not in failures


def test_reference_registry(world: World, registry: Registry, skopeo: Skopeo, samples: SampleCache) -> None:
    """The Go registry (distribution 2.8, as Debian ships it) with the same content, pushed: it
    fails the referrers checks, having no referrers API (clients fall back to the tag schema)."""
    layout = world.layout
    sample = samples.get("multi_layer")
    for tag in TAGS:
        skopeo(
            "copy",
            "--dest-tls-verify=false",
            "--preserve-digests",
            f"oci:{layout.path}:{sample.tag}",
            f"docker://{registry.host}/{REPO}:{tag}",
        )
    data = world.targets["p2pimg by name"].data
    with httpx.Client(base_url=registry.url, timeout=30) as c:
        for blob in data.blobs.values():
            push_blob(c, REPO, blob)
        # Referrers (a subject's before its own referrers' do not matter: a subject may be missing).
        for digest, manifest in data.manifests.items():
            r = c.put(
                f"/v2/{REPO}/manifests/{digest}",
                content=manifest,
                headers={"content-type": json.loads(manifest)["mediaType"]},
            )
            assert r.status_code == 201, (digest, r.text)
    failures = run_checks(Target("docker-registry", registry.url, REPO, data))
    # It has no referrers API: both referrers tests get a 404 (its router's plain "404 page not
    # found"). Debian 12's 2.8.2 also ignores `last` without `n` in a tag list, and answers a
    # malformed manifest digest with a 500 (its storage driver refuses the path), where the suite
    # wants 404 or 400: the Go registry fails those two as well (with one tag, the `last` check
    # is not made).
    known = {"empty/referrers", "read-only/referrers", "read-only/tag-list", "invalid-digest-format"}
    assert {"empty/referrers", "read-only/referrers"} <= set(failures) <= known, json.dumps(
        failures, indent=1
    )
    assert "got 404" in failures["empty/referrers"] and "got 404" in failures["read-only/referrers"]


# -- the Go suite itself, where it can be built ------------------------------------------------


def test_go_suite(tmp_path: Path) -> None:
    """tools/conformance.py: the Go suite, built from its source with Go >= 1.24 and Debian's Go
    packages, read-only against p2pimg by name and by ipfs/CID. Needs P2PIMG_CONFORMANCE_SRC (a
    distribution-spec checkout) and a Go toolchain (P2PIMG_CONFORMANCE_GO, else `go`); the Go
    packages' sources are in /usr/share/gocode unless P2PIMG_CONFORMANCE_GOPATH says otherwise."""
    src = os.environ.get("P2PIMG_CONFORMANCE_SRC")
    go = os.environ.get("P2PIMG_CONFORMANCE_GO") or shutil.which("go")
    if not src or not go:
        pytest.skip(
            "the Go conformance suite needs P2PIMG_CONFORMANCE_SRC and Go >= 1.24 (see tools/conformance.py)"
        )
    gopaths = [
        arg
        for p in os.environ.get("P2PIMG_CONFORMANCE_GOPATH", "").split(os.pathsep)
        if p
        for arg in ("--gopath", p)
    ]
    repo_root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.conformance",
            "--src",
            src,
            "--go",
            go,
            *gopaths,
            "--work",
            str(tmp_path),
        ],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [run["result"] for run in summary["runs"]] == ["Pass", "Pass"], summary
