"""Structured logs: one JSON event per upload, request IDs carried to the forwarder."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

import pytest

from app import logs
from app.admin import intake_log
from app.db.models import State
from tests.conftest import ModuleIntakes
from tests.support.intake import IntakeProcess, wait_until
from tests.support.leaks import Registry, python_warnings
from tests.support.orthanc import OrthancProcess
from tests.support.studies import make_study


def _record(**extra: Any) -> logging.LogRecord:
    record = logging.makeLogRecord({"msg": "upload site=%s", "args": ("a",), **extra})
    record.request_id = "req-1"
    return record


def test_the_json_formatter_writes_one_object_with_the_extra_fields() -> None:
    line = logs.JsonFormatter().format(_record(event="upload", bytes=12, reason=None))
    payload = json.loads(line)
    assert payload["message"] == "upload site=a"
    assert payload["request_id"] == "req-1"
    assert payload["event"] == "upload"
    assert payload["bytes"] == 12
    assert "reason" not in payload  # None fields are left out
    assert "\n" not in line


def test_the_json_formatter_leaves_out_uvicorns_coloured_copy_of_the_message() -> None:
    """uvicorn passes ``color_message`` (ANSI escapes) for its own console formatter."""
    record = _record(color_message="\x1b[32mupload\x1b[0m site=%s")
    payload = json.loads(logs.JsonFormatter().format(record))
    assert "color_message" not in payload
    assert payload["message"] == "upload site=a"


def test_an_upload_record_holds_its_state_as_the_enum_it_declares() -> None:
    """The column reads back as a string; pydantic warned on every record it serialized."""
    row: list[object] = [None] * len(intake_log.FIELDS)
    row[intake_log.FIELDS.index("state")] = "queued"
    record = intake_log._record(row)
    assert record.state is State.QUEUED


_PYDANTIC_BLOCK = """\
2026-01-01 00:00:00,000 DEBUG httpcore.http11: response_closed.complete
/venv/lib/python3.11/site-packages/pydantic/type_adapter.py:651: UserWarning: Pydantic \
serializer warnings:
  PydanticSerializationUnexpectedValue(Expected `enum` - serialized value may not be as \
expected [field_name='state', input_value='queued', input_type=str])
  return self.serializer.to_json(
"""


@pytest.mark.parametrize(
    "text",
    [
        _PYDANTIC_BLOCK,  # printed, the default action
        "2026-01-01 ERROR uvicorn.error: Exception in ASGI application\n"
        "    Traceback (most recent call last):\n    UserWarning: Pydantic serializer\n",
        '{"level": "ERROR", "exception": "Traceback (most recent call last):\\n'
        'DeprecationWarning: old"}\n',
        "Exception ignored in: <_io.FileIO name=0>\nResourceWarning: unclosed file\n",
    ],
)
def test_a_python_warning_in_a_service_log_is_found(text: str, tmp_path: Path) -> None:
    log = tmp_path / "intake.log"
    log.write_text(text)
    registry = Registry()
    registry.remember_log(log)
    assert len(registry.new_warnings()) == 1
    assert registry.new_warnings() == []  # each line is reported once


@pytest.mark.parametrize(
    "line",
    [
        "2026-01-01 00:00:00,000 WARNING app.access.gate: security: site=a refused",
        "2026-01-01 INFO alembic: Running upgrade 0005 -> 0006, Warnings on an upload's row",
        '{"event": "upload", "warnings": ["UserWarning: a Modality a site chose"]}',
    ],
)
def test_log_lines_that_only_mention_warnings_are_not_python_warnings(line: str) -> None:
    assert python_warnings(line) == []


def test_the_text_formatter_appends_the_request_id() -> None:
    assert logs.TextFormatter().format(_record()).endswith("upload site=a [request_id=req-1]")


@pytest.mark.parametrize(
    ("offered", "kept"),
    [("abc-123", True), ("a" * 64, True), ("a" * 65, False), ("two words", False), (None, False)],
)
def test_only_plain_short_request_ids_are_kept(offered: str | None, kept: bool) -> None:
    chosen = logs.accept_request_id(offered)
    assert (chosen == offered) is kept
    assert 1 <= len(chosen) <= 64


def _events(intake: IntakeProcess, site: str | None = None) -> list[dict[str, Any]]:
    """Every log line as a JSON event (each must be one); with ``site``, only that site's
    upload events (the module's tests share one JSON-logging intake)."""
    lines = [line for line in intake.log_text().splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]
    return [e for e in events if site is None or e.get("site") == site]


@pytest.fixture(scope="module")
def json_intake(module_intakes: ModuleIntakes) -> IntakeProcess:
    return module_intakes(log_format="json")


def test_an_upload_is_one_json_event_and_its_forward_carries_the_request_id(
    json_intake: IntakeProcess, private_orthanc: OrthancProcess
) -> None:
    intake = json_intake
    site = intake.add_site(f"logged-{uuid.uuid4().hex[:12]}")
    data = make_study(n_series=1, per_series=1)[0]
    response = intake.upload(site, data, headers={"X-Request-ID": "trace-42"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "trace-42"
    answer = response.json()
    forwarded = wait_until(
        lambda: [
            e
            for e in _events(intake)
            if e.get("event") == "forwarded" and e.get("receipt") == answer["IntakeReceipt"]
        ],
        timeout=60,
    )
    (upload,) = [e for e in _events(intake, site.name) if e.get("event") == "upload"]
    assert upload["request_id"] == "trace-42"
    assert upload["site"] == site.name
    assert upload["outcome"] == "queued"
    assert upload["bytes"] == len(data)
    assert upload["latency_ms"] >= 0
    assert upload["receipt"] == answer["IntakeReceipt"]
    assert upload["sop_instance_uid"]
    assert forwarded[0]["request_id"] == "trace-42"
    assert forwarded[0]["orthanc_id"] == answer["ID"]
    text = intake.log_text()
    assert "Test^Intake" not in text  # no patient names
    assert "INTAKE-TEST" not in text  # nor patient IDs
    assert site.token not in text
    assert private_orthanc.password not in text


def test_a_refusal_is_an_event_too_and_every_answer_has_an_id(
    json_intake: IntakeProcess,
) -> None:
    intake = json_intake
    site = intake.add_site(f"refused-{uuid.uuid4().hex[:12]}")
    response = intake.upload(site, b"not dicom", headers={"X-Request-ID": "has spaces"})
    assert response.status_code == 400
    generated = response.headers["x-request-id"]
    assert generated != "has spaces"
    wait_until(
        lambda: any(e.get("event") == "upload" for e in _events(intake, site.name)), timeout=10
    )
    (event,) = [e for e in _events(intake, site.name) if e.get("event") == "upload"]
    assert (event["outcome"], event["reason"], event["status"]) == ("rejected", "not_dicom", 400)
    assert event["request_id"] == generated
