"""Build the OCI distribution-spec conformance suite and run it read-only against p2pimg.

    python -m tools.conformance --src DIR [--go GO] [--gopath DIR ...] [--work DIR]

`--src` is a checkout of github.com/opencontainers/distribution-spec (its `conformance/` and
`specs-go/`; never copied into this repository). The suite needs Go >= 1.24 and three modules,
all Debian packages: `golang-1.24-go` (Debian 13; its statically linked toolchain runs on
Debian 12 too), `golang-github-goccy-go-yaml-dev`, `golang-github-opencontainers-go-digest-dev`,
`golang-github-opencontainers-image-spec-dev` (>= 1.1.0), whose sources land in
/usr/share/gocode (`--gopath`, the default). No module proxy is involved: the suite is built in
GOPATH mode (GO111MODULE=off) from those sources, its own `specs-go` taken from the checkout.

The run seeds content with the p2pimg CLI (a sample OCI image published as conformance/app:v1
and :v2, an SBOM and a signature attached to it with `publish --attach`), starts `p2pimg serve`,
and runs the suite twice with OCI_API_PUSH=false and the OCI_RO_DATA_* lists: by name
(conformance/app) and by `ipfs/<root CID>`. It writes `summary.json` in `--work` (each run's
result, counts and failed tests) and exits 0 when both runs pass.

The suite's read-only mode ends with a nil-pointer panic while writing results.yaml (after its
report; at distribution-spec 967efdc), so the result is read from the report it prints.

Recorded (distribution-spec 967efdc, Go 1.24.4 from Debian 13, this seed): p2pimg passes by name
(30 passed, 0 failed, 20 disabled: push and delete) and by ipfs/CID (28 passed, 0 failed, 19
disabled). Before the referrers API both runs failed the suite's two referrers tests ("empty" and
"read-only"): a 404 where an image index is due.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = "conformance/app"
TAGS = ("v1", "v2")
SBOM_TYPE = "application/spdx+json"
SIGNATURE_TYPE = "application/vnd.example.signature.v1"
_IMPORT_PATH = Path("src/github.com/opencontainers/distribution-spec")
_RESULT_RE = re.compile(r"^OCI Conformance Result: (\w+)", re.MULTILINE)
_COUNT_RE = re.compile(r"^  (Disabled|Skip|Pass|FAIL|Error|Total)\.+:\s+(\d+)", re.MULTILINE)
_FAILED_RE = re.compile(r'msg="failed test" name="([^"]+)"')


@dataclass
class Seeded:
    root: str
    top: str
    manifests: list[str]
    blobs: list[str]


def build(src: Path, go: str, gopaths: list[Path], work: Path) -> Path:
    """The suite's binary, built in GOPATH mode from `src` and the Debian Go packages' sources."""
    tree = work / "gopath" / _IMPORT_PATH
    if tree.exists():
        shutil.rmtree(tree)
    for part in ("conformance", "specs-go"):
        if not (src / part).is_dir():
            raise SystemExit(f"{src} is not a distribution-spec checkout (no {part}/)")
        shutil.copytree(src / part, tree / part)
    env = dict(
        os.environ,
        GO111MODULE="off",
        GOPROXY="off",
        GOFLAGS="",
        GOTOOLCHAIN="local",
        GOPATH=os.pathsep.join(str(p) for p in [work / "gopath", *gopaths]),
        GOCACHE=str(work / "gocache"),
    )
    goroot = Path(go).resolve().parents[1]
    if (goroot / "src" / "runtime").is_dir():
        env["GOROOT"] = str(goroot)  # a toolchain unpacked somewhere else than it was built for
    binary = work / "conformance"
    subprocess.run(
        [go, "build", "-o", str(binary), "."], cwd=tree / "conformance", env=env, check=True, timeout=600
    )
    return binary


def p2pimg(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, P2PIMG_HOME=str(home), P2PIMG_MDNS="0")
    return subprocess.run(
        [sys.executable, "-m", "p2pimg", *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )


def seed(work: Path, home: Path) -> Seeded:
    """Publish a sample image twice (two tags) and attach two artifacts; what the suite is told."""
    from p2pimg.ops.sample import LayerSpec, write_oci_layout

    image = write_oci_layout(
        work / "layout", [LayerSpec(300 << 10), LayerSpec(64 << 10, "none")], tag="v1", seed=11
    )
    for tag in TAGS:
        p2pimg("publish", f"oci:{image.path}:v1", f"{REPO}:{tag}", home=home)
    manifests = [image.top_digest]
    top = json.loads((Path(image.path) / "blobs" / "sha256" / image.top_digest[7:]).read_bytes())
    blobs = [top["config"]["digest"], *(layer["digest"] for layer in top["layers"])]
    for name, content, kind in (
        ("sbom.spdx.json", b'{"spdxVersion": "SPDX-2.3"}', SBOM_TYPE),
        ("image.sig", b"a signature", SIGNATURE_TYPE),
    ):
        (work / name).write_bytes(content)
        out = p2pimg(
            "publish",
            "--attach",
            str(work / name),
            "--artifact-type",
            kind,
            "--annotation",
            f"org.example.file={name}",
            f"{REPO}:v1",
            home=home,
        )
        attached = re.search(r"attached (sha256:[0-9a-f]{64})", out.stderr)
        if attached is None:
            raise SystemExit(f"publish --attach said no digest: {out.stderr[-500:]}")
        manifests.append(attached.group(1))
        blobs.append("sha256:" + hashlib.sha256(content).hexdigest())
    blobs.append("sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a")  # the empty {}
    root = p2pimg("resolve", f"{REPO}:v1", home=home).stdout.strip()
    return Seeded(root, image.top_digest, manifests, blobs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def serve(home: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, P2PIMG_HOME=str(home), P2PIMG_MDNS="0")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "p2pimg", "serve", "--listen", f"127.0.0.1:{port}"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.terminate()
    proc.wait(10)
    raise SystemExit(f"p2pimg serve did not start:\n{log.read_text()[-2000:]}")


def run_suite(
    binary: Path, port: int, repo: str, tags: list[str], seeded: Seeded, results: Path
) -> dict[str, Any]:
    results.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        OCI_REGISTRY=f"127.0.0.1:{port}",
        OCI_TLS="disabled",
        OCI_REPO1=repo,
        OCI_REPO2=repo,
        OCI_API_PUSH="false",
        OCI_API_BLOBS_DELETE="false",
        OCI_API_MANIFESTS_DELETE="false",
        OCI_API_TAGS_DELETE="false",
        OCI_RO_DATA_TAGS=" ".join(tags),
        OCI_RO_DATA_MANIFESTS=" ".join(seeded.manifests),
        OCI_RO_DATA_BLOBS=" ".join(seeded.blobs),
        OCI_RO_DATA_REFERRERS=seeded.top,
        OCI_RESULTS_DIR=str(results),
        OCI_LOG="warn",
    )
    env.pop("OCI_CONFIGURATION", None)
    proc = subprocess.run(
        [str(binary)], cwd=results, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    (results / "output.txt").write_text(proc.stdout + proc.stderr)
    found = _RESULT_RE.search(proc.stdout)
    return {
        "repo": repo,
        "result": found.group(1) if found else "no report",
        "counts": {k: int(v) for k, v in _COUNT_RE.findall(proc.stdout)},
        "failed": sorted(set(_FAILED_RE.findall(proc.stdout + proc.stderr))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, required=True, help="a distribution-spec checkout")
    parser.add_argument("--go", default=shutil.which("go") or "go", help="a Go >= 1.24 toolchain's go binary")
    parser.add_argument(
        "--gopath",
        type=Path,
        action="append",
        help="GOPATH directories with the suite's dependencies (default /usr/share/gocode)",
    )
    parser.add_argument(
        "--work", type=Path, help="where to build, seed and write results (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="p2pimg-conformance-"))
    work.mkdir(parents=True, exist_ok=True)
    binary = build(args.src.resolve(), args.go, args.gopath or [Path("/usr/share/gocode")], work)
    home = work / "home"
    seeded = seed(work, home)
    port = free_port()
    server = serve(home, port, work / "serve.log")
    try:
        runs = [
            {"name": "by name", **run_suite(binary, port, REPO, list(TAGS), seeded, work / "by-name")},
            {
                "name": "by ipfs/CID",
                **run_suite(binary, port, f"ipfs/{seeded.root}", ["latest"], seeded, work / "by-cid"),
            },
        ]
    finally:
        server.terminate()
        server.wait(10)
    commit = subprocess.run(
        ["git", "-C", str(args.src), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    summary = {"suite": commit or "unknown", "runs": runs}
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    for run in runs:
        counts = ", ".join(f"{k} {v}" for k, v in run["counts"].items())
        print(f"{run['name']} ({run['repo']}): {run['result']} ({counts})")
        for name in run["failed"]:
            print(f"  failed: {name}")
    print(f"results in {work}")
    return 0 if all(run["result"] == "Pass" for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
