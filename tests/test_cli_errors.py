"""What the command line says and exits with when it cannot do what it was asked (the README's
exit codes: 2 bad input, 3 not found): one line, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pimg", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "P2PIMG_MDNS": "0"},
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_ls_of_an_origin_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-origin"
    result = run_cli("ls", "--origin", missing.as_uri(), home=tmp_path / "home")
    assert result.returncode == 3
    assert "does not exist" in one_line(result) and str(missing) in result.stderr
    # A home's own origin before its first publish is just empty.
    fresh = run_cli("ls", home=tmp_path / "home")
    assert fresh.returncode == 0 and "no images are published" in one_line(fresh)


def test_publish_of_a_file_that_is_not_a_tar_archive(tmp_path: Path) -> None:
    archive = tmp_path / "app.tar"
    archive.write_text("not a tar archive\n")
    result = run_cli("publish", f"docker-archive:{archive}", "demo/app:1", home=tmp_path / "home")
    assert result.returncode == 2
    assert "is not a tar archive" in one_line(result)


def test_warm_of_an_unpublished_name_exits_not_found(tmp_path: Path) -> None:
    result = run_cli("warm", "demo/app:nope", "--no-mdns", home=tmp_path / "home")
    assert result.returncode == 3, result.stderr
    assert "not published" in one_line(result)
