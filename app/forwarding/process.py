"""The forwarder in a child process of its own, so receiving and forwarding use two cores.

Receiving and forwarding both spend most of their CPU in Python; in one process they
take turns on one interpreter lock, and forwarding was the limit under load
(docs/PERFORMANCE.md). With ``INTAKE_FORWARDER_PROCESS`` (the default) the service
runs ``python -m app.forwarding.process`` beside its listeners:

- **stdin** (service → child): the pickled ``Settings``, length first, then one byte per
  "a row was queued" wake-up. End of file, when the service stops or dies, ends the child:
  a forwarder never outlives its service. The child ignores SIGINT and SIGTERM (a Ctrl-C
  or a unit stop reaches the whole group); its service decides when it stops.
- **stdout** (child → service): ``ready`` once it runs (``/readyz`` waits for it),
  then one JSON line per forward result, ``[site, result, reason, latency]``, counted
  in the service's metrics, which ``/metrics`` serves.
  The child's own stdout is pointed at stderr, so a stray print cannot garble them.
- **stderr**: the service's, so the forwarder's log lines go where the service's go.

If the child dies, the service frees the leases it held (``Forwarder.release_dead_leases``:
the rows are delivered at once, not when the leases run out) and starts another, after a
pause that doubles while children keep dying young.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pickle
import signal
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy.orm import Session, sessionmaker

from app import logs, loops
from app.db.sessions import make_engine, make_read_sessionmaker, make_sessionmaker
from app.forwarding.forwarder import Forwarder
from app.forwarding.orthanc import OrthancClient
from app.intake.spool import Spool
from app.metrics import Metrics
from app.settings import Settings

log = logging.getLogger(__name__)

WAKE = b"w"
READY = b"ready\n"
_LENGTH = struct.Struct(">Q")
_STOP_SECONDS = 20.0  # a delivery's database call may wait out SQLite's busy timeout (15 s)
_FIRST_PAUSE = 1.0
_MAX_PAUSE = 30.0
_STABLE_SECONDS = 60.0  # a child that ran this long died of something new: pause briefly


class ForwarderProcess:
    """The service's side: start the child, wake it, count its results, restart it."""

    def __init__(self, settings: Settings, forwarder: Forwarder, metrics: Metrics) -> None:
        self._settings = settings
        self._forwarder = forwarder  # only to free a dead child's leases
        self._metrics = metrics
        self._stdin: asyncio.StreamWriter | None = None
        self._spawned: asyncio.subprocess.Process | None = None  # started, no settings yet
        self.running = False  # the child said it is ready, and has not exited since

    async def spawn(self) -> None:
        """Start the first child now, before the service's own start-up (recovery, the
        validation workers): its imports, about a second, overlap that work instead of
        following it. It waits for its settings, which ``run`` sends, before it delivers
        anything. If ``run`` never comes, ``discard`` ends it (so does the service's exit:
        the child reads end of file)."""
        if self._spawned is None:
            self._spawned = await self._spawn()

    async def discard(self) -> None:
        """End a child that was spawned but never given its settings."""
        child, self._spawned = self._spawned, None
        if child is not None and child.returncode is None:
            assert child.stdin is not None
            child.stdin.close()  # end of file before the settings: it exits at once
            try:
                await asyncio.wait_for(child.wait(), _STOP_SECONDS)
            except TimeoutError:
                child.kill()
                await child.wait()

    def notify(self) -> None:
        """A row was queued: wake the child's claimer now rather than at its next poll."""
        stdin = self._stdin
        if stdin is not None and not stdin.is_closing():
            stdin.write(WAKE)

    async def run(self) -> None:
        """Keep one child running until cancelled."""
        pause = _FIRST_PAUSE
        while True:
            started = time.monotonic()
            code = await self._run_child()
            if time.monotonic() - started >= _STABLE_SECONDS:
                pause = _FIRST_PAUSE  # it ran a good while: a new failure, not a loop
            log.error(
                "the forwarder process exited with %s; starting another in %.0f s",
                _describe(code),
                pause,
            )
            await asyncio.sleep(pause)
            pause = min(pause * 2, _MAX_PAUSE)

    @staticmethod
    async def _spawn() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "app.forwarding.process",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )

    async def _run_child(self) -> int:
        child, self._spawned = self._spawned or await self._spawn(), None
        assert child.stdin is not None
        assert child.stdout is not None
        settings = pickle.dumps(self._settings)
        child.stdin.write(_LENGTH.pack(len(settings)) + settings + WAKE)
        self._stdin = child.stdin
        try:
            while line := await child.stdout.readline():
                if line == READY:
                    self.running = True
                else:
                    self._count(line)
            return await child.wait()
        finally:
            self.running = False
            self._stdin = None
            if child.returncode is None:  # cancelled: the service is stopping
                child.stdin.close()
                try:
                    await asyncio.wait_for(child.wait(), _STOP_SECONDS)
                except TimeoutError:
                    log.warning("the forwarder process did not stop in time; killing it")
                    child.kill()
                    await child.wait()
            with contextlib.suppress(Exception):  # else they run out; the same outcome
                released = await asyncio.to_thread(self._forwarder.release_dead_leases)
                if released:
                    log.info("freed %d deliveries the forwarder process held", released)

    def _count(self, line: bytes) -> None:
        try:
            site, result, reason, latency = json.loads(line)
            if not (isinstance(site, str) and isinstance(result, str) and isinstance(reason, str)):
                raise TypeError("site, result and reason are strings")
            if latency is not None and not isinstance(latency, int | float):
                raise TypeError("latency is a number")
        except (ValueError, TypeError) as exc:
            log.warning("unreadable line from the forwarder process (%s): %.200r", exc, line)
            return
        self._metrics.count_forward(site, result, reason, latency)


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"status {code}"


class _Results(Metrics):
    """The child's metrics: each forward result becomes a line to the service."""

    def __init__(self, fd: int, sessions: sessionmaker[Session]) -> None:
        super().__init__(sessions)  # for the site names
        self._fd = fd

    def count_forward(
        self, site: str, result: str, reason: str, latency: float | None = None
    ) -> None:
        # Under PIPE_BUF bytes, so one write is atomic from any thread. A metric never
        # fails a delivery: with the service gone (EPIPE) this process is ending anyway.
        line = json.dumps([site, result, reason, latency]).encode() + b"\n"
        with contextlib.suppress(OSError):
            os.write(self._fd, line)


def _read_exactly(fd: int, size: int) -> bytes:
    """Read ``size`` bytes from a raw fd: not one byte more (wake-ups follow)."""
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise SystemExit("forwarder process: the service closed the pipe before its settings")
        data += chunk
    return data


async def _forward(settings: Settings, results: int) -> None:
    loop = asyncio.get_running_loop()
    loop.set_default_executor(
        ThreadPoolExecutor(max_workers=4 + settings.forward_concurrency, thread_name_prefix="db")
    )
    engine = make_engine(settings.database_url)
    orthanc = OrthancClient(settings)
    forwarder = Forwarder(
        settings,
        make_sessionmaker(engine),
        Spool(settings.spool_dir, settings.spool_min_free_bytes, settings.node_name),
        orthanc,
        metrics=_Results(results, make_read_sessionmaker(engine)),
    )
    wakes = asyncio.StreamReader()
    pipe, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(wakes), os.fdopen(0, "rb", buffering=0)
    )

    async def listen() -> None:
        while await wakes.read(4096):
            forwarder.notify()

    tasks = [
        asyncio.create_task(forwarder.run(), name="forwarder"),
        asyncio.create_task(listen(), name="wakes"),
    ]
    os.write(results, READY)
    log.info("forwarder process %d started", os.getpid())
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # the forwarder never ends on its own: raise what ended it
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):  # else the service frees them, or they run out
            await asyncio.to_thread(forwarder.release_own_leases)
        await orthanc.aclose()
        # A cancelled task's database work still runs in its thread: wait for it, or its
        # connection goes back to the pool after dispose() and is left open until exit.
        await loop.shutdown_default_executor()
        engine.dispose()
        pipe.close()  # and stdin with it: left open, the loop's close warns of both


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    results = os.dup(1)
    os.dup2(2, 1)
    (size,) = _LENGTH.unpack(_read_exactly(0, _LENGTH.size))
    settings = pickle.loads(_read_exactly(0, size))  # noqa: S301 - from our own parent
    if not isinstance(settings, Settings):
        raise SystemExit("forwarder process: the service sent no settings")
    logs.configure(settings.log_level, settings.log_format)
    with loops.runner(settings.event_loop) as runner:
        runner.run(_forward(settings, results))
    log.info("forwarder process %d stopped", os.getpid())


if __name__ == "__main__":
    main()
