"""Log records: plain text for people, or one JSON object per line for log pipelines.

Every record carries the request ID of the request it belongs to (a context variable
set by the public and admin listeners, and by the forwarder from the upload's row, so a
forward can be traced back to the request that brought the file). Fields given with
``extra=`` (e.g. the upload event's site, UIDs, size, outcome and latency) become JSON
keys. Never log patient names, tokens or passwords: nothing here filters them out.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# uvicorn's own records carry a copy of their message with ANSI colours in it
# (``color_message``), for its console formatter: no field of ours.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "request_id",
    "color_message",
}
# C0 and C1 controls, DEL, and Unicode's line and paragraph separators: anything that can
# end a line or drive a terminal. A value holding them (a site's Modality, a decoded URL)
# must never write a line of its own: it could look exactly like a real warning.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """``text`` on one line: every control character as a visible ``\\xNN``/``\\uNNNN``."""
    return _CONTROLS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def accept_request_id(offered: str | None) -> str:
    """The client's (or proxy's) ID when it is short and plain; else a new one."""
    if offered and _VALID_ID.fullmatch(offered):
        return offered
    return uuid.uuid4().hex


class _WithRequestId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            payload["request_id"] = rid
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and value is not None:
                payload[key] = value
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The line, whatever the values in it hold (``escape_controls``)."""
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        """A traceback, each of its lines indented: an exception's message (which may
        quote what a client sent) can then never start a line that looks like a record."""
        text = super().formatException(ei)
        return "\n".join("    " + escape_controls(line) for line in text.splitlines())

    def formatStack(self, stack_info: str) -> str:
        return "\n".join("    " + escape_controls(line) for line in stack_info.splitlines())

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} [request_id={rid}]" if rid else line


def configure(level: str, fmt: str) -> None:
    """Set up the root logger once: stderr, the chosen format, request IDs on every line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_WithRequestId())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request line at INFO; the forwarder logs its own.
    logging.getLogger("httpx").setLevel(logging.WARNING)
