"""Shared plumbing for the fuzz targets: atheris when it is there, a plain-Python smoke mode when not.

Each target defines `test_one_input(data: bytes)` that feeds `data` to one family of parsers.
A parser may accept its input or raise `P2pimgError`; any other exception escapes
`test_one_input` and is a crash (atheris stops and writes the input to `crash-<sha1>`).

    python fuzz/fuzz_X.py -atheris_runs=100000      # libFuzzer via atheris (x86_64 Linux)
    python fuzz/fuzz_X.py --smoke 500 [--seed 1]     # N random inputs, plain Python, no atheris
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from p2pimg.errors import P2pimgError  # noqa: E402

try:
    import atheris
except ImportError:  # not installed, or not an x86_64 wheel: only --smoke works
    atheris = None


def allowed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a parser: its result, or None when it refused the input with a P2pimgError."""
    try:
        return fn(*args, **kwargs)
    except P2pimgError as exc:
        if not isinstance(exc.message, str):
            raise AssertionError(f"{type(exc).__name__} without a text message") from exc
        return None


def text(data: bytes) -> str:
    """The input as text the way the HTTP edge sees it (percent-decoded UTF-8, errors replaced)."""
    return data.decode("utf-8", "replace")


def mutate(seed: bytes, edits: bytes) -> bytes:
    """Apply byte edits driven by `edits` to `seed`: overwrite, insert, delete or truncate."""
    out = bytearray(seed)
    for i in range(0, len(edits) - 2, 3):
        op, pos, value = edits[i] % 4, edits[i + 1], edits[i + 2]
        at = (pos * 257 + value) % (len(out) + 1)
        if op == 0 and out:
            out[at % len(out)] = value
        elif op == 1:
            out.insert(at, value)
        elif op == 2 and out:
            del out[at % len(out)]
        elif op == 3:
            del out[at:]
    return bytes(out)


def seeded(data: bytes, seeds: Sequence[bytes]) -> bytes:
    """Half the inputs are taken as is, half as edits of a known-good seed (near-valid inputs)."""
    if not data or not seeds or data[0] & 1 == 0:
        return data[1:]
    if len(data) < 2:
        return seeds[0]
    return mutate(seeds[data[1] % len(seeds)], data[2:])


def smoke_inputs(n: int, seed: int = 0) -> Iterator[bytes]:
    """N pseudo-random inputs: random bytes, printable text and edit scripts (deterministic)."""
    rng = random.Random(seed)
    alphabet = b"abcz019:/@.-_=+,%[]{}\"' \r\n\t\x00\xff\xc2\xb2sha256bytesipfs"
    for i in range(n):
        size = rng.choice((0, 1, 2, 8, 32, 100, 300, 1000))
        if i % 3 == 0:
            yield rng.randbytes(size)
        elif i % 3 == 1:
            yield bytes(rng.choice(alphabet) for _ in range(size))
        else:
            yield bytes([rng.randrange(256) | 1, rng.randrange(256)]) + rng.randbytes(size)


def run_smoke(test_one_input: Callable[[bytes], None], n: int, seed: int = 0) -> int:
    for i, data in enumerate(smoke_inputs(n, seed)):
        try:
            test_one_input(data)
        except BaseException:
            print(f"crash on smoke input {i} (seed {seed}): {data!r}", file=sys.stderr)
            raise
    return n


def main(test_one_input: Callable[[bytes], None]) -> None:
    argv = sys.argv[1:]
    if "--smoke" in argv:
        at = argv.index("--smoke")
        n = int(argv[at + 1]) if at + 1 < len(argv) else 1000
        seed = int(argv[argv.index("--seed") + 1]) if "--seed" in argv else 0
        run_smoke(test_one_input, n, seed)
        print(f"{Path(sys.argv[0]).name}: {n} smoke inputs, no crash")
        return
    if atheris is None:
        sys.exit("atheris is not installed: run with --smoke N, or pip install 'atheris>=2.3' (x86_64)")
    atheris.instrument_all()  # coverage feedback for p2pimg and the libraries it parses with
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
