"""A loopback HTTP/1.1 proxy that closes idle kept-alive connections, as Orthanc does.

Orthanc closes a kept-alive connection left idle for 1 s: ``KeepAliveTimeout`` from
1.11.3, and Debian's 1.10.1 the same with no setting (measured: the end of the stream
comes 1.001 s after an answer). A client whose next request leaves at that moment
meets the close: it saw a healthy idle connection, sent its request, and the connection
ends without an answer. On loopback the two cross within microseconds, too seldom for a
test; ``IdleClosingProxy`` makes the crossing certain. A connection idle for
``idle_seconds`` is closed, and counted closed, then; but the close reaches the client
only with its next request, so the client's pool cannot see it coming (httpcore drops
an idle connection whose end of stream has arrived) and every reuse meets it:

- ``close="fin"``: the request is read to its end, then the connection ends without an
  answer (the client: "Server disconnected without sending a response").
- ``close="reset"``: reset at the request's first bytes, as a request landing on a
  socket already closed is (the client: ECONNRESET).

Requests on a live connection go to the upstream (a real Orthanc) on a connection of
their own, so Orthanc's own idle close never reaches the client. With ``drop`` set,
every request on a live connection also ends without an answer (a new connection that
fails). ``counts()`` says what happened, for the tests to assert and to poll on.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, replace
from typing import Literal

from tests.support.loop_thread import LoopThread

Close = Literal["fin", "reset"]

_HEAD_END = b"\r\n\r\n"
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}
_UPSTREAM_TIMEOUT = 60.0
_NO_BODY = {204, 304}


@dataclass(frozen=True)
class Counts:
    connections: int = 0  # client connections accepted
    relayed: int = 0  # requests answered by the upstream
    closed_idle: int = 0  # connections closed after idle_seconds without a request
    reused_after_close: int = 0  # requests that met such a close: ended, no answer
    dropped: int = 0  # requests on live connections ended without an answer (drop)
    live: int = 0  # open connections not closed idle: a request on one is answered


def _headers(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    first, *lines = head.decode("latin-1").split("\r\n")
    fields = []
    for line in lines:
        name, _, value = line.partition(":")
        fields.append((name.strip(), value.strip()))
    return first, fields


def _field(fields: list[tuple[str, str]], name: str) -> str:
    return next((v for k, v in fields if k.lower() == name), "")


async def _body(reader: asyncio.StreamReader, fields: list[tuple[str, str]]) -> bytes | None:
    """A message's body, de-chunked; None when only the end of the stream frames it."""
    if "chunked" in _field(fields, "transfer-encoding").lower():
        chunks = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16):
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)  # the CRLF after a chunk
        while await reader.readuntil(b"\r\n") != b"\r\n":
            pass  # trailer fields, up to the empty line
        return b"".join(chunks)
    length = _field(fields, "content-length")
    if length:
        return await reader.readexactly(int(length))
    return None


def _message(first: str, fields: list[tuple[str, str]], body: bytes, extra: str = "") -> bytes:
    kept = [f"{k}: {v}" for k, v in fields if k.lower() not in _HOP_BY_HOP]
    kept.append(f"content-length: {len(body)}")
    if extra:
        kept.append(extra)
    return ("\r\n".join([first, *kept]) + _HEAD_END.decode()).encode("latin-1") + body


class IdleClosingProxy(LoopThread):
    """In front of ``upstream_port`` on 127.0.0.1, in a background thread of its own."""

    thread_name = "idle-closing-proxy"

    def __init__(
        self, upstream_port: int, *, close: Close = "fin", idle_seconds: float = 1.0
    ) -> None:
        super().__init__()
        self.upstream_port = upstream_port
        self.close = close
        self.idle_seconds = idle_seconds
        self.drop = False
        self._counts = Counts()
        self._lock = threading.Lock()

    def counts(self) -> Counts:
        with self._lock:
            return self._counts

    def _count(self, **changes: int) -> None:
        with self._lock:
            now = self._counts
            self._counts = replace(
                now, **{name: getattr(now, name) + step for name, step in changes.items()}
            )

    async def _serve(self, ready: threading.Event) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        async with server:
            await self._stopping.wait()
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._count(connections=1, live=1)
        live = True
        try:
            while True:
                try:
                    first = await asyncio.wait_for(reader.read(1), self.idle_seconds)
                except TimeoutError:
                    live = False
                    self._count(closed_idle=1, live=-1)
                    await self._meet_close(reader, writer)
                    return
                if not first:
                    return  # the client let the connection go
                head = first + await reader.readuntil(_HEAD_END)
                request, fields = _headers(head[: -len(_HEAD_END)])
                body = await _body(reader, fields) or b""
                if self.drop:
                    self._count(dropped=1)
                    return
                answer = await self._relay(request, fields, body)
                if answer is None:
                    return  # the upstream failed: the client sees the connection end
                writer.write(answer)
                await writer.drain()
                self._count(relayed=1)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # the client went away or spoke nonsense
        except asyncio.CancelledError:
            # The proxy stops while the client still keeps the connection: end quietly
            # (asyncio's stream server logs a connection task that ends cancelled).
            pass
        finally:
            if live:
                self._count(live=-1)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _meet_close(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Closed idle: end the connection as the next request arrives, without an answer."""
        first = await reader.read(1)
        if not first:
            return  # the client let it go first (its own keep-alive expiry)
        self._count(reused_after_close=1)
        if self.close == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        head = first + await reader.readuntil(_HEAD_END)
        await _body(reader, _headers(head[: -len(_HEAD_END)])[1])

    async def _relay(
        self, request: str, fields: list[tuple[str, str]], body: bytes
    ) -> bytes | None:
        """The upstream's answer to one request, framed for a kept-alive client."""
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            return None
        try:
            writer.write(_message(request, fields, body, "connection: close"))
            await writer.drain()
            async with asyncio.timeout(_UPSTREAM_TIMEOUT):
                while True:
                    head = await reader.readuntil(_HEAD_END)
                    status_line, answer = _headers(head[: -len(_HEAD_END)])
                    status = int(status_line.split(" ")[1])
                    if status >= 200:
                        break  # (an interim 1xx answer is skipped)
                if status in _NO_BODY:
                    payload = b""
                else:
                    framed = await _body(reader, answer)
                    payload = await reader.read() if framed is None else framed
            return _message(status_line, answer, payload)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
            return None
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
