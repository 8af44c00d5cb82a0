"""The swarm key's request proofs and its loading."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pimg.errors import InvalidInput
from p2pimg.node.swarmkey import SCHEME, check, load_swarm_key, token

KEY = b"0123456789abcdef0123456789abcdef"


def test_proof_binds_key_method_path_and_minute() -> None:
    now = 1_800_000_000.0
    minute = int(now // 60)
    good = f"{SCHEME} {token(KEY, 'GET', '/p2pimg/v1/info', minute)}"
    assert check(KEY, good, "GET", "/p2pimg/v1/info", now) == 200
    assert check(KEY, good, "GET", "/p2pimg/v1/info", now + 60) == 200  # a minute of clock skew
    assert check(KEY, good, "GET", "/p2pimg/v1/info", now + 120) == 403  # too old: a replay
    assert check(KEY, good, "POST", "/p2pimg/v1/info", now) == 403
    assert check(KEY, good, "GET", "/p2pimg/v1/have/x", now) == 403
    assert check(b"another key of enough length!!", good, "GET", "/p2pimg/v1/info", now) == 403
    assert check(KEY, None, "GET", "/", now) == 401
    assert check(KEY, "Bearer abc", "GET", "/", now) == 401
    assert check(KEY, f"{SCHEME} ", "GET", "/", now) == 401


def test_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("P2PIMG_SWARM_KEY", raising=False)
    assert load_swarm_key(tmp_path) is None  # no key anywhere: an open swarm
    (tmp_path / "swarm.key").write_text("  " + KEY.decode() + "\n")
    assert load_swarm_key(tmp_path) == KEY
    short = tmp_path / "short.key"
    short.write_text("abc")
    with pytest.raises(InvalidInput, match="too short"):
        load_swarm_key(tmp_path, str(short))
    with pytest.raises(InvalidInput, match="cannot read"):
        load_swarm_key(tmp_path, str(tmp_path / "missing.key"))
    monkeypatch.setenv("P2PIMG_SWARM_KEY", "from-the-environment-1234")
    assert load_swarm_key(tmp_path) == b"from-the-environment-1234"
    # The command line wins over the environment, which wins over the config file.
    flag = tmp_path / "flag.key"
    flag.write_text("from-the-command-line-5678\n")
    assert load_swarm_key(tmp_path, str(flag), given=True) == b"from-the-command-line-5678"
    assert load_swarm_key(tmp_path, str(flag), given=False) == b"from-the-environment-1234"


def test_the_flag_wins_through_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from p2pimg.node.config import load_config

    monkeypatch.setenv("P2PIMG_SWARM_KEY", "from-the-environment-1234")
    home = tmp_path / "home"
    home.mkdir()
    configured = tmp_path / "configured.key"
    configured.write_text("from-the-config-file-9012")
    (home / "config.toml").write_text(f'swarm_key_file = "{configured}"\n')
    flag = tmp_path / "flag.key"
    flag.write_text("from-the-command-line-5678")
    by_flag = load_config(home=str(home), swarm_key_file=str(flag))
    assert load_swarm_key(by_flag.home, by_flag.swarm_key_file,
                          given=by_flag.swarm_key_file_given) == b"from-the-command-line-5678"
    by_file = load_config(home=str(home))
    assert load_swarm_key(by_file.home, by_file.swarm_key_file,
                          given=by_file.swarm_key_file_given) == b"from-the-environment-1234"
    monkeypatch.delenv("P2PIMG_SWARM_KEY")
    assert load_swarm_key(by_file.home, by_file.swarm_key_file,
                          given=by_file.swarm_key_file_given) == b"from-the-config-file-9012"
