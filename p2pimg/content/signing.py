"""Publisher keys and signed tag records (ed25519).

    $home/keys/publisher.key   the private key, PKCS#8 PEM, mode 0600; it never leaves the home
    $home/keys/publisher.pub   `p2pimg-ed25519 <base64 of the 32-byte raw public key>`
    $home/trust/*.pub          other publishers' public keys, in the same format

A key id is the first 16 hex digits of the sha256 of the raw public key. It only says which
trusted key to check a record with: the signature is always checked with the trusted key itself,
so a key id collision gains an attacker nothing.

A public key file holds one key line; blank lines and lines starting with `#` are ignored, and
anything after the base64 on the key line is a comment.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from p2pimg.content.model import TagRecord
from p2pimg.errors import InvalidInput, VerificationError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

# `cryptography` (several MiB of a node's memory) is imported where a key is used, not here: a
# node that trusts no key and signs nothing never loads it.

log = logging.getLogger(__name__)

KEYS_DIR = "keys"
TRUST_DIR = "trust"
PRIVATE_KEY_FILE = "publisher.key"
PUBLIC_KEY_FILE = "publisher.pub"
PUB_PREFIX = "p2pimg-ed25519"
RAW_KEY_SIZE = 32
_MAX_KEY_FILE = 64 << 10


class KeyFileError(InvalidInput):
    """A key file that is missing, malformed or in the way (exit code 2)."""


class TagSignatureError(VerificationError):
    """A tag record that the trust policy refuses: unsigned, unknown key or bad signature (exit 4)."""

    oci_code = "MANIFEST_INVALID"


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def private_key_path(home: Path) -> Path:
    return Path(home) / KEYS_DIR / PRIVATE_KEY_FILE


def public_key_path(home: Path) -> Path:
    return Path(home) / KEYS_DIR / PUBLIC_KEY_FILE


def trust_dir(home: Path) -> Path:
    return Path(home) / TRUST_DIR


def format_public_key(public_raw: bytes) -> str:
    return f"{PUB_PREFIX} {base64.b64encode(public_raw).decode('ascii')}\n"


def parse_public_key(text: str, *, source: str) -> bytes:
    """The raw public key of a `.pub` file's text; `source` names the file in errors."""
    lines = [ln.strip() for ln in text.splitlines()]
    keys = [ln for ln in lines if ln and not ln.startswith("#")]
    if len(keys) != 1:
        raise KeyFileError(f"{source}: expected one '{PUB_PREFIX} <base64>' line, found {len(keys)}")
    parts = keys[0].split()
    if parts[0] != PUB_PREFIX or len(parts) < 2:
        raise KeyFileError(f"{source}: not a p2pimg public key (expected '{PUB_PREFIX} <base64>')")
    try:
        raw = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{source}: the public key is not valid base64") from None
    if len(raw) != RAW_KEY_SIZE:
        raise KeyFileError(f"{source}: an ed25519 public key has {RAW_KEY_SIZE} bytes, this one {len(raw)}")
    return raw


def read_public_key(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_KEY_FILE + 1)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such public key file") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the public key ({exc.strerror})") from None
    if len(data) > _MAX_KEY_FILE:
        raise KeyFileError(f"{path}: too large for a public key file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: not a text file") from None
    return parse_public_key(text, source=str(path))


def _public_raw(key: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class Signer:
    """A publisher's private key: signs tag records."""

    private_key: Ed25519PrivateKey
    public_raw: bytes
    key_id: str

    @classmethod
    def from_private_key(cls, key: Ed25519PrivateKey) -> Signer:
        raw = _public_raw(key)
        return cls(key, raw, key_id(raw))

    def sign(self, record: TagRecord) -> TagRecord:
        """The record with this key's id and a signature over it (any old signature replaced)."""
        sig = self.private_key.sign(record.signed_bytes(key=self.key_id))
        return replace(record, key=self.key_id, sig=sig)


def generate_key(home: Path) -> Path:
    """Make the home's publisher key pair; the path of the public key file.

    Refuses (KeyFileError) when the home already has a key, rather than replace it.
    """
    keys = Path(home) / KEYS_DIR
    private, public = private_key_path(home), public_key_path(home)
    for path in (private, public):
        if path.exists():
            raise KeyFileError(f"{path} already exists; remove the old key pair first to make a new one")
    try:
        keys.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise KeyFileError(f"cannot create {keys} ({exc.strerror})") from None
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        # O_EXCL: a key written by a concurrent keygen is never overwritten either.
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{private} already exists; remove the old key pair first") from None
    except OSError as exc:
        raise KeyFileError(f"cannot create {private} ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(private, 0o600)  # whatever the umask did
        raw = _public_raw(key)
        tmp = public.with_name(public.name + ".tmp")
        tmp.write_text(f"# p2pimg publisher key {key_id(raw)}\n" + format_public_key(raw))
        os.replace(tmp, public)
    except OSError as exc:
        private.unlink(missing_ok=True)
        raise KeyFileError(f"cannot write the key pair in {keys} ({exc.strerror})") from None
    return public


def load_signer(home: Path) -> Signer | None:
    """The home's publisher key, or None when it has none."""
    path = private_key_path(home)
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_KEY_FILE + 1)
            mode = os.fstat(f.fileno()).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the publisher key ({exc.strerror})") from None
    if mode & 0o077:
        log.warning("%s is readable by other users (mode %o); it should be 0600", path, mode & 0o777)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an ed25519 key")
    return Signer.from_private_key(key)


@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    public_raw: bytes
    source: str  # the file it came from, for messages


class TrustStore:
    """The publisher keys whose tag records this node accepts."""

    def __init__(self, keys: Iterable[TrustedKey] = ()) -> None:
        self._keys: dict[str, TrustedKey] = {}
        for k in keys:
            self._keys.setdefault(k.key_id, k)

    @classmethod
    def load(cls, home: Path, extra_pub_files: Iterable[Path] = ()) -> TrustStore:
        """The home's own public key (if any), every `$home/trust/*.pub`, and `extra_pub_files`."""
        files: list[Path] = []
        own = public_key_path(home)
        if own.exists():
            files.append(own)
        trusted = trust_dir(home)
        if trusted.is_dir():
            files.extend(sorted(trusted.glob("*.pub")))
        files.extend(Path(p) for p in extra_pub_files)
        keys: list[TrustedKey] = []
        for path in files:
            raw = read_public_key(path)
            keys.append(TrustedKey(key_id(raw), raw, str(path)))
        if not own.exists() and (signer := load_signer(home)) is not None:
            keys.insert(0, TrustedKey(signer.key_id, signer.public_raw, str(private_key_path(home))))
        return cls(keys)

    @property
    def key_ids(self) -> list[str]:
        return list(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def check(self, record: TagRecord) -> str:
        """The id of the trusted key that signed `record`; TagSignatureError when none did."""
        ref = f"{record.name}:{record.tag} (seq {record.seq})"
        if record.key is None or record.sig is None:
            raise TagSignatureError(
                f"tag record of {ref} is unsigned, and this node accepts only "
                f"records signed by a trusted key ({', '.join(self._keys) or 'none'})"
            )
        trusted = self._keys.get(record.key)
        if trusted is None:
            raise TagSignatureError(
                f"tag record of {ref} is signed by key {record.key}, which is not trusted here"
            )
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(trusted.public_raw).verify(record.sig, record.signed_bytes())
        except InvalidSignature:
            raise TagSignatureError(
                f"tag record of {ref} has a bad signature for key {record.key} ({trusted.source}): "
                "it was altered or signed for something else"
            ) from None
        return trusted.key_id
