"""The refusal log: one ``upload.refused`` line per request refused before anything of it
was stored (401, 403, 413, 415, 429 …), at a bounded rate.

An upload the intake stored and then refused has its ``upload`` event and its row; a
request refused earlier has neither, and without a line a site's admin cannot answer
"we sent it, where is it?". A flood of bad requests must not fill the disk, so lines pass
two token buckets: one per source (the site when it is known, else the client address,
an IPv6 client by its /64) and reason, and one for all. What they hold back is counted,
and written as one ``upload.refused.suppressed`` line at most every ``summary_seconds``.
In this process's memory, like the authentication throttle (app/access/throttle.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from app.access.tokens import ADMIN_TOKEN_PREFIX, TOKEN_PREFIX
from app.logs import escape_controls

log = logging.getLogger(__name__)

EVENT = "upload.refused"
SUMMARY_EVENT = "upload.refused.suppressed"
_MAX_TEXT = 256  # a path or detail is cut here: a 30 KB request target is one line, not 30 KB
_MAX_SOURCES = 1000  # sources counted one by one in a summary; the rest as "other"
_TOP_SOURCES = 5
_V4_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:a.b.c.d, an IPv4 client
_TOKEN_SHAPE = re.compile(
    "(?:" + re.escape(TOKEN_PREFIX) + "|" + re.escape(ADMIN_TOKEN_PREFIX) + ")[A-Za-z0-9]{8,}"
)


@dataclass(frozen=True)
class Refusal:
    """What the log says of one refused request: never a token nor a header's value."""

    status: int
    reason: str
    detail: str
    method: str
    path: str
    site: str | None
    remote_addr: str | None
    declared_bytes: int | None


@dataclass(frozen=True)
class Rates:
    """Lines a source (per reason) may write, and all sources together: ``burst`` at once,
    then ``per_second`` on average."""

    burst: float = 5.0
    per_second: float = 1 / 60
    total_burst: float = 50.0
    total_per_second: float = 0.5
    summary_seconds: float = 10.0
    max_sources: int = 4096  # buckets kept (least recently used dropped)


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp

    def take(self, now: float, burst: float, per_second: float) -> bool:
        self.tokens = min(burst, self.tokens + (now - self.stamp) * per_second)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


def _source(address: str | None) -> str:
    """An IPv4 address as it is (it was parsed when chosen: app/access/gate.py); IPv6 by its /64,
    as app/access/throttle.py counts it, but with inet_pton: ipaddress takes ~20 us an address."""
    if address is None or ":" not in address:
        return address or "?"
    try:
        packed = socket.inet_pton(socket.AF_INET6, address)
    except OSError:
        return address
    if packed.startswith(_V4_MAPPED):
        return socket.inet_ntoa(packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8)) + "/64"


def _text(value: str) -> str:
    """One line, cut, and with anything shaped like a token masked: a site that put its
    token in the URL (``/oit_…/instances``, a 404) must not find it in the log."""
    value = value if len(value) <= _MAX_TEXT else value[:_MAX_TEXT] + "…"
    return escape_controls(_TOKEN_SHAPE.sub(lambda m: m.group()[:4] + "…", value))


class RefusalLog:
    """Called on the event loop only (the public listener's error handlers and guards)."""

    def __init__(
        self, rates: Rates | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rates = rates or Rates()
        self._clock = clock
        self._sources: OrderedDict[tuple[str, str], _Bucket] = OrderedDict()
        self._total = _Bucket(self.rates.total_burst, clock())
        self._held_since: float | None = None
        self._held_reasons: Counter[str] = Counter()
        self._held_sources: Counter[str] = Counter()
        self._flush_timer: asyncio.TimerHandle | None = None

    def write(self, refusal: Refusal) -> bool:
        """Log ``refusal`` if the buckets let it through; else count it for the summary."""
        if not self.admits(refusal.site, refusal.remote_addr, refusal.reason):
            return False
        self.log(refusal)
        return True

    def admits(self, site: str | None, remote_addr: str | None, reason: str) -> bool:
        """Whether a refusal may have its line (then ``log`` it); if not, it is counted.
        Apart from ``log`` so that a refusal held back costs a few microseconds."""
        now = self._clock()
        if self._held_since is not None and now - self._held_since >= self.rates.summary_seconds:
            self.flush()
        source = site or _source(remote_addr)
        if self._take(now, source, reason):
            return True
        self._hold(now, source, reason)
        return False

    def _take(self, now: float, source: str, reason: str) -> bool:
        rates = self.rates
        key = (source, reason)
        bucket = self._sources.get(key)
        if bucket is None:
            bucket = self._sources[key] = _Bucket(rates.burst, now)
            while len(self._sources) > rates.max_sources:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(key)
        # The source's bucket first: a flood from one source spends none of the others'.
        return bucket.take(now, rates.burst, rates.per_second) and self._total.take(
            now, rates.total_burst, rates.total_per_second
        )

    def _hold(self, now: float, source: str, reason: str) -> None:
        if self._held_since is None:
            self._held_since = now
            self._arm_flush()
        self._held_reasons[reason] += 1
        if source in self._held_sources or len(self._held_sources) < _MAX_SOURCES:
            self._held_sources[source] += 1
        else:
            self._held_sources["other"] += 1

    def _arm_flush(self) -> None:
        """The summary is written when its period ends, even if no refusal follows."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a unit test): the next write or flush() writes it
            return
        self._flush_timer = loop.call_later(self.rates.summary_seconds, self.flush)

    def flush(self) -> None:
        """Write the summary of what was held back, if anything was."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._held_since is None:
            return
        held = sum(self._held_reasons.values())
        seconds = round(self._clock() - self._held_since, 1)
        reasons = dict(self._held_reasons.most_common())
        top = dict(self._held_sources.most_common(_TOP_SOURCES))
        log.warning(
            "upload refused: %d more refusal(s) not logged one by one in %.1fs "
            "(by reason: %s; most from: %s)",
            held,
            seconds,
            ", ".join(f"{r}={n}" for r, n in reasons.items()),
            ", ".join(f"{_text(s)}={n}" for s, n in top.items()),
            extra={
                "event": SUMMARY_EVENT,
                "suppressed": held,
                "seconds": seconds,
                "reasons": reasons,
                "sources": {_text(s): n for s, n in top.items()},
            },
        )
        self._held_since = None
        self._held_reasons.clear()
        self._held_sources.clear()

    def log(self, refusal: Refusal) -> None:
        """The line itself, whatever the buckets say (``admits`` asks them)."""
        path, detail = _text(refusal.path), _text(refusal.detail)
        site = _text(refusal.site) if refusal.site else None
        remote = _text(refusal.remote_addr) if refusal.remote_addr else None
        log.info(
            "upload refused before storage: status=%d reason=%s site=%s remote=%s %s %s "
            "declared_bytes=%s: %s",
            refusal.status,
            refusal.reason,
            site or "-",
            remote or "-",
            _text(refusal.method) or "-",
            path,
            "-" if refusal.declared_bytes is None else refusal.declared_bytes,
            detail,
            extra={  # the upload event's fields (app/intake/pipeline.py) that a refusal has
                "event": EVENT,
                "site": site,
                "remote_addr": remote,
                "method": _text(refusal.method) or None,
                "path": path,
                "declared_bytes": refusal.declared_bytes,
                "outcome": "refused",
                "reason": refusal.reason,
                "status": refusal.status,
                "detail": detail or None,
            },
        )
