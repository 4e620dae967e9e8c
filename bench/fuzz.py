"""A longer fuzz run of the validator than CI's (tests/test_fuzz.py), with counts.

Run ``python -m bench.fuzz [--engine hypothesis|atheris] [--examples N] [--seconds S]
[--limits default|tight]``.

- ``hypothesis`` (the default): the mutation strategy of ``tests/support/hostile.py``
  (byte flips, truncation, insertion, deletion, splices, extreme length fields) over
  generated instances and pydicom's bundled test files, ``--examples`` of them.
- ``atheris``: libFuzzer, coverage-guided, over the same seeds, with ``app.dicom.summary``,
  ``app.dicom.scan`` and pydicom instrumented; in a child process (libFuzzer ends the
  process when it is done), ``--examples`` runs or ``--seconds``, whichever is first,
  each input within libFuzzer's ``-timeout`` of 2 s.

Every input must get a consistent Summary or a documented refusal
(``hostile.validate_once``) within 2 s. Printed: examples, outcomes by reason (pydicom
exceptions turned into ``malformed`` by read_summary's catch-all are shown apart), the
slowest input, the total time; the run fails (exit 1) on the first broken promise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

_LIMITS = {"default": {}, "tight": {"max_depth": 2, "max_elements": 60, "max_inflated_bytes": 8192}}
_MAX_SECONDS = 2.0
_ATHERIS_MAX_LEN = 64 * 1024


def _report(
    engine: str,
    counts: Counter[str],
    slowest: float,
    seconds: float,
    extra: str,
    caught: dict[str, str],
) -> None:
    total = sum(counts.values())
    print(f"engine: {engine}  examples: {total}  time: {seconds:.1f} s  slowest: {slowest:.3f} s")
    if extra:
        print(extra)
    for label, count in counts.most_common():
        print(f"  {count:8d}  {100 * count / max(total, 1):5.1f} %  {label}")
    for label, detail in caught.items():
        print(f"first {label}: {detail}")


def _caught(path: str, limits: Any, label: str, caught: dict[str, str]) -> None:
    """Keep the detail of the first input per label that reached read_summary's catch-all
    (a pydicom exception the bounded scan did not pre-empt)."""
    from app.dicom.part10 import read_summary
    from app.errors import IntakeError

    if "pydicom" not in label or label in caught:
        return
    try:
        read_summary(path, limits)
    except IntakeError as exc:
        caught[label] = exc.detail[:300]


def run_hypothesis(examples: int, limits_name: str) -> int:
    from hypothesis import HealthCheck, given, settings

    from app.dicom.summary import Limits
    from tests.support.hostile import fuzz_seeds, mutated, validate_once

    limits = Limits(**_LIMITS[limits_name])
    seeds = fuzz_seeds()
    counts: Counter[str] = Counter()
    caught: dict[str, str] = {}
    slowest = 0.0
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "input.dcm")

        @settings(
            max_examples=examples,
            deadline=timedelta(seconds=_MAX_SECONDS),
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=mutated(seeds))
        def one(case: tuple[str, bytes]) -> None:
            nonlocal slowest
            with open(path, "wb") as f:
                f.write(case[1])
            started = time.perf_counter()
            label = validate_once(path, limits)
            slowest = max(slowest, time.perf_counter() - started)
            counts[label] += 1
            _caught(path, limits, label, caught)

        started = time.monotonic()
        one()
    elapsed = time.monotonic() - started
    _report("hypothesis", counts, slowest, elapsed, f"seeds: {len(seeds)}", caught)
    return 0


def run_atheris(examples: int, seconds: int, limits_name: str) -> int:
    """Start the libFuzzer child, wait, print its counts."""
    from tests.support.hostile import fuzz_seeds

    with tempfile.TemporaryDirectory() as work:
        corpus = Path(work, "corpus")
        corpus.mkdir()
        seeds = [(n, d) for n, d in fuzz_seeds() if len(d) <= _ATHERIS_MAX_LEN]
        for n, (_name, seed) in enumerate(seeds):
            (corpus / f"seed-{n:03d}").write_bytes(seed)
        stats = Path(work, "stats.json")
        command = [
            sys.executable,
            "-m",
            "bench.fuzz",
            "--atheris-child",
            str(stats),
            "--limits",
            limits_name,
            "--examples",
            str(examples),
            "--",
            f"-runs={examples}",
            f"-max_total_time={seconds}",
            f"-timeout={int(_MAX_SECONDS)}",
            f"-max_len={_ATHERIS_MAX_LEN}",
            f"-artifact_prefix={work}/",
            "-print_final_stats=1",
            str(corpus),
        ]
        started = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        elapsed = time.monotonic() - started
        found: dict[str, Any] = json.loads(stats.read_text()) if stats.exists() else {}
        crashes = sorted(
            p.name for p in Path(work).iterdir() if p.name.startswith(("crash", "timeout", "oom"))
        )
        coverage = re.findall(r"cov: (\d+) ft: (\d+)", done.stderr)
        runs = re.findall(r"Done (\d+) runs", done.stderr)
        extra = f"seeds: {len(seeds)}  libFuzzer exit: {done.returncode}"
        if runs:
            extra += f"  libFuzzer runs: {runs[-1]}"
        if coverage:
            extra += f"  coverage: {coverage[-1][0]} edges, {coverage[-1][1]} features"
        _report(
            "atheris",
            Counter(found.get("counts", {})),
            found.get("slowest", 0.0),
            elapsed,
            extra,
            found.get("caught", {}),
        )
        if done.returncode != 0 or crashes:
            print(done.stderr[-6000:])
            print(f"artifacts: {crashes}")
            return 1
    return 0


def atheris_child(stats: str, examples: int, limits_name: str, fuzzer_args: list[str]) -> None:
    import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]

    with atheris.instrument_imports(include=["app", "pydicom"]):
        from app.dicom import part10  # noqa: F401 - the parser: read_summary imports it lazily
        from app.dicom.summary import Limits
    from tests.support.hostile import validate_once

    limits = Limits(**_LIMITS[limits_name])
    counts: Counter[str] = Counter()
    caught: dict[str, str] = {}
    slowest = 0.0
    path = os.path.join(os.path.dirname(stats), "input.dcm")

    def dump() -> None:
        with open(stats, "w") as f:
            json.dump({"counts": counts, "slowest": slowest, "caught": caught}, f)

    def one(data: bytes) -> None:
        nonlocal slowest
        with open(path, "wb") as f:
            f.write(data)
        started = time.perf_counter()
        label = validate_once(path, limits)  # an AssertionError is a crash for libFuzzer
        slowest = max(slowest, time.perf_counter() - started)
        counts[label] += 1
        _caught(path, limits, label, caught)
        total = counts.total()
        if total % 100 == 0 or total >= examples:
            dump()  # libFuzzer ends the process without running Python's atexit

    atheris.Setup([sys.argv[0], *fuzzer_args], one)
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["hypothesis", "atheris"], default="hypothesis")
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--seconds", type=int, default=600, help="atheris: at most this long")
    parser.add_argument("--limits", choices=sorted(_LIMITS), default="default")
    parser.add_argument("--atheris-child", metavar="STATS", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.atheris_child:
        atheris_child(
            args.atheris_child, args.examples, args.limits, [a for a in rest if a != "--"]
        )
        return 0
    if args.engine == "atheris":
        return run_atheris(args.examples, args.seconds, args.limits)
    return run_hypothesis(args.examples, args.limits)


if __name__ == "__main__":
    sys.exit(main())
