"""What a new user meets on the command line: help for every command and option, the sample image
the README's "Using it" starts from, the unsigned-tags warning given once per home, and a demo
that leaves the user's home alone."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pimg.cli import helptext
from p2pimg.cli.main import build_parser

UNSIGNED_WARNING = "no publisher key is trusted"
PACKAGE = Path(__file__).resolve().parents[1] / "p2pimg"


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pimg", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
        env={**os.environ, "P2PIMG_MDNS": "0", **(env or {})},
    )


def parsers(
    parser: argparse.ArgumentParser, path: str = "p2pimg"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every parser under `parser` (itself included), by command path."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            listed = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                assert listed.get(name), f"{path} {name}: no help line in the command list"
                yield from parsers(child, f"{path} {name}")


# --- help -----------------------------------------------------------------------------------------


def test_every_command_has_a_description_and_every_option_a_help_text() -> None:
    seen = []
    for path, parser in parsers(build_parser()):
        seen.append(path)
        assert parser.description and parser.description.strip(), f"`{path} --help` has no description"
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            name = "/".join(action.option_strings) or action.metavar or action.dest
            assert action.help and action.help != argparse.SUPPRESS, f"{path} {name}: no help text"
    assert {"p2pimg publish", "p2pimg serve", "p2pimg cache verify", "p2pimg demo", "p2pimg sample"} <= set(
        seen
    )


def test_top_level_help_speaks_to_users_and_names_the_environment_and_config_file() -> None:
    parser = build_parser()
    text = parser.format_help()
    # The developer's module docstring is not what users read.
    assert "nothing else" not in text and parser.description == helptext.DESCRIPTION
    # Every P2PIMG_* variable the code reads, and every config.toml key load_config reads.
    sources = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    variables = set(re.findall(r"environ\.get\(\"(P2PIMG_\w+)\"", sources))
    assert {"P2PIMG_HOME", "P2PIMG_ORIGIN", "P2PIMG_CHUNK_SIZE", "P2PIMG_SWARM_KEY"} <= variables
    config = (PACKAGE / "node" / "config.py").read_text()
    keys = set(re.findall(r"file_values\.get\(\"(\w+)\"", config))
    assert 'f"peer_tls_{part}"' in config
    keys |= {"peer_tls_cert", "peer_tls_key", "peer_tls_ca"}
    assert {"origin", "listen", "chunk_size", "policy"} <= keys
    for word in sorted(variables | keys | {"config.toml", "exit codes"}):
        assert re.search(rf"\b{word}\b", text), f"`p2pimg --help` does not mention {word}"


def test_publish_help_gives_the_source_syntax_the_readme_gives() -> None:
    parser = dict(parsers(build_parser()))["p2pimg publish"]
    help_text = " ".join(parser.format_help().split())
    readme = (PACKAGE.parent / "README.md").read_text()
    for syntax in ("oci:DIR[:TAG]", "docker-archive:FILE[:NAME:TAG]", "docker://HOST/REPO:TAG"):
        assert syntax in help_text and syntax in readme, syntax


# --- the sample image -----------------------------------------------------------------------------


def test_sample_writes_a_layout_and_an_archive_that_publish_accepts(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = run_cli("sample", ".", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "layout" / "oci-layout").is_file() and (tmp_path / "layout" / "index.json").is_file()
    assert (tmp_path / "app.tar").is_file()
    # It prints the README's two publish commands; they work as printed.
    commands = result.stdout.splitlines()
    assert commands == [
        "p2pimg publish oci:./layout:1 demo/app:1",
        "p2pimg publish docker-archive:./app.tar demo/app:2",
    ]
    roots = []
    for command in commands:
        published = run_cli(*command.split()[1:], "--home", str(home), cwd=tmp_path)
        assert published.returncode == 0, published.stderr
        roots.append(published.stdout.splitlines()[-1])
    assert all(root.startswith("bafy") for root in roots) and roots[0] != roots[1]
    listed = run_cli("ls", "--home", str(home))
    assert listed.stdout.split() == ["demo/app:1", "demo/app:2"]
    # A second run does not write over what is there.
    again = run_cli("sample", str(tmp_path))
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr


# --- the unsigned-tags warning --------------------------------------------------------------------


def test_the_unsigned_tags_warning_is_given_once_per_home(tmp_path: Path) -> None:
    home, other = tmp_path / "home", tmp_path / "other"
    publish = ("publish", f"oci:{tmp_path / 'layout'}:1", "demo/app:1", "--home", str(home))
    assert run_cli("sample", str(tmp_path)).returncode == 0
    assert run_cli(*publish).returncode == 0
    first = run_cli("resolve", "demo/app:1", "--home", str(home))
    assert first.returncode == 0 and UNSIGNED_WARNING in first.stderr
    # The warning names the command that fixes it, for this very home.
    assert f"p2pimg keygen --home {home}" in first.stderr and f"{home}/trust/" in first.stderr
    for args in (["resolve", "demo/app:1"], ["warm", "demo/app:1", "--no-mdns"]):
        later = run_cli(*args, "--home", str(home))
        assert later.returncode == 0, later.stderr
        assert UNSIGNED_WARNING not in later.stderr, later.stderr
    # Another home reading the same origin is told too, once.
    origin = ["--origin", (home / "origin").as_uri()]
    assert UNSIGNED_WARNING in run_cli("resolve", "demo/app:1", "--home", str(other), *origin).stderr
    assert UNSIGNED_WARNING not in run_cli("resolve", "demo/app:1", "--home", str(other), *origin).stderr
    # Once the home has a key, it signs and checks: nothing to warn about.
    assert run_cli("keygen", "--home", str(home)).returncode == 0
    assert run_cli(*publish).returncode == 0
    (home / "unsigned-tags-accepted").unlink()
    signed = run_cli("resolve", "demo/app:1", "--home", str(home))
    assert signed.returncode == 0 and UNSIGNED_WARNING not in signed.stderr, signed.stderr


# --- the demo -------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed (apt-get install skopeo)")
def test_demo_works_in_a_home_of_its_own(tmp_path: Path) -> None:
    users_home = tmp_path / "users-home"
    result = run_cli(
        "demo", "--listen", "127.0.0.1:0", env={"P2PIMG_HOME": str(users_home), "TMPDIR": str(tmp_path)}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not users_home.exists()
    demo_home = re.search(r"^demo home: (\S+) \(temporary", result.stdout, re.MULTILINE)
    assert demo_home is not None, result.stdout
    assert Path(demo_home[1]).parent == tmp_path and not Path(demo_home[1]).exists()  # removed after
    assert result.stdout.count("pulled ") == 2 and UNSIGNED_WARNING not in result.stderr
