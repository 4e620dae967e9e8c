"""The long run of the kill rounds: SIGKILL the intake at random moments, many times.

Run ``python -m bench.kill_rounds --rounds 50 [--database sqlite|postgresql] [--seed N]``.
Each round loads a new study into a real "site" Orthanc, which pushes it to the intake
with ``/peers/intake/store`` (through a witness proxy that records each answer), while
``--scripts`` threads post their own new files with httpx; after a seeded random delay
(``--kill-after``) the intake is SIGKILLed and started again on the same database and
spool. At the end, once the queue has drained, every upload that got a 2xx must be in
the private Orthanc with the bytes sent (SHA-256 after the 128-byte preamble), nothing
that got no 2xx may be there with other bytes, and nothing may be quarantined, left
``received``/``queued`` or left in the spool. The engine is tests/support/faults.py's
``run_kill_rounds`` (tests/test_kill_rounds.py runs a few rounds of it in CI).

PostgreSQL: a fresh database on the test server (``INTAKE_TEST_POSTGRES_URL``, by
default 127.0.0.1:5432), dropped afterwards. Exit status 0 when nothing was lost.
docs/RELIABILITY.md ("Faults") records results.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

from tests.support import postgres
from tests.support.faults import KillConfig, KillReport, run_kill_rounds


def _range(text: str) -> tuple[float, float]:
    low, _, high = text.partition(",")
    bounds = (float(low), float(high or low))
    if not 0 < bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError("expected LOW,HIGH seconds with 0 < LOW <= HIGH")
    return bounds


def run(config: KillConfig, database: str, keep: bool) -> KillReport:
    workdir = Path(tempfile.mkdtemp(prefix="intake-kill-rounds-"))
    url = f"sqlite:///{workdir / 'intake.db'}"
    if database == "postgresql":
        url = postgres.create_database()
    try:
        return run_kill_rounds(workdir, url, config, log=print)
    finally:
        if database == "postgresql":
            postgres.drop_database(url)
        if keep:
            print(f"kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kill_rounds", description=__doc__)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--seed", type=int, default=None, help="default: a random one, printed")
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--scripts", type=int, default=3, help="concurrent scripted uploaders")
    parser.add_argument("--files-per-script", type=int, default=40, help="at most, per round")
    parser.add_argument("--peer-instances", type=int, default=12, help="per round")
    parser.add_argument(
        "--kill-after", type=_range, default=(0.2, 2.5), help="LOW,HIGH seconds (uniform)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON too")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    config = KillConfig(
        rounds=args.rounds,
        seed=seed,
        scripts=args.scripts,
        files_per_script=args.files_per_script,
        peer_instances=args.peer_instances,
        kill_after=args.kill_after,
    )
    report = run(config, args.database, args.keep)
    audit = report.audit
    print()
    print(
        "| scenario | acknowledged | found in Orthanc (right bytes) | quarantined | lost | rounds |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    if audit is not None:
        print(
            f"| intake SIGKILLed under load ({report.backend}, seed {seed}) | "
            f"{audit.acknowledged} | {audit.found} | {sum(report.quarantined.values())} | "
            f"{len(audit.lost)} | {report.rounds_survived}/{config.rounds} |"
        )
    print(f"\n{report.seconds:.0f} s; {'OK' if report.ok else 'FAILED'}")
    if args.json:
        print(
            json.dumps(
                {
                    "backend": report.backend,
                    "seed": seed,
                    "rounds": config.rounds,
                    "rounds_survived": report.rounds_survived,
                    "busy_kills": report.busy_kills,
                    "seconds": round(report.seconds),
                    "attempts": audit.attempts if audit else None,
                    "acknowledged": audit.acknowledged if audit else None,
                    "found": audit.found if audit else None,
                    "lost": len(audit.lost) if audit else None,
                    "corrupt": len(audit.corrupt) if audit else None,
                    "unacknowledged_present": audit.unacknowledged_present if audit else None,
                    "statuses": dict(report.statuses),
                    "states": dict(report.states),
                    "quarantined": dict(report.quarantined),
                    "already_stored": report.already_stored,
                    "forwarded_twice": report.forwarded_twice,
                    "rows_missing": report.rows_missing,
                    "leftover_files": report.leftover_files,
                    "orphans_removed": report.orphans_removed,
                },
                sort_keys=True,
            )
        )
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
