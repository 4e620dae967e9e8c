"""Runs read_summary away from the event loop, in worker processes.

A process pool uses both cores and isolates pydicom: a file that makes a worker
die costs that worker, not the service. Workers are spawned (a fresh interpreter:
no inherited event loop, sockets or database connections) and leave by themselves
when the intake process is gone, even after a SIGKILL: nothing else would tell them,
since each holds both ends of its own task queue. Each worker loads the parser
(``app.dicom.part10``: pydicom, numpy) as it starts; the intake process never does, unless
``VALIDATION_WORKERS`` is 0 and its threads parse.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from app.dicom.summary import Limits, Summary
from app.errors import MalformedDicom

log = logging.getLogger(__name__)

_PARENT_CHECK_SECONDS = 1.0


def _leave_with_parent() -> None:
    """Worker initializer: exit as soon as the process that started us is gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_CHECK_SECONDS)
        os._exit(0)  # orphaned: the intake died without shutting the pool down

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _start_worker() -> None:
    """Worker initializer: leave with the parent; load the parser before the first file."""
    _leave_with_parent()
    # read_summary would import it on the first call, ~0.2 s (pydicom, numpy) that
    # warm_up takes at start-up instead of the first upload.
    importlib.import_module("app.dicom.part10")


def read_summary(path: str, limits: Limits) -> Summary:
    """The parser's ``read_summary``, in a worker: imported here, on the first call (or by
    ``_start_worker``), so the serving process never loads pydicom and numpy."""
    from app.dicom import part10

    return part10.read_summary(path, limits)


class Validator:
    """Validates and summarises uploaded files in a pool of spawned worker processes
    (threads with ``VALIDATION_WORKERS=0``); a worker that dies costs one file a 400."""

    def __init__(self, limits: Limits, workers: int) -> None:
        self.limits = limits
        self._workers = workers
        self._pool = self._make_pool()

    def _make_pool(self) -> Executor:
        if self._workers == 0:
            return ThreadPoolExecutor(max_workers=2, thread_name_prefix="validate")
        return ProcessPoolExecutor(
            max_workers=self._workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
        )

    async def validate(self, path: Path) -> Summary:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, read_summary, str(path), self.limits)
        except BrokenProcessPool as exc:
            log.error("a validation worker died on %s; restarting the pool", path.name)
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._make_pool()
            raise MalformedDicom("the file made the validator fail") from exc

    def warm_up(self) -> None:
        """Start the workers now rather than on the first upload."""
        futures = [self._pool.submit(int) for _ in range(max(self._workers, 1))]
        for future in futures:
            future.result(timeout=60)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
