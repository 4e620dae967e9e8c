"""Orthanc's REST vocabulary that several rooms speak: the ``Status`` of a stored instance.

The pipeline answers with these words, the forwarder reads them from the private Orthanc,
and the uploader from an intake or a plain Orthanc; one set, so that none of them drifts.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """``POST /instances``'s ``Status``."""

    SUCCESS = "Success"
    ALREADY_STORED = "AlreadyStored"
    FILTERED_OUT = "FilteredOut"  # Orthanc's word for "taken, but not stored"


STORED = frozenset({Status.SUCCESS, Status.ALREADY_STORED})  # the instance is in the archive
