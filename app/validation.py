"""Runs dicom.read_summary away from the event loop, in worker processes.

A process pool uses both cores and isolates pydicom: a file that makes a worker
die costs that worker, not the service.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from app import dicom
from app.errors import MalformedDicom

log = logging.getLogger(__name__)


class Validator:
    def __init__(self, limits: dicom.Limits, workers: int) -> None:
        self.limits = limits
        self._workers = workers
        self._pool = self._make_pool()

    def _make_pool(self) -> Executor:
        if self._workers == 0:
            return ThreadPoolExecutor(max_workers=2, thread_name_prefix="validate")
        # forkserver: workers never inherit the event loop, sockets or DB connections.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["app.dicom"])
        return ProcessPoolExecutor(max_workers=self._workers, mp_context=context)

    async def validate(self, path: Path) -> dicom.Summary:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._pool, dicom.read_summary, str(path), self.limits
            )
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
