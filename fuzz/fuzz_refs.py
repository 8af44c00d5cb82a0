"""Fuzz target: image references, names, tags, registry repositories, warm refs and config values."""

from __future__ import annotations

import _harness  # first: puts the project on sys.path

from p2pimg.content import model
from p2pimg.node import config, warm
from p2pimg.web import registry

SEEDS = [
    b"demo/app:1",
    b"library/alpine:3.20",
    b"ipfs/bafyreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy",
    b"a.b__c-d/e:_T.1",
    b"127.0.0.1:5000",
    b"[::1]:0",
    b"64MiB",
    b"4k",
    b"1048576",
]


def test_one_input(data: bytes) -> None:
    s = _harness.text(_harness.seeded(data, SEEDS))
    if _harness.allowed(model.check_name, s) is not None:
        assert len(s) <= model.MAX_NAME_LENGTH and ".." not in s.split("/")
    if _harness.allowed(model.check_tag, s) is not None:
        assert 1 <= len(s) <= 128
    parsed = _harness.allowed(model.parse_name_tag, s)
    if parsed is not None:
        assert f"{parsed[0]}:{parsed[1]}" == s
    if _harness.allowed(registry.check_repository, s) is not None:
        assert model.check_name(s) == s
    _harness.allowed(warm.parse_ref, s)
    size = _harness.allowed(model.parse_size, s)
    assert size is None or isinstance(size, int)
    listen = _harness.allowed(config.parse_listen, s)
    if listen is not None:
        assert listen[0] and 0 <= listen[1] <= 65535


if __name__ == "__main__":
    _harness.main(test_one_input)
