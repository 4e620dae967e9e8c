"""The public listener's OpenAPI contract: documentation only, nothing here changes an answer.

The public listener serves no /openapi.json, so strangers have nothing to enumerate; the
document is generated offline with ``create_public_app(settings).openapi()``, and
tests/test_schemas.py checks the live listener against it with schemathesis.
"""

from __future__ import annotations

from typing import Any

from app.intake import stow

BINARY_SCHEMA: dict[str, Any] = {"type": "string", "format": "binary"}
ORTHANC_ERROR_SCHEMA: dict[str, Any] = {
    "title": "OrthancError",
    "description": "Orthanc's error shape; `Details` says precisely why (docs/VALIDATION.md).",
    "type": "object",
    "required": [
        "HttpError",
        "HttpStatus",
        "Message",
        "Method",
        "OrthancError",
        "OrthancStatus",
        "Uri",
    ],
    "properties": {
        "HttpError": {"type": "string"},
        "HttpStatus": {"type": "integer"},
        "Message": {"type": "string"},
        "Method": {"type": "string"},
        "OrthancError": {"type": "string"},
        "OrthancStatus": {"type": "integer"},
        "Uri": {"type": "string"},
        "Details": {"type": "string"},
    },
}
_ORTHANC_ID: dict[str, Any] = {"type": "string", "pattern": "^[0-9a-f]{8}(-[0-9a-f]{8}){4}$"}
INSTANCE_SCHEMA: dict[str, Any] = {
    "title": "StoredInstance",
    "description": "Orthanc's answer to a stored instance, plus the intake's receipt.",
    "type": "object",
    "required": [
        "ID",
        "ParentPatient",
        "ParentSeries",
        "ParentStudy",
        "Path",
        "Status",
        "IntakeReceipt",
        "IntakeState",
    ],
    "properties": {
        "ID": _ORTHANC_ID,
        "ParentPatient": _ORTHANC_ID,
        "ParentSeries": _ORTHANC_ID,
        "ParentStudy": _ORTHANC_ID,
        "Path": {"type": "string"},
        "Status": {
            "type": "string",
            "enum": ["Success", "AlreadyStored", "FilteredOut"],
            "description": "Success: new, on its way to the archive; AlreadyStored: the "
            "archive has (or is getting) this site's copy of this Orthanc instance; "
            "FilteredOut: taken but held, not stored (IntakeReason says why)",
        },
        "IntakeReceipt": {"type": "string"},
        "IntakeState": {"type": "string", "enum": ["queued", "duplicate", "quarantined"]},
        "IntakeReason": {
            "type": "string",
            "description": "why a quarantined upload is held: conflict, foreign_study",
        },
        "IntakeEntry": {"type": "string", "description": "ZIP entry or form part file name"},
    },
}
_FAILED_FILE_SCHEMA: dict[str, Any] = {
    "title": "RefusedFile",
    "description": "One refused file of a ZIP or form upload.",
    "type": "object",
    "required": ["Status", "HttpStatus", "Message", "Details", "IntakeReason", "IntakeReceipt"],
    "properties": {
        "Status": {"type": "string", "enum": ["Failure"]},
        "HttpStatus": {"type": "integer"},
        "Message": {"type": "string"},
        "Details": {"type": "string"},
        "IntakeReason": {"type": "string"},
        "IntakeReceipt": {"type": "string"},
        "IntakeEntry": {"type": "string"},
    },
}
_ERROR_DESCRIPTIONS = {
    400: "Not an acceptable instance, or a body that cannot be read (Details says why)",
    401: "No or wrong site credentials",
    403: "The site's policy refuses this address, content or client certificate",
    406: "An Accept the answer cannot be sent in",
    408: "The body stalled, or arrived under the minimum rate",
    413: "Over a size, entry or part cap",
    415: "A Content-Encoding or Content-Type this route does not take",
    429: "Over the site's rate, quota or concurrent uploads, or too many failed logins",
    503: "The intake's database is unavailable",
    507: "The intake's spool is full",
}
_ERROR_HEADERS = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "required": True}},
    429: {"Retry-After": {"schema": {"type": "string"}, "required": True}},
    503: {"Retry-After": {"schema": {"type": "string"}, "required": True}},
    507: {"Retry-After": {"schema": {"type": "string"}, "required": True}},
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for refusals, in Orthanc's error shape."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        response: dict[str, Any] = {
            "description": _ERROR_DESCRIPTIONS[status],
            "content": {"application/json": {"schema": ORTHANC_ERROR_SCHEMA}},
        }
        if status in _ERROR_HEADERS:
            response["headers"] = _ERROR_HEADERS[status]
        responses[status] = response
    return responses


UPLOAD_ERRORS = (400, 401, 403, 408, 413, 415, 429, 503, 507)
INSTANCES_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": (
            "A raw instance: the stored instance. A ZIP archive: an array, one object per DICOM"
            " entry in archive order (non-DICOM entries and DICOMDIRs are left out, as Orthanc"
            " does). A form: an empty body when every file was taken (Orthanc's answer), or,"
            " with `Accept: application/json`, an array, one object per file."
        ),
        "content": {
            "application/json": {
                "schema": {
                    "anyOf": [
                        INSTANCE_SCHEMA,
                        {
                            "type": "array",
                            "items": {"anyOf": [INSTANCE_SCHEMA, _FAILED_FILE_SCHEMA]},
                        },
                    ]
                }
            }
        },
    },
    **error_responses(*UPLOAD_ERRORS),
}
INSTANCES_REQUEST: dict[str, Any] = {
    "parameters": [
        {
            "name": "Content-Encoding",
            "in": "header",
            "required": False,
            "description": "A gzip body is inflated as a stream, its inflated size capped",
            "schema": {"type": "string", "enum": ["gzip", "x-gzip", "identity"]},
        }
    ],
    "requestBody": {
        "required": True,
        "description": (
            "One DICOM Part 10 file (any Content-Type but the two below), a ZIP archive of"
            " DICOM files (found by its magic bytes), or a multipart/form-data form whose file"
            " parts are DICOM files or ZIP archives."
        ),
        "content": {
            "application/dicom": {"schema": BINARY_SCHEMA},
            "application/octet-stream": {"schema": BINARY_SCHEMA},
            "application/zip": {"schema": BINARY_SCHEMA},
            "multipart/form-data": {
                "schema": {"type": "object", "additionalProperties": BINARY_SCHEMA},
            },
        },
    },
}
SYSTEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Enough for an Orthanc peer's test button",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["Name", "ApiVersion", "Site"],
                    "properties": {
                        "Name": {"type": "string"},
                        "ApiVersion": {"type": "integer"},
                        "Site": {"type": "string"},
                    },
                    "additionalProperties": False,
                }
            }
        },
    },
    **error_responses(401, 403, 429, 503),
}


# --- DICOMweb STOW-RS ------------------------------------------------------------------
_UID_ATTRIBUTE: dict[str, Any] = {
    "type": "object",
    "required": ["vr"],
    "properties": {
        "vr": {"const": "UI"},
        "Value": {"type": "array", "items": {"type": "string"}},
    },
}
_REFERENCED: dict[str, Any] = {
    "type": "object",
    "required": ["00081150", "00081155"],
    "properties": {"00081150": _UID_ATTRIBUTE, "00081155": _UID_ATTRIBUTE},
}
_FAILED: dict[str, Any] = {
    "type": "object",
    "required": ["00081150", "00081155", "00081197"],
    "properties": {
        "00081150": _UID_ATTRIBUTE,
        "00081155": _UID_ATTRIBUTE,
        "00081197": {
            "type": "object",
            "required": ["vr", "Value"],
            "properties": {
                "vr": {"const": "US"},
                "Value": {"type": "array", "items": {"type": "integer"}},
            },
        },
    },
}


def _sequence(items: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["vr"],
        "properties": {"vr": {"const": "SQ"}, "Value": {"type": "array", "items": items}},
    }


_STORE_RESPONSE: dict[str, Any] = {
    "title": "StoreInstancesResponse",
    "description": (
        "PS3.18 §10.5.3 in DICOM JSON: ReferencedSOPSequence (0008,1199), FailedSOPSequence"
        " (0008,1198) with FailureReason (0008,1197)"
    ),
    "type": "object",
    "required": ["00081199"],
    "properties": {"00081199": _sequence(_REFERENCED), "00081198": _sequence(_FAILED)},
}
STOW_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Every instance was stored",
        "content": {stow.MEDIA_TYPE: {"schema": _STORE_RESPONSE}},
    },
    202: {
        "description": "Some instances were stored, some failed",
        "content": {stow.MEDIA_TYPE: {"schema": _STORE_RESPONSE}},
    },
    409: {
        "description": "No instance was stored",
        "content": {stow.MEDIA_TYPE: {"schema": _STORE_RESPONSE}},
    },
    **error_responses(*UPLOAD_ERRORS, 406),
}
STOW_REQUEST: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": (
            'multipart/related; type="application/dicom"; boundary=…: one DICOM Part 10 file'
            " per part (parts without a Content-Type are taken as application/dicom)"
        ),
        "content": {"multipart/related": {"schema": {"type": "array", "items": BINARY_SCHEMA}}},
    },
}
