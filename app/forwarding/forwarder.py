"""Delivery of queued uploads to the private Orthanc: attempts, retries, quarantine.

One claimer leases due rows for the idle senders, several at a time (app/forwarding/
leases.py), so several intake processes can share a database. Orthanc being unreachable
is waited out for ever, with back-off; error answers (5xx) are retried up to
``forward_max_attempts`` and refusals (4xx) are quarantined at once, the file kept for
an admin. Start-up recovery is app/forwarding/recovery.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from datetime import timedelta
from pathlib import Path
from typing import cast

from sqlalchemy import Table, bindparam, func
from sqlalchemy.orm import Session, sessionmaker

from app import logs
from app.db.models import State, Upload, utcnow
from app.errors import ForwardError, OrthancRefused
from app.forwarding.leases import Claim, LeaseLost, Leases
from app.forwarding.orthanc import OrthancClient, StoredInstance
from app.forwarding.recovery import recover
from app.intake.spool import QUARANTINE, QUEUE, Spool
from app.metrics import Metrics
from app.orthanc_status import STORED, Status
from app.settings import Settings

log = logging.getLogger(__name__)


_UPLOADS = cast(Table, Upload.__table__)
# One UPDATE, checked against the lease: a sender whose lease ran out changes nothing.
_MARK_FORWARDED = (
    _UPLOADS.update()
    .where(
        _UPLOADS.c.id == bindparam("b_id"),
        _UPLOADS.c.lease_owner == bindparam("b_lease"),
        _UPLOADS.c.state == State.QUEUED,
    )
    .values(
        state=State.FORWARDED,
        # Orthanc's own IDs, whatever the intake computed (a value Orthanc reads otherwise).
        orthanc_instance_id=bindparam("b_orthanc_id"),
        orthanc_series_id=func.coalesce(bindparam("b_series"), _UPLOADS.c.orthanc_series_id),
        orthanc_study_id=func.coalesce(bindparam("b_study"), _UPLOADS.c.orthanc_study_id),
        orthanc_patient_id=func.coalesce(bindparam("b_patient"), _UPLOADS.c.orthanc_patient_id),
        orthanc_status=bindparam("b_status"),
        forwarded_at=bindparam("b_at"),
        attempts=bindparam("b_attempts"),
        next_attempt_at=None,
        reason=None,
        detail=None,
        lease_owner=None,
        lease_until=None,
    )
    .returning(_UPLOADS.c.site_id, _UPLOADS.c.received_at)
)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as file:
        while chunk := file.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


class Forwarder:
    """Delivers queued uploads: one claimer feeds the senders; each attempt ends in
    ``forwarded``, a retry later, or ``quarantined``, written under the claim's lease."""

    running = True  # as a task of the service's loop, it runs whenever the service does

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        spool: Spool,
        orthanc: OrthancClient,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics or Metrics()
        self._sessions = sessions
        self._spool = spool
        self._orthanc = orthanc
        self._leases = Leases(settings, sessions, spool)
        self._wake = asyncio.Event()
        self._orthanc_down_logged = False

    @property
    def owner(self) -> str:
        """``host:pid``: the start of every lease this forwarder takes."""
        return self._leases.owner

    @owner.setter
    def owner(self, owner: str) -> None:
        self._leases.owner = owner

    def notify(self) -> None:
        """A row was queued: wake the claimer now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        """Deliver until cancelled: one claimer feeds ``forward_concurrency`` senders.

        Only the claimer queries for due rows, in one transaction for as many rows as
        there are idle senders; a wake-up costs one claim, not one per idle sender (the
        "thundering herd" that made empty claims most of the forwarder's work).
        """
        concurrency = self._settings.forward_concurrency
        idle = asyncio.Semaphore(concurrency)
        claims: asyncio.Queue[Claim] = asyncio.Queue()
        tasks = [
            asyncio.create_task(self._sender(claims, idle), name=f"forwarder-{i}")
            for i in range(concurrency)
        ]
        tasks.append(asyncio.create_task(self._claimer(claims, idle), name="forwarder-claims"))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _claimer(self, claims: asyncio.Queue[Claim], idle: asyncio.Semaphore) -> None:
        poll = self._settings.forward_poll_seconds
        while True:
            await idle.acquire()  # at least one sender is free
            wanted = 1
            while not idle.locked():  # and every other free one
                await idle.acquire()
                wanted += 1
            self._wake.clear()  # a notify() from here on is seen by the wait below
            try:
                taken = await asyncio.to_thread(self._claim, wanted)
            except Exception:
                # The claimer never dies: a database error is retried after a pause.
                log.exception("forwarder claim error; carrying on")
                taken = []
                await asyncio.sleep(poll)
            for claim in taken:
                claims.put_nowait(claim)
            for _ in range(wanted - len(taken)):
                idle.release()
            if len(taken) < wanted:  # nothing more is due now
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), poll)

    async def _sender(self, claims: asyncio.Queue[Claim], idle: asyncio.Semaphore) -> None:
        while True:
            claim = await claims.get()
            try:
                await self.deliver(claim)
            except Exception:
                # A sender never dies: whatever went wrong, the row's lease runs out and
                # the row is claimed again.
                log.exception("forwarder worker error; carrying on")
            finally:
                idle.release()

    async def deliver(self, claim: Claim) -> None:
        """One attempt at one claimed row; afterwards the row holds no lease of ours."""
        heartbeat = asyncio.create_task(self._leases.keep(claim))
        # This delivery's log lines carry the ID of the request that brought the file.
        traced = logs.request_id.set(claim.request_id)
        try:
            await self._attempt(claim)
        except LeaseLost as exc:
            log.warning("%s; leaving the row to its new owner", exc)
        except Exception as exc:
            log.exception("unexpected error forwarding receipt=%s", claim.receipt)
            error = ForwardError(f"unexpected error in the forwarder: {type(exc).__name__}")
            with contextlib.suppress(Exception):  # else the lease runs out; same outcome
                await asyncio.to_thread(self._retry_later, claim, error)
        finally:
            logs.request_id.reset(traced)
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await heartbeat

    async def _attempt(self, claim: Claim) -> None:
        path = self._spool.path(QUEUE, claim.spool_name)
        if not path.exists():
            await asyncio.to_thread(
                self._quarantine,
                claim,
                "spool_file_missing",
                f"the spool file {claim.spool_name} is missing; the upload cannot be forwarded",
            )
            return
        started = time.perf_counter()
        try:
            stored = await self._orthanc.store_instance(path)
            if stored.status not in STORED:
                # e.g. "FilteredOut" (a Lua ReceivedInstanceFilter): answered 200, not stored.
                await asyncio.to_thread(
                    self._quarantine,
                    claim,
                    "orthanc_refused",
                    f"Orthanc answered Status {stored.status!r} for instance {stored.id} and "
                    "did not store it",
                )
                return
            if stored.status == Status.ALREADY_STORED and not await self._same_bytes(
                stored.id, path
            ):
                await asyncio.to_thread(
                    self._quarantine,
                    claim,
                    "conflict",
                    f"Orthanc already holds instance {stored.id} with different bytes; "
                    "it kept its copy and ignored this one",
                )
                return
        except OrthancRefused as exc:
            await asyncio.to_thread(self._quarantine, claim, "orthanc_refused", exc.detail)
            return
        except ForwardError as exc:
            await asyncio.to_thread(self._retry_later, claim, exc)
            return
        except FileNotFoundError:
            # The file went away mid-delivery: only another worker's success does that.
            raise LeaseLost(f"receipt={claim.receipt}: spool file gone mid-delivery") from None
        if claim.expected_id and stored.id != claim.expected_id:
            log.warning(
                "receipt=%s Orthanc ID %s differs from the computed %s",
                claim.receipt,
                stored.id,
                claim.expected_id,
            )
        await asyncio.to_thread(self._mark_forwarded, claim, stored)
        self._orthanc_down_logged = False
        latency_ms = round((time.perf_counter() - started) * 1000, 1)
        log.info(
            "forwarded receipt=%s orthanc_id=%s status=%s ms=%.1f",
            claim.receipt,
            stored.id,
            stored.status,
            latency_ms,
            extra={
                "event": "forwarded",
                "receipt": claim.receipt,
                "orthanc_id": stored.id,
                "status": stored.status,
                "latency_ms": latency_ms,
            },
        )

    async def _same_bytes(self, instance_id: str, path: Path) -> bool:
        remote = await self._orthanc.stored_md5(instance_id)
        if remote is None:
            return True  # Orthanc keeps no MD5: nothing to compare, trust its answer
        return remote == await asyncio.to_thread(_md5, path)

    def _mark_forwarded(self, claim: Claim, stored: StoredInstance) -> None:
        with self._sessions() as session:
            marked = session.execute(
                _MARK_FORWARDED,
                {
                    "b_id": claim.id,
                    "b_lease": claim.lease,
                    "b_orthanc_id": stored.id,
                    "b_series": stored.parent_series,
                    "b_study": stored.parent_study,
                    "b_patient": stored.parent_patient,
                    "b_status": stored.status,
                    "b_at": utcnow(),
                    "b_attempts": claim.attempts + 1,
                },
            ).first()
            if marked is None:
                raise LeaseLost(f"receipt={claim.receipt}: lease lost before marking it forwarded")
            session.commit()
        # Orthanc has it and the row says so: the spool copy has done its job.
        self._spool.discard(self._spool.path(QUEUE, claim.spool_name))
        self._metrics.record_forwarded(marked.site_id, marked.received_at, utcnow())

    def _quarantine(self, claim: Claim, reason: str, detail: str) -> None:
        with self._leases.owned(claim) as (_, row):
            source = self._spool.path(QUEUE, claim.spool_name)
            # Moved before the commit: a crash in between leaves a queued row whose
            # file is in quarantine/, which the next attempt quarantines as missing.
            if source.exists():
                self._spool.keep(source, QUARANTINE, claim.spool_name)
            row.state = State.QUARANTINED
            row.reason = reason
            row.detail = detail
            row.attempts = claim.attempts + 1
            row.next_attempt_at = None
            site_id = row.site_id
        self._metrics.record_quarantine(site_id, reason)
        log.warning("quarantined receipt=%s reason=%s detail=%s", claim.receipt, reason, detail)

    def _retry_later(self, claim: Claim, error: ForwardError) -> None:
        failed = claim.failed_answers + (1 if error.answered else 0)
        if failed >= self._settings.forward_max_attempts:
            self._quarantine(
                claim, "gave_up", f"Orthanc kept failing ({failed} error answers): {error.detail}"
            )
            return
        attempts = claim.attempts + 1
        delay = min(
            self._settings.forward_retry_max_seconds,
            self._settings.forward_retry_base_seconds * 2 ** min(attempts - 1, 30),
        )
        delay *= random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not cryptography
        with self._leases.owned(claim) as (_, row):
            row.attempts = attempts
            row.failed_answers = failed
            row.reason = "orthanc_unavailable"
            row.detail = error.detail
            row.next_attempt_at = utcnow() + timedelta(seconds=delay)
            site_id = row.site_id
        self._metrics.record_retry(site_id, "error_answer" if error.answered else "unreachable")
        if not error.answered and self._orthanc_down_logged:
            return
        self._orthanc_down_logged = not error.answered
        log.warning(
            "forward of receipt=%s failed (%s); holding it, next try in %.1fs",
            claim.receipt,
            error.detail,
            delay,
        )

    def release_own_leases(self) -> int:
        """Free this process's leases as it stops (see ``Leases.release_own``)."""
        return self._leases.release_own()

    def release_dead_leases(self) -> int:
        """Free the leases of this host's dead processes (see ``Leases.release_dead``)."""
        return self._leases.release_dead()

    def recover(self) -> None:
        """At start-up, before the first claim: see app/forwarding/recovery.py."""
        recover(self._settings, self._sessions, self._spool, self._leases, self._metrics)

    def _claim(self, limit: int = 1) -> list[Claim]:
        return self._leases.claim(limit)
