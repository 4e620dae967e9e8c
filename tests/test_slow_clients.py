"""Slow clients are cut off by the app itself: headers by a deadline, bodies by a rate."""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Callable

import pytest

from tests.support.intake import IntakeProcess, Site
from tests.support.orthanc import OrthancProcess

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
def slow_guarded(
    make_intake: Callable[..., IntakeProcess], private_orthanc: OrthancProcess
) -> IntakeProcess:
    return make_intake(
        private_orthanc,
        header_timeout_seconds="2",
        body_idle_timeout_seconds="1",
        body_min_rate_bytes_per_second="500",
    )


def _closed_after(sock: socket.socket, trickle: bytes = b"", every: float = 0.5) -> float:
    """Seconds until the server closes the connection (trickling bytes meanwhile)."""
    started = time.monotonic()
    sock.settimeout(every)
    for _ in range(int(20 / every)):  # bounded: 20 s at the most
        if trickle:
            try:
                sock.sendall(trickle)
            except OSError:
                return time.monotonic() - started
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - started
    raise AssertionError("the connection stayed open for 20 s")


def test_a_silent_connection_is_closed_after_the_header_deadline(
    slow_guarded: IntakeProcess,
) -> None:
    with socket.create_connection(("127.0.0.1", slow_guarded.public_port), timeout=5) as sock:
        assert 1.5 < _closed_after(sock) < 6


def test_headers_trickled_byte_by_byte_are_cut_off(slow_guarded: IntakeProcess) -> None:
    with socket.create_connection(("127.0.0.1", slow_guarded.public_port), timeout=5) as sock:
        sock.sendall(b"POST /instances HTTP/1.1\r\nHost: intake\r\n")
        assert 1.5 < _closed_after(sock, trickle=b"X", every=0.3) < 6


def test_the_deadline_applies_to_each_request_on_a_kept_alive_connection(
    slow_guarded: IntakeProcess,
) -> None:
    with socket.create_connection(("127.0.0.1", slow_guarded.public_port), timeout=5) as sock:
        sock.sendall(b"GET /system HTTP/1.1\r\nHost: intake\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 401")
        sock.sendall(b"GET /system HTTP/1.1\r\nHost: in")  # ...and nothing more
        assert 1.5 < _closed_after(sock) < 6


def test_a_body_trickled_under_the_minimum_rate_gets_408(
    slow_guarded: IntakeProcess,
) -> None:
    site: Site = slow_guarded.add_site("trickler")
    token = base64.b64encode(f"{site.name}:{site.token}".encode()).decode()
    with socket.create_connection(("127.0.0.1", slow_guarded.public_port), timeout=5) as sock:
        sock.sendall(
            (
                "POST /instances HTTP/1.1\r\nHost: intake\r\n"
                f"Authorization: Basic {token}\r\nContent-Length: 100000\r\n\r\n"
            ).encode()
        )
        sock.settimeout(0.3)
        answer = b""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not answer.rstrip().endswith(b"}"):
            if b"\r\n\r\n" not in answer:
                sock.sendall(b"x" * 50)  # ~170 bytes/s, each gap well inside the idle timeout
            try:
                answer += sock.recv(65536)
            except TimeoutError:
                continue
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"under the minimum of 500 bytes/s" in answer
