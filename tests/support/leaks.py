"""Secrets the suite hands to real components, and the logs those components write.

At the end of the session (tests/conftest.py) every service log is searched for every
secret: a site or admin token, an admin password, a private Orthanc's password must
never appear in a log line, whatever the test did. After each test, what the logs gained
is searched for Python warnings: the services show every warning they meet
(tests/support/intake.py), and one in a log fails the test (tests/conftest.py).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_TOKEN_SHAPE = re.compile(r"oi[ta]_[A-Za-z0-9]{20,}")
# A warning as Python prints it ("path.py:12: UserWarning: …"), or as an exception under
# -W error: a traceback's last line (indented by app/logs.py's text format; after a "\n"
# inside a JSON record), or what "Exception ignored in" prints below itself.
_PYTHON_WARNING = re.compile(
    r"^(?:\S+:\d+: |\s*)(?:[\w.]+\.)?[A-Z]\w*Warning: |\\n(?:[\w.]+\.)?[A-Z]\w*Warning: ",
    re.MULTILINE,
)


def python_warnings(text: str) -> list[str]:
    """The lines of ``text`` that hold a Python warning."""
    return [line for line in text.splitlines() if _PYTHON_WARNING.search(line)]


@dataclass
class Findings:
    """What one or more test processes found in the logs they searched: Python warnings
    written at shutdown, leaked secrets, and how much was searched. Under pytest-xdist each
    worker sends its own as a dict (``as_dict``) and the controller adds them up."""

    warned: list[str] = field(default_factory=list)
    found: list[str] = field(default_factory=list)
    secrets: int = 0
    logs: int = 0

    def add(self, other: Findings) -> None:
        self.warned += other.warned
        self.found += other.found
        self.secrets += other.secrets
        self.logs += other.logs

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Registry:
    def __init__(self) -> None:
        self._tokens: set[str] = set()
        self._others: set[str] = set()
        self._logs: set[Path] = set()
        self._read_to: dict[Path, int] = {}  # how far each log was searched for warnings

    def remember_secret(self, value: str) -> None:
        (self._tokens if _TOKEN_SHAPE.fullmatch(value) else self._others).add(value)

    def remember_log(self, path: Path) -> None:
        self._logs.add(path)

    def counts(self) -> tuple[int, int]:
        """(secrets, logs) known so far."""
        return len(self._tokens) + len(self._others), len(self._logs)

    def new_warnings(self) -> list[str]:
        """Python warnings written to any log since the last call, one line each."""
        found: list[str] = []
        for log in sorted(self._logs):
            try:
                with log.open("rb") as file:
                    file.seek(self._read_to.get(log, 0))
                    gained = file.read()
            except FileNotFoundError:
                continue
            # Up to the last complete line: the rest is searched next time.
            complete = gained[: gained.rfind(b"\n") + 1]
            self._read_to[log] = self._read_to.get(log, 0) + len(complete)
            text = complete.decode(errors="replace")
            found.extend(f"{log}: {line}" for line in python_warnings(text))
        return found

    def findings(self) -> Findings:
        """This process's last search: warnings not yet seen, and every leak so far."""
        secrets, logs = self.counts()
        return Findings(self.new_warnings(), self.scan(), secrets, logs)

    def scan(self) -> list[str]:
        """One line per leak: which log, which secret (by its first characters only)."""
        found: list[str] = []
        for log in sorted(self._logs):
            try:
                text = log.read_text(errors="replace")
            except FileNotFoundError:
                continue
            # Token-shaped strings are found by pattern, then looked up: one pass per log.
            leaked = {m for m in _TOKEN_SHAPE.findall(text) if m in self._tokens}
            leaked |= {s for s in self._others if s in text}
            found.extend(f"{log}: {secret[:8]}…" for secret in sorted(leaked))
        return found


SUITE = Registry()  # what the whole test session handed out and produced
remember_secret = SUITE.remember_secret
remember_log = SUITE.remember_log
