"""Mutual TLS between peers: which files a node uses, the clear errors for bad ones, and the
`tls=1` mDNS flag that makes discovered peers https URLs. (Peers talking TLS with real processes:
tests/integration/test_swarm.py::test_mutual_tls_between_peers.)"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import httpx
import pytest
import trio
import trustme

from p2pimg.errors import InvalidInput
from p2pimg.fetch.engine import Fetcher
from p2pimg.metrics import Metrics
from p2pimg.node.config import load_config
from p2pimg.node.discovery import announcements
from p2pimg.node.node import Swarm
from p2pimg.node.peertls import PeerTls, load_peer_tls
from p2pimg.store.chunks import ChunkStore


def write_files(where: Path, ca: trustme.CA) -> list[Path]:
    where.mkdir(parents=True, exist_ok=True)
    leaf = ca.issue_cert("127.0.0.1")
    paths = [where / "peer.crt", where / "peer.key", where / "ca.crt"]
    leaf.cert_chain_pems[0].write_to_path(str(paths[0]))
    leaf.private_key_pem.write_to_path(str(paths[1]))
    ca.cert_pem.write_to_path(str(paths[2]))
    return paths


def test_no_files_means_plain_http(tmp_path: Path) -> None:
    assert load_peer_tls(tmp_path) is None


def test_home_tls_directory_is_the_default(tmp_path: Path) -> None:
    paths = write_files(tmp_path / "tls", trustme.CA())
    tls = load_peer_tls(tmp_path)
    assert tls == PeerTls(*paths)
    server, client = tls.server_context(), tls.client_context()
    assert server.verify_mode == client.verify_mode == ssl.CERT_REQUIRED
    assert not client.check_hostname  # membership is the CA's signature, not an address
    assert server.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_flags_win_over_the_home(tmp_path: Path) -> None:
    write_files(tmp_path / "tls", trustme.CA())
    flags = write_files(tmp_path / "elsewhere", trustme.CA())
    assert load_peer_tls(tmp_path, *map(str, flags)) == PeerTls(*flags)
    config = load_config(home=str(tmp_path), peer_tls=(str(flags[0]), str(flags[1]), str(flags[2])))
    assert load_peer_tls(config.home, *config.peer_tls) == PeerTls(*flags)


def test_config_file_keys(tmp_path: Path) -> None:
    flags = write_files(tmp_path / "certs", trustme.CA())
    (tmp_path / "config.toml").write_text(
        f'peer_tls_cert = "{flags[0]}"\npeer_tls_key = "{flags[1]}"\npeer_tls_ca = "{flags[2]}"\n'
    )
    config = load_config(home=str(tmp_path))
    assert load_peer_tls(config.home, *config.peer_tls) == PeerTls(*flags)
    (tmp_path / "config.toml").write_text("peer_tls_cert = 5\n")
    with pytest.raises(InvalidInput, match="must be file paths"):
        load_config(home=str(tmp_path))


def test_partial_and_broken_setups_are_clear_errors(tmp_path: Path) -> None:
    paths = write_files(tmp_path / "files", trustme.CA())
    with pytest.raises(InvalidInput, match="needs all of --peer-tls-cert"):
        load_peer_tls(tmp_path, str(paths[0]), str(paths[1]), None)
    half = tmp_path / "half"
    write_files(half / "tls", trustme.CA())
    (half / "tls" / "ca.crt").unlink()
    with pytest.raises(InvalidInput, match="half set up.*ca.crt"):
        load_peer_tls(half)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(InvalidInput, match="cannot use the peer certificate"):
        load_peer_tls(tmp_path, str(garbage), str(paths[1]), str(paths[2]))
    with pytest.raises(InvalidInput, match="cannot use the swarm CA"):
        load_peer_tls(tmp_path, str(paths[0]), str(paths[1]), str(garbage))
    other_key = write_files(tmp_path / "other", trustme.CA())[1]
    with pytest.raises(InvalidInput, match="cannot use the peer certificate"):
        load_peer_tls(tmp_path, str(paths[0]), str(other_key), str(paths[2]))  # key of another cert


def test_tls_flag_in_txt_makes_https_urls() -> None:
    def txt(**fields: str) -> dict[bytes, bytes | None]:
        return {k.encode(): v.encode() for k, v in fields.items()}

    plain = announcements("b._p2pimg._tcp.local.", txt(node="b", v="1"), ["10.0.0.9"], 5051, own_node_id="me")
    secure = announcements(
        "b._p2pimg._tcp.local.",
        txt(node="b", v="1", tls="1"),
        ["10.0.0.9", "fd00::2"],
        5051,
        own_node_id="me",
    )
    assert [a.url for a in plain] == ["http://10.0.0.9:5051"]
    assert [a.url for a in secure] == ["https://10.0.0.9:5051", "https://[fd00::2]:5051"]


async def test_a_tls_node_takes_only_https_peers(
    tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    fetcher = Fetcher(ChunkStore(tmp_path / "cache"), [], nursery, metrics=Metrics())
    async with httpx.AsyncClient() as client:
        swarm = Swarm(fetcher, "me", [], client, tls=True)
        with caplog.at_level(logging.WARNING, logger="p2pimg.node.node"):
            for _ in range(3):  # as mDNS would report it again and again
                assert not swarm.add("http://10.0.0.9:5051", "b")
        assert caplog.text.count("only over mutual TLS") == 1  # said once, not on every report
        assert swarm.add("https://10.0.0.9:5051", "b") and list(swarm.peers) == ["https://10.0.0.9:5051"]
        assert not swarm.add("https://10.0.0.1:5051", "me")  # this very node
