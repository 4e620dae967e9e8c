"""Secrets the suite hands to real components, and the logs those components write.

At the end of the session (tests/conftest.py) every service log is searched for every
secret: a site or admin token, an admin password, a private Orthanc's password must
never appear in a log line, whatever the test did.
"""

from __future__ import annotations

import re
from pathlib import Path

_TOKEN_SHAPE = re.compile(r"oi[ta]_[A-Za-z0-9]{20,}")


class Registry:
    def __init__(self) -> None:
        self._tokens: set[str] = set()
        self._others: set[str] = set()
        self._logs: set[Path] = set()

    def remember_secret(self, value: str) -> None:
        (self._tokens if _TOKEN_SHAPE.fullmatch(value) else self._others).add(value)

    def remember_log(self, path: Path) -> None:
        self._logs.add(path)

    def counts(self) -> tuple[int, int]:
        """(secrets, logs) known so far."""
        return len(self._tokens) + len(self._others), len(self._logs)

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
