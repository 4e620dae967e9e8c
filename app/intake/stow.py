"""DICOMweb STOW-RS answers (PS3.18 §10.5): the Store Instances Response in DICOM JSON.

Accepted instances go in ReferencedSOPSequence (0008,1199); refused ones in
FailedSOPSequence (0008,1198) with a FailureReason (0008,1197). The HTTP status is
200 when every instance was stored, 202 when some were and some failed, 409 when
none was (PS3.18 §10.5.3).
"""

from __future__ import annotations

from typing import Any

from app.db.models import State
from app.errors import (
    ContentNotAllowed,
    InstanceTooLarge,
    IntakeError,
    ServiceUnavailable,
    SpoolFull,
    StudyMismatch,
    TooManyRequests,
    UnsupportedTransferSyntax,
)
from app.intake.ledger import Receipt
from app.intake.multipart import Part
from app.intake.pipeline import Batch, Refusal
from app.orthanc_status import Status

MEDIA_TYPE = "application/dicom+json"

# PS3.18 §10.5.3 failure reasons (PS3.7 Annex C status codes).
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111  # same SOP Instance UID, other bytes: kept for an admin
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
STUDY_UID_MISMATCH = 0xC409  # not in PS3.18's table; the code dcm4chee-arc answers
NOT_AUTHORIZED = 0x0124  # PS3.7 C.5.1 "Refused: Not Authorized": another site's study

# Held uploads (quarantined, or a resend of a held copy) are failures, with why.
_HELD = {"conflict": DUPLICATE_SOP_INSTANCE, "foreign_study": NOT_AUTHORIZED}

_REFERENCED_SOP_CLASS = "00081150"
_REFERENCED_SOP_INSTANCE = "00081155"
_FAILURE_REASON = "00081197"
_FAILED_SOPS = "00081198"
_REFERENCED_SOPS = "00081199"


def failure_reason(error: IntakeError) -> int:
    if isinstance(error, TooManyRequests | SpoolFull | ServiceUnavailable | InstanceTooLarge):
        return OUT_OF_RESOURCES
    if isinstance(error, StudyMismatch):
        return STUDY_UID_MISMATCH
    if isinstance(error, UnsupportedTransferSyntax):
        return TRANSFER_SYNTAX_NOT_SUPPORTED
    if isinstance(error, ContentNotAllowed):
        return SOP_CLASS_NOT_SUPPORTED
    if error.status_code == 400:
        return CANNOT_UNDERSTAND
    return PROCESSING_FAILURE


def _uid(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def _failed(sop_class: str, sop_instance: str, reason: int) -> dict[str, Any]:
    return {
        _REFERENCED_SOP_CLASS: _uid(sop_class),
        _REFERENCED_SOP_INSTANCE: _uid(sop_instance),
        _FAILURE_REASON: {"vr": "US", "Value": [reason]},
    }


def _held(receipt: Receipt) -> bool:
    return receipt.state is State.QUARANTINED or receipt.status == Status.FILTERED_OUT


def response(batch: Batch, unkept: list[Part]) -> tuple[int, dict[str, Any]]:
    """The HTTP status and the DICOM JSON body for one STOW-RS request."""
    referenced: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for item in batch.items:
        outcome = item.outcome
        if isinstance(outcome, Receipt) and not _held(outcome):
            referenced.append(
                {
                    _REFERENCED_SOP_CLASS: _uid(outcome.sop_class_uid),
                    _REFERENCED_SOP_INSTANCE: _uid(outcome.sop_instance_uid),
                }
            )
        elif isinstance(outcome, Receipt):  # held: a conflict, another site's study, …
            reason = _HELD.get(outcome.reason or "", PROCESSING_FAILURE)
            failed.append(_failed(outcome.sop_class_uid, outcome.sop_instance_uid, reason))
        else:
            failed.append(_refused(outcome))
    # A part of another media type (e.g. metadata + bulk data) is not read at all.
    failed.extend(_failed("", "", CANNOT_UNDERSTAND) for _ in unkept)
    # No RetrieveURL (0008,1190): the intake serves no WADO-RS, so there is nothing to point at.
    body: dict[str, Any] = {}
    if failed:
        body[_FAILED_SOPS] = {"vr": "SQ", "Value": failed}
    body[_REFERENCED_SOPS] = {"vr": "SQ", "Value": referenced} if referenced else {"vr": "SQ"}
    if not failed:
        return 200, body
    return (202 if referenced else 409), body


def _refused(refusal: Refusal) -> dict[str, Any]:
    summary = refusal.summary
    return _failed(
        summary.sop_class_uid if summary else "",
        summary.sop_instance_uid if summary else "",
        failure_reason(refusal.error),
    )
