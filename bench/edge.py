"""The public door under attack: how long held connections live, and what a trailer bomb costs.

Run ``python -m bench.edge [--connections 100] [--keep-alive 2] [--send-timeout 2]``. One
intake (SQLite, no Orthanc behind it: nothing here reaches the archive) on loopback with
the deadlines given; for each state, ``--connections`` raw sockets, each from a loopback
address of its own:

- **answered before the body**: ``POST /instances`` with ``Content-Length: 1000000000``
  and no token, one more byte after the 401;
- **idle, fed blank lines**: a complete request, then ``CRLF`` every 0.2 s;
- **answers never read**: 150 pipelined requests whose 404s echo a 30 KB path, a 4 KiB
  receive buffer, nothing read;

and the time until the server holds none of them (read from ``/proc/net/tcp``), against
the deadline. Then a chunked upload whose trailer grows without end: the bytes sent
before the 431, the intake's RSS growth, and the worst ``/healthz`` latency on the admin
listener during the attack against its median before it (the baseline, same run).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.support.intake import IntakeProcess, current_rss

MIB = 1024 * 1024


def _held(port: int, client_ports: set[int]) -> int:
    held = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) != port or fields[3] in ("0A", "05", "06", "07"):
                continue
            held += int(fields[2].split(":")[1], 16) in client_ports
    return held


def _sockets(port: int, count: int, subnet: int) -> list[socket.socket]:
    return [
        socket.create_connection(
            ("127.0.0.1", port), timeout=10, source_address=(f"127.1.{subnet}.{i + 1}", 0)
        )
        for i in range(count)
    ]


def _until_gone(
    port: int, socks: list[socket.socket], poke: Callable[[], None], limit: float
) -> float:
    ports = {s.getsockname()[1] for s in socks}
    started = time.monotonic()
    while _held(port, ports) and time.monotonic() - started < limit:
        poke()
        time.sleep(0.2)
    return time.monotonic() - started if not _held(port, ports) else float("inf")


def _state_before_body(port: int, count: int) -> float:
    socks = _sockets(port, count, 1)
    for sock in socks:
        sock.sendall(b"POST /instances HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\nab")
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.recv(65536)
            sock.sendall(b"x")
    try:
        return _until_gone(port, socks, lambda: None, 60)
    finally:
        for sock in socks:
            sock.close()


def _state_blank_lines(port: int, count: int) -> float:
    socks = _sockets(port, count, 2)
    for sock in socks:
        sock.sendall(b"GET /system HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.recv(65536)

    def poke() -> None:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.sendall(b"\r\n")

    try:
        return _until_gone(port, socks, poke, 60)
    finally:
        for sock in socks:
            sock.close()


def _state_unread(port: int, count: int) -> float:
    request = f"GET /{'a' * 30_000} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    socks = []
    for i in range(count):
        sock = socket.create_connection(
            ("127.0.0.1", port), timeout=10, source_address=(f"127.1.3.{i + 1}", 0)
        )
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        for _ in range(150):
            try:
                sock.send(request)
            except OSError:
                break
        socks.append(sock)
    try:
        return _until_gone(port, socks, lambda: None, 60)
    finally:
        for sock in socks:
            sock.close()


def _trailer_bomb(intake: IntakeProcess, site_name: str, token: str) -> dict[str, float]:
    credentials = base64.b64encode(f"{site_name}:{token}".encode()).decode()
    latencies: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        with httpx.Client(base_url=intake.admin_url, timeout=10) as client:
            while not stop.is_set():
                started = time.perf_counter()
                client.get("/healthz")
                latencies.append(time.perf_counter() - started)
                time.sleep(0.005)

    baseline_watch = threading.Thread(target=watch)
    baseline_watch.start()
    time.sleep(2)
    stop.set()
    baseline_watch.join()
    baseline = statistics.median(latencies)
    latencies.clear()
    stop.clear()
    assert intake.pid is not None
    rss_before = current_rss(intake.pid)
    watcher = threading.Thread(target=watch)
    watcher.start()
    while not latencies:  # the watch runs before the attack starts
        time.sleep(0.01)
    sent = 0
    with socket.create_connection(("127.0.0.1", intake.public_port), timeout=30) as sock:
        sock.sendall(
            "POST /instances HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            f"Authorization: Basic {credentials}\r\n\r\n4\r\nDICM\r\n0\r\nX-Trailer: ".encode()
        )
        with contextlib.suppress(OSError):
            while sent < 128 * MIB:
                sock.sendall(b"a" * 65536)
                sent += 65536
        with contextlib.suppress(OSError):
            answer = sock.recv(65536)
    time.sleep(0.5)  # and a little after it
    stop.set()
    watcher.join()
    return {
        "sent_mib": sent / MIB,
        "answered_431": float(answer.startswith(b"HTTP/1.1 431")),
        "rss_growth_mib": (current_rss(intake.pid) - rss_before) / MIB,
        "worst_healthz_ms": max(latencies) * 1000,
        "baseline_healthz_ms": baseline * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--keep-alive", type=float, default=2.0)
    parser.add_argument("--send-timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as folder:
        work = Path(folder)
        intake = IntakeProcess(
            work / "intake",
            f"sqlite:///{work / 'intake.db'}",
            env_extra={
                "INTAKE_KEEP_ALIVE_TIMEOUT_SECONDS": str(args.keep_alive),
                "INTAKE_SEND_TIMEOUT_SECONDS": str(args.send_timeout),
                "INTAKE_LOG_LEVEL": "INFO",
            },
        )
        intake.start()
        try:
            site = intake.add_site("bench-edge")
            port = intake.public_port
            print(f"{args.connections} connections per state, loopback, {sys.platform}")
            for name, run, deadline in (
                ("answered before the body", _state_before_body, 0.0),
                ("idle, fed blank lines", _state_blank_lines, args.keep_alive),
                ("answers never read", _state_unread, args.send_timeout),
            ):
                seconds = run(port, args.connections)
                print(f"  {name:28} all closed after {seconds:6.2f} s (deadline {deadline:g} s)")
            bomb = _trailer_bomb(intake, site.name, site.token)
            answered = "431" if bomb["answered_431"] else "close"
            ratio = bomb["worst_healthz_ms"] / bomb["baseline_healthz_ms"]
            print(
                f"  trailer bomb: {bomb['sent_mib']:.2f} MiB sent before the {answered}; "
                f"RSS +{bomb['rss_growth_mib']:.1f} MiB; worst /healthz "
                f"{bomb['worst_healthz_ms']:.1f} ms vs median {bomb['baseline_healthz_ms']:.1f} "
                f"ms before ({ratio:.1f}x)"
            )
        finally:
            intake.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
