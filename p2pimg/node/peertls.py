"""Optional mutual TLS between peers.

A swarm that wants encryption and strong peer identity gives every node a certificate signed by
the swarm's own CA: peers then talk HTTPS, and each side refuses a counterpart whose certificate
that CA did not sign. Membership is the certificate: host names are not checked, since LAN
addresses come and go (mDNS, DHCP) while a node's certificate stays. It combines with the swarm
key (both must pass) and changes nothing else: every byte is still checked against its CID.

Files: `--peer-tls-cert`, `--peer-tls-key` and `--peer-tls-ca` (all three), or, when none is
given, `$P2PIMG_HOME/tls/peer.crt`, `peer.key` and `ca.crt` when all three exist.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from p2pimg.errors import InvalidInput

_HOME_FILES = ("peer.crt", "peer.key", "ca.crt")


@dataclass(frozen=True)
class PeerTls:
    cert: Path
    key: Path
    ca: Path

    def _load(self, context: ssl.SSLContext) -> ssl.SSLContext:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise InvalidInput(
                f"cannot use the peer certificate {self.cert} with key {self.key}: {exc}"
            ) from None
        try:
            context.load_verify_locations(cafile=self.ca)
        except (OSError, ssl.SSLError) as exc:
            raise InvalidInput(f"cannot use the swarm CA certificate {self.ca}: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def server_context(self) -> ssl.SSLContext:
        """For the peer listener: a client without a certificate from the swarm CA is refused."""
        return self._load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))

    def client_context(self) -> ssl.SSLContext:
        """For requests to peers: present our certificate, accept only the swarm CA's."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False  # identity is the CA's signature, not a LAN address
        return self._load(context)


def load_peer_tls(
    home: Path, cert: str | None = None, key: str | None = None, ca: str | None = None
) -> PeerTls | None:
    """The node's peer TLS files, checked now (a bad file is a clear error at start), or None."""
    given = [cert, key, ca]
    if any(given):
        if not all(given):
            raise InvalidInput("peer TLS needs all of --peer-tls-cert, --peer-tls-key and --peer-tls-ca")
        tls = PeerTls(Path(cert or ""), Path(key or ""), Path(ca or ""))
    else:
        paths = [home / "tls" / name for name in _HOME_FILES]
        present = [p.exists() for p in paths]
        if not any(present):
            return None
        if not all(present):
            missing = ", ".join(str(p) for p, ok in zip(paths, present, strict=True) if not ok)
            raise InvalidInput(f"peer TLS is half set up in {home / 'tls'}: missing {missing}")
        tls = PeerTls(*paths)
    tls.server_context()  # loads and checks every file
    return tls
