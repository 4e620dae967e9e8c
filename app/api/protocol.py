"""The listeners' HTTP protocol: uvicorn's, plus what it lacks against hostile clients.

A deadline in every state of a connection (reading headers, idle between requests,
writing an answer the client does not read), header and trailer caps, connection caps
per client address and in all, and the TLS client certificate of the connection in each
request's ASGI ``state``. Written and tested against uvicorn 0.55 (pyproject.toml pins it):
it extends ``HttpToolsProtocol``'s documented callbacks and reads its ``cycle``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import socket
import struct
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.access.policy import IPNetwork, parse_address
from app.errors import HeadersTooLarge, IntakeError, UriTooLong

log = logging.getLogger(__name__)

CLIENT_CERT_STATE = "tls_client_cert_sha256"

# How a listener renders a refusal: (error, method, path) -> its JSON error body.
ErrorBody = Callable[[IntakeError, str, str], dict[str, object]]


@dataclass(frozen=True)
class HeaderLimits:
    """What one request's head may take before the app sees it."""

    timeout: float = 20.0  # seconds, from the connection's start and each request's first byte
    max_bytes: int = 64 * 1024  # request line and header lines together; trailers too
    max_count: int = 100  # header lines


@dataclass(frozen=True)
class ConnectionLimits:
    """What one listener's connections may hold, and for how long."""

    max_total: int = 1000  # open connections; past it, new ones are closed at once
    max_per_client: int = 32  # from one client address (``exempt`` ones: unlimited)
    exempt: tuple[IPNetwork, ...] = field(default_factory=tuple)  # reverse proxies
    # An answer the client does not read: the connection is dropped once its unsent
    # bytes have not moved for this long (the kernel's buffer is full behind them).
    send_timeout: float = 30.0


class IntakeProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol, plus what it lacks against hostile clients.

    - A header deadline: from the connection's start, and from each request's first
      byte, the headers must be complete within ``limits.timeout`` seconds, or the
      connection is closed (slowloris; uvicorn waits for ever).
    - Header caps: a request target past ``limits.max_bytes`` gets 414, a head past it
      or with more than ``limits.max_count`` lines gets 431, and the connection closes.
      httptools buffers a header line until it ends, so the size is counted from the
      bytes received while the head is incomplete: memory stays within the cap plus
      one read.
    - The TLS client certificate's fingerprint, in each request's ``state``.
    """

    limits = HeaderLimits()
    connection_limits = ConnectionLimits()
    error_body: ErrorBody
    _refused_at = 0.0  # per listener class: when a refused connection was last logged
    _refused_since = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._send_watch: asyncio.TimerHandle | None = None
        self._in_head = True
        self._head_began = False  # a request's first byte arrived in the current read
        self._head_bytes = 0
        self._head_lines = 0
        self._in_message = False  # between a request's first byte and its last
        self._body_in_read = False  # on_body ran during the current read
        self._trailer_bytes = 0  # bytes since the body's last data byte (chunk framing, trailers)
        self._idle_since = self.loop.time()  # the last answer's end: the keep-alive's start
        self._refusal: IntakeError | None = None
        if self._over_connection_caps():
            self._reset()
            return
        self._bound_kernel_sending(transport)
        self._arm_header_deadline()
        ssl_object: Any = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der:
            # app_state is copied into every request's scope["state"]: per connection here.
            self.app_state = {**self.app_state, CLIENT_CERT_STATE: hashlib.sha256(der).hexdigest()}

    # --- connection caps -----------------------------------------------------------------

    def _over_connection_caps(self) -> bool:
        """Whether this connection is one too many, in all or from its address (it is
        already counted in ``connections``); a refusal is logged at most every 10 s."""
        caps = self.connection_limits
        address = self.client[0] if self.client else None
        why = None
        if len(self.connections) > caps.max_total:
            why = f"{caps.max_total} connections open (INTAKE_MAX_CONNECTIONS)"
        elif address is not None and not self._exempt(address):
            mine = sum(_client_address(c) == address for c in self.connections)
            if mine > caps.max_per_client:
                why = (
                    f"{caps.max_per_client} connections open from {address} "
                    "(INTAKE_MAX_CONNECTIONS_PER_CLIENT)"
                )
        if why is None:
            return False
        cls = type(self)
        cls._refused_since += 1
        now = time.monotonic()
        if now - cls._refused_at >= 10.0:
            log.warning("refused %d connection(s): %s", cls._refused_since, why)
            cls._refused_at, cls._refused_since = now, 0
        return True

    def _exempt(self, address: str) -> bool:
        parsed = parse_address(address)
        return parsed is not None and any(parsed in n for n in self.connection_limits.exempt)

    # --- send deadline -------------------------------------------------------------------

    def _bound_kernel_sending(self, transport: asyncio.Transport) -> None:
        """The kernel gives up on bytes the client leaves unacknowledged (a zero window:
        it does not read) after ``send_timeout``, also once the socket is closed: a closed
        connection's answer can otherwise hold megabytes of kernel memory for minutes."""
        sock = transport.get_extra_info("socket")
        if sock is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
            with contextlib.suppress(OSError):
                milliseconds = int(self.connection_limits.send_timeout * 1000)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, milliseconds)

    def pause_writing(self) -> None:
        """The transport holds more than its high-water mark of unsent bytes: from now on
        they must keep moving (``_check_sending``)."""
        super().pause_writing()
        self._watch_sending(self.transport.get_write_buffer_size())

    def _watch_sending(self, unsent: int) -> None:
        if self._send_watch is None:
            self._send_watch = self.loop.call_later(
                self.connection_limits.send_timeout, self._check_sending, unsent
            )

    def _check_sending(self, unsent_before: int) -> None:
        self._send_watch = None
        unsent = self.transport.get_write_buffer_size()
        if unsent == 0:
            return
        if unsent >= unsent_before:  # nothing taken by the client for a whole period
            log.info(
                "dropped a connection from %s: %d answer bytes unread for %gs",
                self._peer(),
                unsent,
                self.connection_limits.send_timeout,
            )
            self._drop()  # close() would wait for the client to read them
            return
        self._watch_sending(unsent)

    def _close(self) -> None:
        """Close; if answer bytes are still unsent, drop them once they stop moving."""
        self.transport.close()
        unsent = self.transport.get_write_buffer_size()
        if unsent:
            self._watch_sending(unsent)

    def _drop(self) -> None:
        """A deadline passed: close, or reset the connection if the client left answer bytes
        unread in the kernel's buffer (a graceful close would keep them there for it)."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None and (self.transport.get_write_buffer_size() or _kernel_unsent(sock)):
            self._reset()
            return
        self._close()

    def _reset(self) -> None:
        """End the connection with a TCP reset: nothing of it is kept, by us or the kernel."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    # --- idle between requests -----------------------------------------------------------

    def _rearm_keep_alive(self) -> None:
        """uvicorn cancels its keep-alive timer on any byte and re-arms it only after an
        answer: bytes that start no request (blank lines between requests) would hold the
        connection for ever. Still idle after them, the timer runs again for what was left
        of it: such bytes never extend the deadline."""
        cycle = self.cycle
        idle = not self._in_message and (cycle is None or cycle.response_complete)
        if idle and self.timeout_keep_alive_task is None and not self.transport.is_closing():
            left = self.timeout_keep_alive - (self.loop.time() - self._idle_since)
            self.timeout_keep_alive_task = self.loop.call_later(
                max(0.0, left), self.timeout_keep_alive_handler
            )

    def timeout_keep_alive_handler(self) -> None:
        if not self.transport.is_closing():
            self._drop()

    def on_response_complete(self) -> None:
        cycle = self.cycle
        if cycle is not None and cycle.more_body and not self.transport.is_closing():
            # Answered before the body was read (a 401, a 413 on Content-Length): what is
            # left of the body would be taken for the next request. The answer carried
            # `Connection: close` (app/api/closing.py); the connection ends here.
            self.server_state.total_requests += 1
            self._close()
            return
        self._idle_since = self.loop.time()
        super().on_response_complete()

    # --- header deadline ---------------------------------------------------------------

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(
                self.limits.timeout, self._headers_too_slow
            )

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            log.info(
                "closed a connection from %s: no complete request headers within %gs",
                self._peer(),
                self.limits.timeout,
            )
            self._drop()

    # --- header and trailer caps ---------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            return  # answered and closing: the rest is not read
        self._head_began = False
        self._body_in_read = False
        super().data_received(data)
        if self._refusal is not None or self.transport.is_closing():
            return
        if not self._in_head:
            self._count_trailers(len(data))
            self._rearm_keep_alive()
            return
        if self._head_began:  # the head started inside this read: count what was parsed
            self._head_bytes = self._parsed_head_bytes()
        else:
            self._head_bytes += len(data)
        if self._head_bytes > self.limits.max_bytes:
            self._refuse(self._too_large(), parsing=False)

    def _count_trailers(self, read: int) -> None:
        """After the headers, count the bytes that carry no body data: chunk-size lines,
        chunk extensions and trailer lines, which httptools buffers (and grows by
        appending) like header lines. A run of them past ``max_bytes`` gets 431. A read
        with body data starts the count again, so only framing and trailers add up, and
        memory stays within the cap plus one read, as for the head."""
        if not self._in_message:
            return
        if self._body_in_read:
            self._trailer_bytes = 0
            return
        self._trailer_bytes += read
        if self._trailer_bytes > self.limits.max_bytes:
            self._refuse(
                HeadersTooLarge(
                    f"the chunked body's framing or trailers are over {self.limits.max_bytes} "
                    "bytes (INTAKE_MAX_HEADER_BYTES)"
                ),
                parsing=False,
            )

    def on_body(self, body: bytes) -> None:
        self._body_in_read = True
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        super().on_message_complete()

    def _parsed_head_bytes(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _too_large(self) -> IntakeError:
        return HeadersTooLarge(
            f"the request head is over {self.limits.max_bytes} bytes "
            f"(INTAKE_MAX_HEADER_BYTES), or {self.limits.max_count} header lines"
        )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_message = True
        self._in_head = True
        self._head_began = True
        self._head_bytes = 0
        self._head_lines = 0
        self._arm_header_deadline()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_bytes:
            self._refuse(
                UriTooLong(
                    f"the request target is over {self.limits.max_bytes} bytes "
                    "(INTAKE_MAX_HEADER_BYTES)"
                )
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_lines += 1
        if self._head_lines > self.limits.max_count:
            self._refuse(self._too_large())
        super().on_header(name, value)

    def _refuse(self, error: IntakeError, *, parsing: bool = True) -> None:
        """Answer ``error`` and close; inside a parser callback, also stop the parser
        (uvicorn then calls ``send_400_response``, which sends this answer instead)."""
        self._refusal = error
        if parsing:
            raise _Refused
        self._send_refusal()

    def send_400_response(self, msg: str) -> None:
        if self._refusal is None:
            super().send_400_response(msg)
        else:
            self._send_refusal()

    def _send_refusal(self) -> None:
        error = self._refusal
        assert error is not None
        self._disarm_header_deadline()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not self._in_head:
            # Refused mid-body (trailers): the app's request ends as a disconnect, and
            # nothing it may still send reaches the wire.
            cycle.disconnected = True
            cycle.message_event.set()
            if cycle.response_started:  # an answer is under way: it cannot be replaced
                self.transport.abort()
                return
        try:
            method = self.parser.get_method().decode("ascii", "replace")
        except Exception:  # the request line itself was not complete
            method = ""
        path = self.url.split(b"?", 1)[0][:256].decode("ascii", "replace")
        log.info(
            "refused a request from %s with %d: %s", self._peer(), error.status_code, error.detail
        )
        body = json.dumps(self.error_body(error, method, path)).encode()
        status = HTTPStatus(error.status_code)
        head = [f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode()]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head.append(
            b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % len(body)
        )
        self.transport.write(b"".join(head) + body)
        self._close()

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._parsed_head_bytes() > self.limits.max_bytes:
            self._refuse(self._too_large())
        self._disarm_header_deadline()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        if self._send_watch is not None:
            self._send_watch.cancel()
            self._send_watch = None
        super().connection_lost(exc)

    def _peer(self) -> str:
        return str(self.client[0]) if self.client else "?"


def _kernel_unsent(sock: Any) -> int:
    """Bytes the kernel has not yet sent on this socket (Linux's SIOCOUTQ)."""
    try:
        answer = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return int(struct.unpack("i", answer)[0])


def _client_address(connection: object) -> str | None:
    client = getattr(connection, "client", None)
    return str(client[0]) if client else None


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing a refused request."""


def protocol(
    limits: HeaderLimits, connection_limits: ConnectionLimits, error_body: ErrorBody
) -> type[IntakeProtocol]:
    """The protocol class for a listener: its limits and error shape."""
    return type(
        "IntakeProtocol",
        (IntakeProtocol,),
        {
            "limits": limits,
            "connection_limits": connection_limits,
            "error_body": staticmethod(error_body),
        },
    )
