"""What became of an ``orthanc-intake upload`` run, said as a person reads it (and as JSON).

The words matter as much as the counts: a run that stopped says why and what to do,
a number of bytes counts only what the intake took, and "accepted" says where a file
stands (queued at the intake, which forwards it to the archive on its own).
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import httpx

# How a run can end before every file was sent (the JSON's "stopped").
Stop = Literal["interrupted", "token", "unreachable"]
# The lines of the summary, in order: (JSON name, label, what a non-zero count means).
_LINES = (
    ("accepted", "accepted", "queued: not yet in the archive when the intake answered"),
    ("duplicates", "duplicates", "sent before: in the archive or on its way"),
    ("quarantined", "quarantined", "held at the intake for an admin, not archived"),
    ("rejected", "rejected", "refused by the intake, listed below"),
    ("skipped", "skipped", "not sent, listed below"),
    ("failed", "failed", "not delivered, listed below"),
    ("not_sent", "not sent", "the run stopped before sending them"),
    ("retries", "retries", ""),
)


@dataclass(frozen=True)
class Problem:
    """A file (or ZIP entry) that was rejected, skipped or not delivered, and why.

    ``detail`` is the intake's own reason (its ``Details``); for a failure with no answer
    at all (``status`` None) it is the raw transport error, shown only with --verbose.
    ``sent_bytes`` of ``size`` had been sent when a file was refused or lost.
    """

    path: str
    status: int | None
    reason: str
    detail: str = ""
    sent_bytes: int | None = None
    size: int | None = None


@dataclass
class Report:
    """What became of a run. ``files`` and ``bytes`` count only what the intake took
    (answered 200) out of the ``total`` files and ZIP archives there were to send."""

    accepted: int = 0
    stored: int = 0  # of ``accepted``, those a plain Orthanc answered (no intake queue)
    duplicates: int = 0
    quarantined: int = 0
    rejected: list[Problem] = field(default_factory=list)
    skipped: list[Problem] = field(default_factory=list)
    failed: list[Problem] = field(default_factory=list)
    not_sent: int = 0
    total: int = 0
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    retries: int = 0
    stopped: Stop | None = None
    error: str | None = None  # why a run stopped early ("token", "unreachable"), for a person
    error_detail: str = ""  # the raw error behind ``error``, shown with --verbose

    @property
    def exit_code(self) -> int:
        if self.stopped == "interrupted":
            return 130  # 128 + SIGINT, as a shell reports a program that Ctrl-C ended
        if self.stopped == "token":
            return 3
        # A quarantined file (same SOP Instance UID, other bytes) needs a person too.
        trouble = self.quarantined or self.rejected or self.failed or self.not_sent
        return 1 if trouble or self.stopped else 0

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["seconds"] = round(self.seconds, 3)
        return data

    def message(self, verbose: bool = False) -> str | None:
        """The one line for stderr when the run stopped on an error, else None."""
        if self.error is None:
            return None
        if self.files == 0:
            outcome = "Nothing was uploaded."
        else:
            outcome = f"{self.files} of {files(self.total)} taken; {self.not_sent} not sent."
        raw = f"\n  ({self.error_detail})" if verbose and self.error_detail else ""
        return f"error: {self.error}. {outcome}{raw}"

    def summary(self, verbose: bool = False) -> str:
        """What a person reads on stdout; empty when the run stopped before anything was
        answered (the error line says all there is to say)."""
        answered = self.files or self.rejected or (self.failed and self.stopped != "unreachable")
        if self.stopped in ("token", "unreachable") and not answered:
            return ""
        lines = [self._headline()]
        for name, label, meaning in _LINES:
            value = getattr(self, name)
            count = len(value) if isinstance(value, list) else value
            if name == "accepted" and self.stored:
                meaning = self._stored_note()
            note = f"  {meaning}" if count and meaning else ""
            lines.append(f"  {label + ':':<13}{count:>5}{note}")
        for name in ("rejected", "failed", "skipped"):
            problems: list[Problem] = getattr(self, name)
            if problems:
                lines += [f"{name.capitalize()}:", *(f"  {describe(p, verbose)}" for p in problems)]
        if self.stopped == "interrupted" and self.total:
            lines.append(self._resume_hint())
        return "\n".join(lines)

    def _headline(self) -> str:
        taken = f"{self.files} of {files(self.total)} taken by the intake ({size(self.bytes)})"
        if self.stopped == "interrupted":
            if not self.total:
                return f"Interrupted after {self.seconds:.1f} s, before any file was sent."
            return f"Interrupted after {self.seconds:.1f} s: {taken}; {self.not_sent} not sent."
        return f"{taken} in {self.seconds:.1f} s."

    def _stored_note(self) -> str:
        # An Orthanc, not an intake, answered: it keeps what it accepts itself.
        if self.stored == self.accepted:
            return "stored by the Orthanc that answered (no intake queue)"
        queued = self.accepted - self.stored
        return f"{queued} queued at the intake, {self.stored} stored by an Orthanc"

    def _resume_hint(self) -> str:
        # The command keeps no record of a run: a second run sends every file again, and
        # the intake answers what it already holds as a duplicate (ARCHITECTURE.md).
        if not self.files:
            return "Run the same command again to send them."
        return (
            f"Run the same command again to send the rest: it sends all {files(self.total)} "
            f"again, and the intake answers the {self.files} it already took as duplicates "
            "without storing them twice."
        )


def describe(problem: Problem, verbose: bool = False) -> str:
    status = f" ({problem.status})" if problem.status is not None else ""
    shown = problem.detail and (problem.status is not None or verbose)
    detail = f": {problem.detail}" if shown else ""
    sent = ""
    if problem.sent_bytes is not None and problem.size and problem.sent_bytes < problem.size:
        sent = f" (after {size(problem.sent_bytes)} of {size(problem.size)} was sent)"
    return f"{problem.path}: {problem.reason}{status}{detail}{sent}"


def files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def size(n: int) -> str:
    """Bytes in decimal units, as the progress bar shows them."""
    if n < 1000:
        return f"{n} bytes"
    value = float(n)
    for unit in ("kB", "MB", "GB", "TB"):
        value /= 1000
        if value < 1000 or unit == "TB":
            break
    return f"{value:.1f} {unit}"


@dataclass(frozen=True)
class Unreached:
    """Why a request got no answer: a short reason, a sentence with the likely fix, the
    raw error, and whether trying again could help."""

    reason: str
    sentence: str
    raw: str
    transient: bool


def explain(exc: httpx.TransportError, url: str, timeout: float) -> Unreached:
    """Say what a transport error means for ``url`` (the --url given) and what to do."""
    raw = f"{type(exc).__name__}: {exc}"
    target = httpx.URL(url)
    place = f"{target.host}:{target.port or (443 if target.scheme == 'https' else 80)}"
    cause = _root(exc)
    if isinstance(cause, ssl.SSLCertVerificationError):
        why = cause.verify_message or cause.reason or "not trusted"
        if "mismatch" in why.lower():
            fix = "use the host name the certificate names in --url"
        else:
            fix = "pass the CA certificate that signed it with --cacert"
        return Unreached(
            "certificate not trusted",
            f"the TLS certificate of {place} is not trusted ({why}): {fix}",
            raw,
            transient=False,
        )
    if isinstance(cause, ssl.SSLError):
        # OpenSSL's word for a plain-HTTP answer to a ClientHello (3.2+ says the second).
        if cause.reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "HTTP_REQUEST"):
            port = target.port or 443
            plain = target.copy_with(scheme="http", port=port)
            return Unreached(
                "no TLS on that port",
                f"{url} does not speak TLS on port {port}: use {plain} instead, "
                "or enable TLS on the intake",
                raw,
                transient=False,
            )
        return Unreached(
            "TLS handshake failed",
            f"the TLS handshake with {place} failed ({cause.reason or cause}): check --url "
            "and the intake's TLS settings",
            raw,
            transient=False,
        )
    if isinstance(cause, socket.gaierror):
        temporary = cause.errno == socket.EAI_AGAIN
        return Unreached(
            "host name not found",
            f"the host name {target.host!r} in {url} could not be "
            f"{'looked up (a temporary DNS failure)' if temporary else 'found'}: "
            "check --url, and this machine's network",
            raw,
            transient=temporary,
        )
    if isinstance(cause, ConnectionRefusedError):
        return Unreached(
            "connection refused",
            f"nothing is listening at {url} (connection refused): check the host and port "
            "in --url, and that the intake is running",
            raw,
            transient=True,
        )
    if isinstance(exc, httpx.ConnectTimeout):
        return Unreached(
            "no connection",
            f"no connection to {url} within {timeout:g} s: check --url, and any firewall or "
            "proxy in between",
            raw,
            transient=True,
        )
    if isinstance(exc, httpx.TimeoutException):
        return Unreached(
            f"no answer within {timeout:g} s",
            f"{url} took the connection but did not answer within {timeout:g} s: raise "
            "--timeout, or ask the intake's admin",
            raw,
            transient=True,
        )
    reset = isinstance(cause, ConnectionResetError)
    if isinstance(exc, httpx.RemoteProtocolError) or (reset and target.scheme == "http"):
        # What a TLS listener does with a plain-HTTP request: it hangs up, with a FIN or,
        # when the request was still arriving, a reset.
        hint = (
            "if it serves HTTPS on that port, use https://"
            if target.scheme == "http"
            else "check that --url names the intake"
        )
        return Unreached(
            "closed without an answer",
            f"{url} closed the connection without answering: {hint}",
            raw,
            transient=True,
        )
    why = cause.strerror if isinstance(cause, OSError) and cause.strerror else type(exc).__name__
    return Unreached(
        "connection lost",
        f"the connection to {url} failed ({why}): check --url and the network",
        raw,
        transient=True,
    )


def _root(exc: BaseException) -> BaseException:
    """The error at the bottom of httpx's chain (httpx → httpcore → ssl or socket)."""
    while (inner := exc.__cause__ or exc.__context__) is not None:
        exc = inner
    return exc
