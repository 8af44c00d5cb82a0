"""The trust policy for tag records, as the resolver applies it: which records it accepts from
its origin, its own cache and LAN peers, and the one warning that unsigned ones are accepted."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from p2pimg.content.model import TagRecord
from p2pimg.content.signing import TagSignatureError, TrustStore

log = logging.getLogger("p2pimg.fetch.resolver")
# In a home: the warning that unsigned tag records are accepted was given there (it is given once).
UNSIGNED_NOTICE = "unsigned-tags-accepted"


class RecordChecks:
    """Mixed into `Resolver`, which sets these."""

    trust: TrustStore
    home: Path | None
    _warned_unverified: set[tuple[str, str]]
    _warned_home: bool

    def check_peer_record(self, record: TagRecord) -> None:
        """A tag record learned from a LAN peer: accepted only when signed by a trusted key. A node
        that trusts no key takes unsigned records from its own origin, never from peers."""
        if not len(self.trust):
            raise TagSignatureError(
                f"tag record of {record.name}:{record.tag} (seq {record.seq}) from a LAN peer refused: "
                "records learned from peers must be signed by a trusted publisher key, and this node "
                "trusts none (--trust PUBFILE or $P2PIMG_HOME/trust/*.pub)"
            )
        self.trust.check(record)

    def check_record(self, record: TagRecord) -> None:
        """Apply the trust policy to a tag record from the origin or this node's own cache;
        TagSignatureError when it is refused. Records from LAN peers go through
        `check_peer_record` instead (the unsigned exception below is for our own origin only).
        """
        if len(self.trust):
            kid = self.trust.check(record)
            log.debug(
                "tag record of %s:%s (seq %d) signed by trusted key %s",
                record.name,
                record.tag,
                record.seq,
                kid,
            )
            return
        if self._first_unsigned_notice(record):
            how = "unsigned" if record.key is None else f"signed by key {record.key}, not checked"
            home = str(self.home) if self.home is not None else "$P2PIMG_HOME"
            log.warning(
                "no publisher key is trusted: accepting tag records from the origin unchecked "
                "(%s:%s is %s)%s. To accept only signed records, trust the publisher's key (copy "
                "its .pub file into %s/trust/), or, for images you publish: `p2pimg keygen "
                "--home %s`, then publish them again",
                record.name,
                record.tag,
                how,
                "; said once for this home" if self.home is not None else "",
                home,
                home,
            )

    def _first_unsigned_notice(self, record: TagRecord) -> bool:
        """Whether to warn that `record` is taken unchecked: the first time in this home (or, with
        no home, for this tag in this process); a home that cannot be written to hears it again."""
        if (record.name, record.tag) in self._warned_unverified or self._warned_home:
            return False
        self._warned_unverified.add((record.name, record.tag))
        if self.home is None:
            return True
        self._warned_home = True
        # A few bytes, once per process: not worth a thread.
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.home / UNSIGNED_NOTICE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError:
            return True
        with contextlib.suppress(OSError), os.fdopen(fd, "w") as f:
            f.write(
                "p2pimg warned once that this home trusts no publisher key and takes unsigned tag "
                "records; remove this file to be warned again.\n"
            )
        return True
