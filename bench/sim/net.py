"""The network of the simulation: flows sharing links, advanced in fixed time steps.

Every endpoint has an uplink (the origin: its egress; a node: its LAN upload) and every node a
downlink. A flow is one request's byte stream, from a sender's uplink to a receiver's downlink,
optionally capped per connection. Rates are an approximation of max-min fairness, recomputed
whenever the set of flows changed: start from each link's equal share (capacity ÷ its flows),
then `rounds` times let the flows held back elsewhere keep what they get and split the rest of
each link among the flows that link limits; finally scale any link still over capacity back
down, so no link ever carries more than it can. Between changes every flow moves at its rate;
the simulation advances all of them by `dt` at once (numpy), and the world is told exactly when,
within the step, each flow crossed a chunk boundary.

Flows live in slots of preallocated arrays (a free list reuses them); `gen` tells a stale event
from a slot's current flow.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


class Network:
    def __init__(self, up: list[float], down: list[float], *, rounds: int = 2) -> None:
        """`up[e]`: endpoint e's uplink (bytes/s); `down[e]`: its downlink (0 for a sender only)."""
        self.up = np.asarray(up, dtype=np.float64)
        self.down = np.asarray(down, dtype=np.float64)
        self.rounds = rounds
        size = 1024
        self.snd = np.zeros(size, dtype=np.int64)
        self.rcv = np.zeros(size, dtype=np.int64)
        self.cap = np.full(size, np.inf)
        self.rem = np.zeros(size)  # bytes left in the flow's current chunk
        self.live = np.zeros(size, dtype=bool)  # moving bytes (not waiting for a first byte, not stalled)
        self.gen = np.zeros(size, dtype=np.int64)
        self.sent = np.zeros(len(up))  # bytes each endpoint has sent
        self._free: list[int] = list(range(size - 1, -1, -1))
        self._dirty = True
        self._idx: I64 = np.zeros(0, dtype=np.int64)
        self._rate: F64 = np.zeros(0)

    def grow(self, endpoints: int) -> None:
        """Room for endpoints added later (nodes that join)."""
        extra = endpoints - len(self.up)
        if extra > 0:
            self.up = np.concatenate([self.up, np.zeros(extra)])
            self.down = np.concatenate([self.down, np.zeros(extra)])
            self.sent = np.concatenate([self.sent, np.zeros(extra)])

    def set_links(self, endpoint: int, up: float, down: float) -> None:
        self.up[endpoint], self.down[endpoint] = up, down
        self._dirty = True

    def open(self, sender: int, receiver: int, first: float, cap: float) -> int:
        """A new flow (not moving yet: see `start`); returns its slot."""
        if not self._free:
            old = len(self.snd)
            self.snd = np.concatenate([self.snd, np.zeros(old, dtype=np.int64)])
            self.rcv = np.concatenate([self.rcv, np.zeros(old, dtype=np.int64)])
            self.cap = np.concatenate([self.cap, np.full(old, np.inf)])
            self.rem = np.concatenate([self.rem, np.zeros(old)])
            self.live = np.concatenate([self.live, np.zeros(old, dtype=bool)])
            self.gen = np.concatenate([self.gen, np.zeros(old, dtype=np.int64)])
            self._free = list(range(2 * old - 1, old - 1, -1))
        slot = self._free.pop()
        self.snd[slot], self.rcv[slot], self.cap[slot], self.rem[slot] = sender, receiver, cap, first
        self.live[slot] = False
        self.gen[slot] += 1
        return slot

    def start(self, slot: int) -> None:
        self.live[slot] = True
        self._dirty = True

    def close(self, slot: int) -> None:
        if self.live[slot]:
            self._dirty = True
        self.live[slot] = False
        self.gen[slot] += 1
        self._free.append(slot)

    def rates(self) -> tuple[I64, F64]:
        """The live flows' slots and their rates (bytes/s)."""
        if self._dirty:
            self._idx = np.flatnonzero(self.live)
            self._rate = self._share(self.snd[self._idx], self.rcv[self._idx], self.cap[self._idx])
            self._dirty = False
        return self._idx, self._rate

    def _share(self, s: I64, r: I64, cap: F64) -> F64:
        n = len(self.up)
        if not len(s):
            return np.zeros(0)
        tiny = 1e-9
        up_share = self.up / np.maximum(np.bincount(s, minlength=n), 1)
        down_share = self.down / np.maximum(np.bincount(r, minlength=n), 1)
        rate: F64 = np.minimum(np.minimum(up_share[s], down_share[r]), cap)
        for _ in range(self.rounds):
            for share, ends, capacity in ((up_share, s, self.up), (down_share, r, self.down)):
                limited = rate >= share[ends] * (1 - tiny)
                others = np.bincount(ends, weights=np.where(limited, 0.0, rate), minlength=n)
                count = np.bincount(ends, weights=limited.astype(np.float64), minlength=n)
                spare = np.maximum(capacity - others, 0.0)
                share[:] = np.where(count > 0, spare / np.maximum(count, 1), capacity)
            rate = np.minimum(np.minimum(up_share[s], down_share[r]), cap)
        for ends, capacity in ((s, self.up), (r, self.down)):
            total = np.bincount(ends, weights=rate, minlength=n)
            scale = np.where(total > capacity, capacity / np.maximum(total, tiny), 1.0)
            rate = rate * scale[ends]
        return rate

    def advance(self, dt: float) -> list[tuple[float, int, float]]:
        """Move every live flow on by `dt`; returns (how far into the step, slot, rate) for each
        flow that finished its current chunk within it (the caller gives it the next chunk, whose
        bytes may end within the step too, or ends it)."""
        idx, rate = self.rates()
        if not len(idx):
            return []
        moved = rate * dt
        self.sent += np.bincount(self.snd[idx], weights=moved, minlength=len(self.sent))
        rem = self.rem[idx] - moved
        self.rem[idx] = rem
        hit = np.flatnonzero(rem <= 0)
        if not len(hit):
            return []
        # rem <= 0: the boundary was crossed -rem/rate before the end of the step.
        fast = np.maximum(rate[hit], 1e-9)
        at = dt + rem[hit] / fast
        return list(zip(at.tolist(), idx[hit].tolist(), fast.tolist(), strict=True))

    def unsend(self, slot: int) -> None:
        """A flow ends within a step: what it was moved past its end was never sent."""
        if self.rem[slot] < 0:
            self.sent[self.snd[slot]] += self.rem[slot]
            self.rem[slot] = 0.0
