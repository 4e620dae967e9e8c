"""Failed-authentication throttling per client address (app/access/throttle.py), no I/O."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from app.access import throttle
from app.access.throttle import AuthThrottle, client_key

GOOD = "a" * 64  # a token digest that authenticated from the address
OTHER = "b" * 64


class Clock:
    """A hand-driven ``time.monotonic`` for app.access.throttle."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    # Only app.access.throttle sees the fake clock; the real time module is left alone.
    monkeypatch.setattr(throttle, "time", SimpleNamespace(monotonic=clock))
    return clock


def _fail(limiter: AuthThrottle, address: str, times: int) -> None:
    for _ in range(times):
        limiter.failed(address)


def test_blocks_after_max_failures_not_before(clock: Clock) -> None:
    """The max_failures-th failure in the window blocks; one fewer does not."""
    limiter = AuthThrottle(max_failures=3, window_seconds=10, block_seconds=30)
    _fail(limiter, "192.0.2.1", 2)
    assert limiter.blocked_for("192.0.2.1", None) == 0
    limiter.failed("192.0.2.1")
    assert limiter.blocked_for("192.0.2.1", None) == pytest.approx(30)


def test_failures_older_than_the_window_do_not_count(clock: Clock) -> None:
    limiter = AuthThrottle(max_failures=3, window_seconds=10, block_seconds=30)
    _fail(limiter, "192.0.2.1", 2)
    clock.now += 10.5
    limiter.failed("192.0.2.1")
    assert limiter.blocked_for("192.0.2.1", None) == 0


def test_failures_spread_inside_the_window_count(clock: Clock) -> None:
    limiter = AuthThrottle(max_failures=3, window_seconds=10, block_seconds=30)
    for _ in range(3):
        limiter.failed("192.0.2.1")
        clock.now += 4.9
    assert limiter.blocked_for("192.0.2.1", None) > 0


def test_the_block_ends_after_block_seconds(clock: Clock) -> None:
    limiter = AuthThrottle(max_failures=2, window_seconds=10, block_seconds=30)
    _fail(limiter, "192.0.2.1", 2)
    clock.now += 29
    assert limiter.blocked_for("192.0.2.1", None) == pytest.approx(1)
    clock.now += 1
    assert limiter.blocked_for("192.0.2.1", None) == 0


def test_a_known_good_token_passes_while_blocked_an_unknown_one_does_not(clock: Clock) -> None:
    """A site behind the same NAT as a guesser keeps working; the guesser does not."""
    limiter = AuthThrottle(max_failures=2, window_seconds=10, block_seconds=30)
    limiter.succeeded("192.0.2.1", GOOD)
    _fail(limiter, "192.0.2.1", 2)
    assert limiter.blocked_for("192.0.2.1", GOOD) == 0
    assert limiter.blocked_for("192.0.2.1", OTHER) > 0
    assert limiter.blocked_for("192.0.2.1", None) > 0


def test_a_token_known_good_elsewhere_does_not_pass(clock: Clock) -> None:
    limiter = AuthThrottle(max_failures=2, window_seconds=10, block_seconds=30)
    limiter.succeeded("198.51.100.7", GOOD)
    _fail(limiter, "192.0.2.1", 2)
    assert limiter.blocked_for("192.0.2.1", GOOD) > 0


def test_other_addresses_are_unaffected(clock: Clock) -> None:
    limiter = AuthThrottle(max_failures=2, window_seconds=10, block_seconds=30)
    _fail(limiter, "192.0.2.1", 2)
    assert limiter.blocked_for("192.0.2.2", None) == 0
    limiter.failed("192.0.2.2")
    assert limiter.blocked_for("192.0.2.2", None) == 0


def test_ipv6_addresses_in_one_64_share_a_counter(clock: Clock) -> None:
    limiter = AuthThrottle(max_failures=2, window_seconds=10, block_seconds=30)
    limiter.failed("2001:db8:1:2::1")
    limiter.failed("2001:db8:1:2:ffff:ffff:ffff:ffff")
    assert limiter.blocked_for("2001:db8:1:2::abcd", None) > 0


def test_ipv6_addresses_in_different_64s_do_not(clock: Clock) -> None:
    limiter = AuthThrottle(max_failures=2, window_seconds=10, block_seconds=30)
    limiter.failed("2001:db8:1:2::1")
    limiter.failed("2001:db8:1:3::1")
    assert limiter.blocked_for("2001:db8:1:2::1", None) == 0
    assert limiter.blocked_for("2001:db8:1:3::1", None) == 0


def test_ipv4_mapped_ipv6_counts_as_the_ipv4_address(clock: Clock) -> None:
    limiter = AuthThrottle(max_failures=2, window_seconds=10, block_seconds=30)
    limiter.failed("::ffff:192.0.2.1")
    limiter.failed("192.0.2.1")
    assert limiter.blocked_for("192.0.2.1", None) > 0
    assert limiter.blocked_for("::ffff:192.0.2.1", None) > 0


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("[2001:db8::1]", "2001:db8::/64"),
        ("2001:db8:0:0:aaaa::1", "2001:db8::/64"),
        ("not-an-address", "not-an-address"),
        (None, "?"),
    ],
)
def test_client_key(address: str | None, key: str) -> None:
    assert client_key(address) == key


def test_the_tracked_addresses_stay_bounded(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond _MAX_TRACKED the least recently seen address is forgotten."""
    monkeypatch.setattr(throttle, "_MAX_TRACKED", 3)
    limiter = AuthThrottle(max_failures=1, window_seconds=10, block_seconds=30)
    for i in range(1, 6):
        limiter.failed(f"192.0.2.{i}")
    assert len(limiter._entries) == 3
    assert limiter.blocked_for("192.0.2.1", None) == 0  # forgotten, so no longer blocked
    assert limiter.blocked_for("192.0.2.5", None) > 0


def test_known_good_digests_per_address_stay_bounded(clock: Clock) -> None:
    limiter = AuthThrottle(max_failures=1, window_seconds=10, block_seconds=30)
    for i in range(throttle._MAX_KNOWN_GOOD + 1):
        limiter.succeeded("192.0.2.1", f"{i:064x}")
    limiter.failed("192.0.2.1")
    assert limiter.blocked_for("192.0.2.1", f"{0:064x}") > 0  # the oldest was dropped
    assert limiter.blocked_for("192.0.2.1", f"{throttle._MAX_KNOWN_GOOD:064x}") == 0
