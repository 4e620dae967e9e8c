"""The running service: database, spool, validator, Orthanc client and forwarder, together.

Both listeners share one Service; ``serve`` starts it once, and an app created
on its own (tests, ``uvicorn --factory``) starts its own in its lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from app.access import quotas
from app.access.admins import AdminAccess
from app.access.gate import Access
from app.db.models import utcnow
from app.db.sessions import make_engine, make_read_sessionmaker, make_sessionmaker
from app.dicom.summary import Limits as DicomLimits
from app.dicom.validation import Validator
from app.errors import ForwardError
from app.forwarding.forwarder import Forwarder
from app.forwarding.orthanc import OrthancClient
from app.forwarding.process import ForwarderProcess
from app.intake.pipeline import Intake
from app.intake.spool import Spool
from app.metrics import Metrics
from app.settings import Settings
from app.webhooks.notifier import Webhooks

log = logging.getLogger(__name__)


class Service:
    """The running service, composed once per process: database engines, spool, validator,
    access gates, the Orthanc client, the forwarder (in-process or its child process), the
    pipeline and the webhooks; ``start`` and ``stop`` run their background tasks. Routes
    take the pieces they need (app/api/deps.py), not this whole object."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = make_engine(settings.database_url)
        self.sessions = make_sessionmaker(self.engine)
        self.readers = make_read_sessionmaker(self.engine)  # queries that never write
        self.spool = Spool(settings.spool_dir, settings.spool_min_free_bytes, settings.node_name)
        self.validator = Validator(
            DicomLimits(
                max_depth=settings.max_sequence_depth,
                max_elements=settings.max_elements,
                max_inflated_bytes=settings.max_inflated_bytes,
            ),
            workers=settings.validation_workers,
        )
        self.access = Access(settings, self.sessions)
        self.admin_access = AdminAccess(
            self.sessions,
            settings.admin_allowed_cidrs,
            settings.admin_password_cache_seconds,
            settings.auth_cache_seconds,
        )
        self.orthanc = OrthancClient(settings)
        self.metrics = Metrics(self.readers)
        # Recovers at start-up; delivers too unless a process of its own does.
        self.forwarder = Forwarder(
            settings, self.sessions, self.spool, self.orthanc, metrics=self.metrics
        )
        self._delivery: Forwarder | ForwarderProcess = self.forwarder
        if settings.forwarder_process:
            self._delivery = ForwarderProcess(settings, self.forwarder, self.metrics)
        self.intake = Intake(
            settings,
            self.sessions,
            self.spool,
            self.validator,
            self.wake_forwarder,
            metrics=self.metrics,
        )
        self.webhooks = Webhooks(settings, self.sessions)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        # Database work runs in threads. The default pool (CPUs + 4 threads) is shared
        # with the forwarder's workers (when it runs here), whose claims block too when
        # the database is locked; uploads would then queue behind them for several busy
        # timeouts. Room for all.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(
                max_workers=32 + self.settings.forward_concurrency, thread_name_prefix="db"
            )
        )
        if isinstance(self._delivery, ForwarderProcess):
            await self._delivery.spawn()  # its imports overlap what follows
        try:
            if self.settings.auto_migrate:
                from app.db import migrations

                await asyncio.to_thread(migrations.upgrade, self.settings.database_url)
            self.spool.ensure()
            await asyncio.to_thread(self.forwarder.recover)
            await asyncio.to_thread(self.validator.warm_up)
        except BaseException:
            if isinstance(self._delivery, ForwarderProcess):
                await self._delivery.discard()
            raise
        self._tasks.append(asyncio.create_task(self._report_orthanc(), name="orthanc-check"))
        self._tasks.append(asyncio.create_task(self._delivery.run(), name="forwarder"))
        if not self.settings.forwarder_process:  # its own process says so itself
            log.info("forwarder started in the service's process")
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))
        if self.settings.webhook_urls:
            self._tasks.append(asyncio.create_task(self.webhooks.run(), name="webhooks"))

    def wake_forwarder(self) -> None:
        """A row became due: deliver it now rather than at the next poll."""
        self._delivery.notify()

    def forwarder_running(self) -> bool:
        """False while the forwarder's own process starts, or after it exited."""
        return self._delivery.running

    async def _housekeeping(self) -> None:
        """Hourly: forget old usage windows and long-expired upload slots."""

        def prune() -> None:
            with self.sessions() as session:
                quotas.prune(session, utcnow())
                session.commit()

        while True:
            try:
                await asyncio.to_thread(prune)
            except SQLAlchemyError as exc:
                log.warning("housekeeping could not reach the database: %s", exc)
            await asyncio.sleep(3600)

    async def _report_orthanc(self) -> None:
        """Say once at start-up whether the private Orthanc answers; uploads are held if not."""
        try:
            await self.orthanc.system()
            log.info("the private Orthanc at %s answers", self.settings.orthanc_url)
        except ForwardError as exc:
            log.warning(
                "the private Orthanc at %s does not answer (%s): uploads are accepted and "
                "held in the spool until it does",
                self.settings.orthanc_url,
                exc.detail,
            )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if isinstance(self._delivery, ForwarderProcess):
            await self._delivery.discard()  # if stopped before its task ever ran
        await self.orthanc.aclose()
        await self.webhooks.aclose()
        await asyncio.to_thread(self.validator.close)
        self.engine.dispose()

    def database_ready(self) -> bool:
        try:
            with self.readers() as session:  # no write lock for a health check
                session.execute(text("SELECT 1"))
        except Exception:
            return False
        return True
