"""The per-request cost of authentication + site policy, against argon2 and a bare SHA-256.

Run ``python -m bench.auth [--database-url URL] [--rounds N]``. Each case runs for a
calibrated number of iterations, ``--rounds`` times; the median of the rounds is
reported, with its ratio to one argon2 verification measured in the same run (the
machines are shared and noisy, so ratios travel better than absolute figures).
docs/PERFORMANCE.md explains the cases and records results.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from app.access import admins, sites
from app.access.admins import PASSWORDS, AdminAccess
from app.access.gate import Access
from app.access.tokens import _CHECK_LEN, TOKEN_PREFIX, _checksum, new_token
from app.db.migrations import upgrade
from app.db.sessions import make_engine, make_sessionmaker
from app.errors import Unauthenticated
from app.settings import Settings

TARGET_US = 200.0  # "Authentication + policy checks: < 0.2 ms per request"
ADDRESS = "127.0.0.1"
# The client's network is last, so check_address walks the whole list.
ALLOWED_CIDRS = ["10.0.0.0/8", "192.168.0.0/16", "2001:db8::/32", "127.0.0.0/8"]
_ROUND_SECONDS = 0.25  # wall time each round of a case aims for
_CALIBRATE_SECONDS = 0.02


@dataclass(frozen=True)
class Result:
    case: str
    ns_per_call: float  # median of the rounds

    @property
    def us(self) -> float:
        return self.ns_per_call / 1000


Call = Callable[[], Awaitable[None]]


async def _run(call: Call, iterations: int) -> int:
    start = time.perf_counter_ns()
    for _ in range(iterations):
        await call()
    return time.perf_counter_ns() - start


async def _measure(case: str, call: Call, rounds: int) -> Result:
    """Median ns per call over ``rounds`` rounds of a calibrated number of iterations."""
    await call()  # warm: caches, connection pool, first token-use write
    iterations = 1
    while (elapsed := await _run(call, iterations)) < _CALIBRATE_SECONDS * 1e9:
        iterations *= 2
    iterations = max(1, round(iterations * _ROUND_SECONDS * 1e9 / elapsed))
    per_call = [await _run(call, iterations) / iterations for _ in range(rounds)]
    return Result(case, statistics.median(per_call))


async def _paired(case: str, first: Call, second: Call, samples: int = 1500) -> Result:
    """Median of (first - second) over alternating single calls: drift cancels out.

    A positive or negative median well inside the spread of single calls means a
    guess's closeness to the real token does not show in its refusal time.
    """
    differences = []
    for _ in range(samples):
        start = time.perf_counter_ns()
        await first()
        middle = time.perf_counter_ns()
        await second()
        differences.append((middle - start) - (time.perf_counter_ns() - middle))
    return Result(case, statistics.median(differences))


def _synchronous(function: Callable[[], object]) -> Call:
    async def call() -> None:
        function()

    return call


def _authenticating(access: Access, header: str) -> Call:
    async def call() -> None:
        await access.authenticate(header, ADDRESS)

    return call


def _refusing(access: Access, header: str) -> Call:
    async def call() -> None:
        try:
            await access.authenticate(header, ADDRESS)
        except Unauthenticated:
            return
        raise AssertionError("a malformed token was accepted")

    return call


def _settings(
    database_url: str,
    spool: Path,
    *,
    auth_cache_seconds: float = 5.0,
    auth_max_failures: int = 10,
) -> Settings:
    # Every knob the cases depend on is given, so INTAKE_* variables cannot skew them.
    return Settings(
        database_url=database_url,
        spool_dir=spool,
        auth_cache_seconds=auth_cache_seconds,
        auth_max_failures=auth_max_failures,
        token_touch_seconds=300.0,
    )


def _create_site(sessions: sessionmaker[Session]) -> tuple[str, str]:
    name = f"bench-{os.getpid()}-{time.time_ns() % 1_000_000}"
    with sessions() as session:
        created = sites.add(session, name, label="bench")
        sites.set_policy(session, name, allowed_cidrs=ALLOWED_CIDRS)
    return name, created.token


async def _cases(
    database_url: str, spool: Path, sessions: sessionmaker[Session], rounds: int
) -> list[Result]:
    name, token = _create_site(sessions)
    basic = "Basic " + base64.b64encode(f"{name}:{token}".encode()).decode()
    bearer = f"Bearer {token}"
    # One wrong character: the checksum refuses it before any lookup.
    malformed = f"Bearer {token[:-1]}{'A' if token[-1] != 'A' else 'B'}"

    warm = Access(_settings(database_url, spool), sessions)
    cold = Access(_settings(database_url, spool, auth_cache_seconds=0), sessions)
    # Failures count against the address; a high allowance keeps every request on the
    # refusal path instead of the (even cheaper) blocked path after ten of them.
    refusing = Access(_settings(database_url, spool, auth_max_failures=10**9), sessions)

    password = "correct horse battery staple"
    password_hash = PASSWORDS.hash(password)
    encoded = basic.encode()
    with sessions() as session:
        admins.add(session, "bench-admin", password)
    admin_access = AdminAccess(sessions, [], cache_seconds=60.0)
    admin_basic = "Basic " + base64.b64encode(f"bench-admin:{password}".encode()).decode()

    async def admin_call() -> None:
        await admin_access.authenticate(admin_basic, "127.0.0.1")

    # Timing: does a refusal say how close a guess was? (f) and (g) are both unknown,
    # well-formed tokens; (g) shares all but the last body character with the real one.
    # The lookup is by SHA-256 digest, so closeness should cost nothing measurable.
    random_guess = f"Bearer {new_token()}"
    body = token[len(TOKEN_PREFIX) : -_CHECK_LEN]
    near_body = body[:-1] + ("A" if body[-1] != "A" else "B")
    near_miss = f"Bearer {TOKEN_PREFIX}{near_body}{_checksum(near_body)}"
    wrong_site = "Basic " + base64.b64encode(f"not-{name}:{token}".encode()).decode()
    guessing = Access(
        _settings(database_url, spool, auth_cache_seconds=0, auth_max_failures=10**9), sessions
    )

    results = [
        await _measure("(a) Basic, warm cache + policy", _authenticating(warm, basic), rounds),
        await _measure("(b) Bearer, warm cache + policy", _authenticating(warm, bearer), rounds),
        await _measure("(c) Basic, cold: one DB query", _authenticating(cold, basic), rounds),
        await _measure("(d) malformed token, refused", _refusing(refusing, malformed), rounds),
        await _measure("(e) admin Basic, cached password", admin_call, rounds),
        await _measure("(f) unknown token, refused", _refusing(guessing, random_guess), rounds),
        await _measure("(g) near-miss token, refused", _refusing(guessing, near_miss), rounds),
        await _measure("(h) real token, wrong site", _refusing(guessing, wrong_site), rounds),
        await _paired(
            "(g-f) near-miss minus unknown, paired",
            _refusing(guessing, near_miss),
            _refusing(guessing, random_guess),
        ),
        await _measure(
            "(B1) argon2 verify (passlib)",
            _synchronous(lambda: PASSWORDS.verify(password, password_hash)),
            rounds,
        ),
        await _measure(
            "(B2) sha256 of the header",
            _synchronous(lambda: hashlib.sha256(encoded).hexdigest()),
            rounds,
        ),
    ]
    # Let the fire-and-forget token-use writes finish before the database goes away.
    await asyncio.sleep(0.1)
    return results


def _report(results: list[Result], backend: str, rounds: int) -> bool:
    argon2 = next(r for r in results if r.case.startswith("(B1)"))
    print(f"machine: {os.cpu_count()} CPUs, {platform.platform()}, {platform.machine()}")
    print(f"python:  {platform.python_implementation()} {platform.python_version()}")
    print(f"backend: {backend}; median of {rounds} rounds per case")
    print()
    print(f"{'case':<34} {'µs/request':>12} {'times cheaper than argon2':>26}")
    print("-" * 74)
    for result in results:
        ratio = argon2.ns_per_call / abs(result.ns_per_call or 1)
        print(f"{result.case:<34} {result.us:>12.2f} {ratio:>26,.0f}")
    print()
    warm = results[0]
    passed = warm.us < TARGET_US
    verdict = "PASS" if passed else "FAIL"
    print(f"{verdict}: (a) {warm.us:.2f} µs < {TARGET_US:.0f} µs per request")
    unknown = next(r for r in results if r.case.startswith("(f)"))
    paired = next(r for r in results if r.case.startswith("(g-f)"))
    print(
        f"timing: paired, a near-miss guess is refused {paired.us:+.1f} µs later than a random "
        f"one ({paired.ns_per_call / unknown.ns_per_call:+.1%} of a refusal)"
    )
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.auth", description=__doc__)
    parser.add_argument(
        "--database-url",
        help="a database the benchmark may migrate and add a site to "
        "(default: a temporary SQLite file)",
    )
    parser.add_argument(
        "--rounds", type=int, default=7, help="rounds per case; the median is reported"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    with tempfile.TemporaryDirectory(prefix="bench-auth-") as tmp:
        database_url = args.database_url or f"sqlite:///{Path(tmp) / 'intake.db'}"
        upgrade(database_url)
        engine = make_engine(database_url)
        try:
            sessions = make_sessionmaker(engine)
            results = asyncio.run(_cases(database_url, Path(tmp) / "spool", sessions, args.rounds))
        finally:
            engine.dispose()
    url = make_url(database_url)
    backend = f"{url.get_backend_name()} ({url.get_driver_name()})"
    return 0 if _report(results, backend, args.rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
