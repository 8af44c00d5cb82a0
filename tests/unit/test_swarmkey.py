"""The swarm key's request proofs (fresh, used once, bound to the request) and its loading."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest

from p2pimg.errors import InvalidInput
from p2pimg.node.swarmkey import SCHEME, SwarmAuth, SwarmGuard, load_swarm_key, sign

KEY = b"0123456789abcdef0123456789abcdef"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


NOW = 1_800_000_000.0
INFO = "/p2pimg/v1/info"
NODE = "0123456789abcdef0123456789abcdef"  # the guarded node's id


def _guard(**options: object) -> tuple[SwarmGuard, Clock]:
    clock = Clock(NOW)
    return SwarmGuard(KEY, NODE, clock=clock, **options), clock  # type: ignore[arg-type]


def test_a_proof_is_taken_once() -> None:
    guard, _clock = _guard()
    proof = sign(KEY, "GET", INFO, now=NOW)
    assert guard.admit(proof, "GET", INFO).status == 200
    replay = guard.admit(proof, "GET", INFO)
    assert replay.status == 403 and "replayed" in replay.reason and replay.signed
    assert guard.admit(sign(KEY, "GET", INFO, now=NOW), "GET", INFO).ok  # a new nonce: a new request


def test_a_proof_binds_key_method_path_and_body() -> None:
    guard, _clock = _guard()
    proof = sign(KEY, "POST", "/p2pimg/v1/warm", b'{"ref": "demo/app:1"}', to=NODE, now=NOW)
    wrong = guard.admit(proof, "GET", "/p2pimg/v1/warm")
    assert wrong.reason == "wrong swarm key" and not wrong.signed
    assert guard.admit(proof, "POST", "/p2pimg/v1/warm/x").reason == "wrong swarm key"
    assert (
        _guard()[0].admit(sign(b"another key of enough length!!", "GET", INFO, now=NOW), "GET", INFO).reason
        == "wrong swarm key"
    )
    # A forged field breaks the signature: the body digest, the timestamp, the nonce.
    for field, value in (("body", "0" * 64), ("ts", str(int(NOW * 1000) + 1)), ("nonce", "0" * 32)):
        forged = re.sub(rf"{field}=[0-9a-f]+", f"{field}={value}", proof)
        assert forged != proof and guard.admit(forged, "POST", "/p2pimg/v1/warm").status == 403
    assert guard.admit(proof, "POST", "/p2pimg/v1/warm").ok
    assert guard.body_matches(proof, b'{"ref": "demo/app:1"}').ok
    tampered = guard.body_matches(proof, b'{"ref": "evil/app:1"}')
    assert tampered.status == 403 and "body" in tampered.reason
    assert guard.body_matches(sign(KEY, "GET", INFO, now=NOW), b"").ok  # no body: the empty one


def test_a_proof_is_good_within_the_window_only() -> None:
    guard, clock = _guard()
    for skew in (-30, -29.5, 0, 29.5, 30):  # the sender's clock behind or ahead of ours
        assert guard.admit(sign(KEY, "GET", INFO, now=NOW + skew), "GET", INFO).ok, skew
    for skew in (-30.01, 30.01, -120, 3600):
        stale = guard.admit(sign(KEY, "GET", INFO, now=NOW + skew), "GET", INFO)
        assert stale.status == 403 and "clock" in stale.reason, skew
    captured = sign(KEY, "GET", INFO, now=NOW)
    clock.now = NOW + 31  # captured, then sent again once its nonce may be forgotten
    assert guard.admit(captured, "GET", INFO).status == 403


def test_nonces_are_remembered_within_bounds() -> None:
    guard, clock = _guard(max_nonces=8)
    proofs = []
    for i in range(100):  # far more than it remembers, all within one window
        clock.now = NOW + i * 0.1
        proofs.append(sign(KEY, "GET", INFO, now=clock.now))
        assert guard.admit(proofs[-1], "GET", INFO).ok
        assert guard.remembered <= 8
    # Every one of them is refused again: the recent ones by their nonce, the forgotten ones
    # because they are stamped no later than the newest proof forgotten.
    assert all(guard.admit(proof, "GET", INFO).status == 403 for proof in proofs)
    assert guard.admit(sign(KEY, "GET", INFO, now=clock.now), "GET", INFO).ok  # new ones still pass
    # Out of the window, nonces are forgotten by time: memory shrinks back.
    clock.now += 60
    assert guard.admit(sign(KEY, "GET", INFO, now=clock.now), "GET", INFO).ok
    assert guard.remembered == 1


def test_a_clock_going_back_does_not_reopen_forgotten_nonces() -> None:
    guard, clock = _guard()
    captured = sign(KEY, "GET", INFO, now=NOW)
    assert guard.admit(captured, "GET", INFO).ok
    clock.now = NOW + 120  # its nonce is forgotten...
    assert guard.admit(sign(KEY, "GET", INFO, now=clock.now), "GET", INFO).ok
    assert guard.remembered == 1
    clock.now = NOW  # ...and this clock is set back
    assert guard.admit(captured, "GET", INFO).status == 403


def test_what_is_not_a_proof() -> None:
    guard, _clock = _guard()
    for header in (None, "", "Bearer abc", f"{SCHEME}", f"{SCHEME} "):
        assert guard.admit(header, "GET", "/").status == 401
    # The previous scheme (an HMAC of the minute) and garbage: a proof that cannot hold.
    version_2 = re.sub(r",to=[^,]*", "", sign(KEY, "GET", INFO).replace("v=3", "v=2"))  # named no node
    for header in (
        f"{SCHEME} {'0' * 64}",
        f"{SCHEME} v=1,ts=1",
        version_2,
        sign(KEY, "GET", "/").replace("v=3", "v=4"),
    ):
        refused = guard.admit(header, "GET", "/")
        assert refused.status == 403 and "version" in refused.reason
    assert guard.remembered == 0  # nothing that failed is remembered: strangers cannot fill it


def test_swarm_auth_signs_each_request_afresh_with_its_body() -> None:
    guard, clock = _guard()
    clock.now = time.time()
    auth = SwarmAuth(KEY)
    auth.nodes["http://10.0.0.5:5051"] = NODE  # learnt (see test_swarm_targets.py for how)
    sent = []
    for body in (b'{"ref": "demo/app:1"}', b'{"ref": "demo/app:1"}'):
        request = httpx.Request("POST", "http://10.0.0.5:5051/p2pimg/v1/warm", content=body)
        flow = auth.auth_flow(request)
        sent.append(next(flow).headers["authorization"])
        assert guard.admit(sent[-1], "POST", "/p2pimg/v1/warm").ok
        assert guard.body_matches(sent[-1], body).ok
    assert sent[0] != sent[1]  # same request, new nonce
    assert auth.requires_request_body


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
    assert (
        load_swarm_key(by_flag.home, by_flag.swarm_key_file, given=by_flag.swarm_key_file_given)
        == b"from-the-command-line-5678"
    )
    by_file = load_config(home=str(home))
    assert (
        load_swarm_key(by_file.home, by_file.swarm_key_file, given=by_file.swarm_key_file_given)
        == b"from-the-environment-1234"
    )
    monkeypatch.delenv("P2PIMG_SWARM_KEY")
    assert (
        load_swarm_key(by_file.home, by_file.swarm_key_file, given=by_file.swarm_key_file_given)
        == b"from-the-config-file-9012"
    )
