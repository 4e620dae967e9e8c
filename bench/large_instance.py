"""One very large instance (1 GiB of pixels by default) through the intake: memory and time.

Run ``python -m bench.large_instance [--mib 1024] [--reps 2]`` on its own, or as part
of ``python -m bench.throughput``. The file is a multi-frame 512x512x16-bit secondary
capture written to disk in 4 MiB pieces (never held in memory); every client streams
it from disk with a Content-Length. For each repetition:

- **direct**: one ``POST /instances`` of the file to a fresh private Orthanc; its time,
  and Orthanc's own peak RSS for comparison;
- **intake**: a fresh intake (new database and spool) in front of that Orthanc, emptied;
  the same upload; the time to the 200 (acknowledged: on disk, validated, committed)
  and until Orthanc holds the instance (forwarded). Then the peak RSS (VmHWM) of the
  intake process and of each of its children (the validation workers), and the peak
  of their summed RSS sampled every 0.1 s.

Target: peak RSS while receiving a 1 GB instance < 150 MB.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import support
from bench.support import MB, MIB, Backend
from tests.support.intake import current_rss, peak_rss, reset_peak_rss
from tests.support.orthanc import OrthancProcess

TARGET_RSS = 150 * MB


@dataclass
class LargeRun:
    rep: int
    direct_seconds: float
    orthanc_peak_rss: int  # the private Orthanc's VmHWM after the direct upload
    ack_seconds: float
    done_seconds: float
    intake_start_rss: int  # VmHWM of the intake process before the upload
    intake_peak_rss: int  # VmHWM after the instance is in Orthanc
    worker_peak_rss: dict[int, int] = field(default_factory=dict)  # child pid -> VmHWM
    worker_commands: dict[int, str] = field(default_factory=dict)
    sampled_total_rss: int = 0  # peak of (intake + children) VmRSS, sampled


@dataclass
class LargeResult:
    size: int
    generate_seconds: float
    backend: str
    runs: list[LargeRun]
    bench_peak_rss: int  # this benchmark's own VmHWM while generating and sending the file
    bench_start_rss: int  # ... and its RSS before

    @property
    def worst_intake_rss(self) -> int:
        return max(r.intake_peak_rss for r in self.runs)

    @property
    def worst_worker_rss(self) -> int:
        return max((max(r.worker_peak_rss.values(), default=0) for r in self.runs), default=0)

    @property
    def passed(self) -> bool:
        return self.worst_intake_rss < TARGET_RSS and self.worst_worker_rss < TARGET_RSS


def _intake_run(
    workdir: Path, backend: Backend, orthanc: OrthancProcess, path: Path, rep: int
) -> tuple[float, float, int, int, dict[int, int], dict[int, str], int]:
    support.empty_orthanc(orthanc)
    with support.running_intake(workdir, backend, orthanc, support.production_env()) as (
        intake,
        site,
    ):
        pid = intake.pid
        assert pid is not None
        start_rss = peak_rss(pid)
        with support.RssSampler(pid) as sampler:
            began = time.perf_counter()
            ack = support.upload_all(intake.url, (site.name, site.token), [path], 1, timeout=900)
            done = support.wait_for_count(
                orthanc, 1, began, timeout=900, alive=support.intake_alive(intake)
            )
        workers = {child: peak_rss(child) for child in support.descendants(pid)}
        commands = {child: support.command_line(child) for child in workers}
        return (
            ack,
            done,
            start_rss,
            peak_rss(pid),
            workers,
            commands,
            sampler.peak_total,
        )


def run(tmp: Path, backend: Backend, *, pixel_bytes: int, reps: int) -> LargeResult:
    """Generate the file in ``tmp``, run ``reps`` direct/intake pairs, clean up."""
    reset_peak_rss(os.getpid())  # from here on, this benchmark's own peak
    bench_start_rss = current_rss(os.getpid())
    began = time.perf_counter()
    path = tmp / "large-instance.dcm"
    size = support.write_multiframe(path, pixel_bytes, patient_id="BENCH-HUGE")
    generated = time.perf_counter() - began
    runs: list[LargeRun] = []
    # A fresh Orthanc, so its VmHWM says what receiving this file cost it.
    orthanc = OrthancProcess(tmp / "orthanc-large", name="private-large")
    try:
        orthanc.start()
        for rep in range(reps):
            support.empty_orthanc(orthanc)
            direct = support.upload_all(
                orthanc.url, (orthanc.username, orthanc.password), [path], 1, timeout=900
            )
            assert orthanc.pid is not None
            orthanc_rss = peak_rss(orthanc.pid)
            ack, done, start_rss, intake_rss, workers, commands, sampled = _intake_run(
                tmp / f"intake-large-{rep}", backend, orthanc, path, rep
            )
            runs.append(
                LargeRun(
                    rep,
                    direct,
                    orthanc_rss,
                    ack,
                    done,
                    start_rss,
                    intake_rss,
                    workers,
                    commands,
                    sampled,
                )
            )
            print(
                f"  large instance rep {rep + 1}: direct {direct:.1f} s, intake ack "
                f"{ack:.1f} s, in Orthanc {done:.1f} s, intake peak RSS "
                f"{intake_rss / MB:.1f} MB",
                flush=True,
            )
    finally:
        orthanc.stop()
        path.unlink(missing_ok=True)
    return LargeResult(size, generated, backend.name, runs, support.own_peak_rss(), bench_start_rss)


def _short(command: str) -> str:
    if "multiprocessing" in command and "spawn_main" in command:
        return "validation worker"
    if "resource_tracker" in command:
        return "multiprocessing resource tracker"
    if "app.forwarding.process" in command:
        return "forwarder process"
    return command[:60]


def report(result: LargeResult) -> list[str]:
    """Lines for the terminal (and the doc)."""
    size_mb = result.size / MB
    lines = [
        f"Large instance: {size_mb:,.0f} MB ({result.size / MIB:,.0f} MiB) multi-frame, "
        f"generated in {result.generate_seconds:.1f} s; intake database: {result.backend}",
        "",
        f"{'rep':>3} {'direct s':>9} {'direct MB/s':>12} {'intake ack s':>13} "
        f"{'in Orthanc s':>13} {'MB/s':>7} {'ratio':>6}",
    ]
    for r in result.runs:
        lines.append(
            f"{r.rep + 1:>3} {r.direct_seconds:>9.1f} {size_mb / r.direct_seconds:>12.0f} "
            f"{r.ack_seconds:>13.1f} {r.done_seconds:>13.1f} {size_mb / r.done_seconds:>7.0f} "
            f"{r.direct_seconds / r.done_seconds:>6.2f}"
        )
    lines.append("")
    lines.append("Peak RSS (VmHWM) per process, MB:")
    for r in result.runs:
        workers = ", ".join(
            f"{_short(r.worker_commands.get(pid, ''))} {rss / MB:.0f}"
            for pid, rss in sorted(r.worker_peak_rss.items())
        )
        lines.append(
            f"  rep {r.rep + 1}: intake {r.intake_peak_rss / MB:.1f} (after start-up "
            f"{r.intake_start_rss / MB:.1f}); {workers or 'no children'}; "
            f"intake + children sampled together {r.sampled_total_rss / MB:.0f}; "
            f"private Orthanc {r.orthanc_peak_rss / MB:.0f}"
        )
    growth = result.bench_peak_rss - result.bench_start_rss
    lines.append(
        f"  this benchmark while writing and sending the file: peak "
        f"{result.bench_peak_rss / MB:.0f} MB, {growth / MB:.0f} MB above its RSS before"
    )
    verdict = "MET" if result.passed else "NOT MET"
    lines.append(
        f"{verdict}: peak RSS of the intake {result.worst_intake_rss / MB:.1f} MB and of its "
        f"largest child process {result.worst_worker_rss / MB:.0f} MB, "
        f"target < {TARGET_RSS / MB:.0f} MB"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.large_instance", description=__doc__)
    parser.add_argument("--mib", type=int, default=1024, help="pixel data size in MiB")
    parser.add_argument("--reps", type=int, default=2, help="direct/intake pairs")
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    args = parser.parse_args(argv)
    support.exit_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="bench-large-") as tmp:
        result = run(Path(tmp), Backend(args.backend), pixel_bytes=args.mib * MIB, reps=args.reps)
    print("\n".join(report(result)))
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
