"""Throttling of failed authentication, per client address, in this process's memory.

After ``max_failures`` failures within ``window_seconds`` an address is blocked for
``block_seconds``: its requests get 429 before any token is looked at. A token that
authenticated from that address before the block keeps working, so a site behind
the same NAT as a noisy client is not locked out: the guesser never holds such a
token. IPv6 clients are counted per /64, since one host usually owns a whole /64.

Why memory and not the database: tokens carry 256 random bits, so throttling is
not what stops guessing; it keeps logs and the database quiet under a flood. With N
intake processes an address gets N times the allowance, which changes nothing
about guessing and keeps failed requests from costing database writes.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from app.access.policy import parse_address

_MAX_TRACKED = 100_000  # addresses remembered at most (least recently seen dropped)
_MAX_KNOWN_GOOD = 32  # token digests remembered per address


@dataclass
class _Entry:
    failures: deque[float] = field(default_factory=deque)
    blocked_until: float = 0.0
    known_good: OrderedDict[str, None] = field(default_factory=OrderedDict)


def client_key(address: str | None) -> str:
    parsed = parse_address(address or "")
    if parsed is None:
        return address or "?"
    if isinstance(parsed, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed)


class AuthThrottle:
    def __init__(
        self,
        max_failures: int = 10,
        window_seconds: float = 60.0,
        block_seconds: float = 300.0,
    ) -> None:
        self.max_failures = max_failures
        self.window_seconds = window_seconds
        self.block_seconds = block_seconds
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def _entry(self, key: str) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
            while len(self._entries) > _MAX_TRACKED:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        return entry

    def blocked_for(self, address: str | None, token_digest: str | None) -> float:
        """Seconds this request must wait (0 when it may proceed to authentication)."""
        entry = self._entries.get(client_key(address))
        if entry is None:
            return 0.0
        left = entry.blocked_until - time.monotonic()
        if left <= 0:
            return 0.0
        if token_digest is not None and token_digest in entry.known_good:
            return 0.0
        return left

    def failed(self, address: str | None) -> None:
        now = time.monotonic()
        entry = self._entry(client_key(address))
        entry.failures.append(now)
        while entry.failures and entry.failures[0] < now - self.window_seconds:
            entry.failures.popleft()
        if len(entry.failures) >= self.max_failures:
            entry.blocked_until = now + self.block_seconds
            entry.failures.clear()

    def succeeded(self, address: str | None, token_digest: str) -> None:
        entry = self._entry(client_key(address))
        entry.known_good[token_digest] = None
        entry.known_good.move_to_end(token_digest)
        while len(entry.known_good) > _MAX_KNOWN_GOOD:
            entry.known_good.popitem(last=False)
