"""Throughput of the intake against pushing straight to Orthanc, and its memory.

Run ``python -m bench.throughput [--quick]``. In one run, on data generated once, with
real Debian Orthancs on loopback (a private one, auth on, ``OverwriteInstances``
false; and a "site" Orthanc holding the data, with two OrthancPeers: the private
Orthanc itself, and the intake as ``sites add --json`` describes it):

1. **peer push, direct**: the site's synchronous ``/peers/direct/store`` job of every
   study of a data set to the private Orthanc.
2. **peer push, through the intake**: the same job to a fresh intake; the site's
   acknowledgement time, and the time until the private Orthanc holds every instance.
3. **concurrent uploads**: 1, 4 and 16 scripted httpx clients (one keep-alive
   connection each, one shared queue of files) posting every file to the private
   Orthanc, then to a fresh intake (until every instance is in Orthanc).
4. **large instance**: bench/large_instance.py (1 GiB of pixels): peak RSS and time.

Three data sets: CT slices of 512x512x16-bit (~0.5 MB), small ~30 KB instances and
~200 MB multi-frame instances. The private Orthanc is emptied before every run, and
every intake run gets a fresh intake (database and spool): both remember what they
stored and would answer AlreadyStored. Each run is repeated ``--reps`` times, the
order of direct and intake alternating; figures are medians with their spread, and
ratios are taken per repetition (direct time / intake time, so > 1 means the intake
was faster) before the median. Each run also records the CPU time of the intake, its
validation workers and both Orthancs.

``--lever`` adds intake variants run beside the default (other INTAKE_* settings,
e.g. ``EVENT_LOOP=asyncio``, or a stalled forwarder to time acknowledgements alone);
``--profile DIR`` adds untimed runs under py-spy and prints where the intake's time
went. The command exits with status 1 when a target is missed. docs/PERFORMANCE.md
explains the figures and records results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import large_instance, pyspy, support
from bench.support import MB, MIB, Backend, DataSet
from tests.support.intake import IntakeProcess, Site
from tests.support.orthanc import OrthancProcess

PEER_TARGET = 1.0  # peer push through the intake, to "in Orthanc": >= 1.0x direct
UPLOAD_TARGET = 0.9  # concurrent uploads at 4 and 16 clients: >= 0.9x direct
UPLOAD_TARGET_CLIENTS = (4, 16)
DIRECT = "direct"
INTAKE = "intake"


@dataclass(frozen=True)
class Sizes:
    ct: int
    small: int
    large: int
    large_bytes: int
    huge_bytes: int
    reps: int
    clients: tuple[int, ...]


FULL = Sizes(
    ct=400, small=1000, large=3, large_bytes=200 * MB, huge_bytes=1024 * MIB, reps=3,
    clients=(1, 4, 16),
)  # fmt: skip
QUICK = Sizes(
    ct=100, small=200, large=1, large_bytes=64 * MIB, huge_bytes=256 * MIB, reps=1,
    clients=(1, 4, 16),
)  # fmt: skip


@dataclass(frozen=True)
class Variant:
    """How an intake is run: a database backend and INTAKE_* settings on top of defaults.

    ``stalled`` points it at an Orthanc that never answers (support.BlackHole): the
    run measures acknowledgements alone ("done" is then the acknowledgement time).
    """

    backend: str
    settings: tuple[tuple[str, str], ...] = ()
    stalled: bool = False

    @property
    def name(self) -> str:
        extra = [f"{k.removeprefix('INTAKE_')}={v}" for k, v in self.settings]
        extra += ["stalled: ack only"] if self.stalled else []
        return f"{INTAKE} ({', '.join([self.backend, *extra])})"

    def env(self, tmp: Path, black_hole: str) -> dict[str, str]:
        env = {**support.production_env(), **dict(self.settings)}
        if self.stalled:
            env["INTAKE_ORTHANC_URL"] = black_hole
        return env


@dataclass
class Run:
    scenario: str  # "peer" | "upload"
    dataset: str
    clients: int
    variant: str  # "direct" or Variant.name
    rep: int
    count: int
    size: int
    ack: float  # seconds until the sender had every answer
    done: float  # seconds until the private Orthanc held every instance
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per process


@dataclass
class Results:
    machine: dict[str, str] = field(default_factory=dict)
    data: list[dict[str, object]] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)
    large: large_instance.LargeResult | None = None
    seconds: float = 0.0


class Bench:
    """The Orthancs, the data and the runs of one benchmark invocation."""

    def __init__(self, tmp: Path, sizes: Sizes, variants: list[Variant], sets: list[str]) -> None:
        self.tmp = tmp
        self.sizes = sizes
        self.variants = variants
        self.set_names = sets
        self.results = Results()
        self.private = OrthancProcess(tmp / "orthanc-private", name="private")
        self.site = OrthancProcess(tmp / "orthanc-site", name="site")
        self.sets: list[DataSet] = []
        self.black_hole = support.BlackHole()
        self._intakes = 0

    # ---------------------------------------------------------------- set-up

    def generate(self) -> None:
        s = self.sizes
        folder = self.tmp / "data"
        makers = {
            "ct": lambda: support.generate_images(
                folder / "ct", "ct", "CT 512x512x16-bit", count=s.ct, per_study=50,
                side=512, patient_id="BENCH-CT",
            ),
            "small": lambda: support.generate_images(
                folder / "small", "small", "small 120x120x16-bit", count=s.small,
                per_study=100, side=120, patient_id="BENCH-SMALL",
            ),
            "large": lambda: support.generate_multiframes(
                folder / "large", "large", "multi-frame 512x512x16-bit", count=s.large,
                pixel_bytes=s.large_bytes, patient_id="BENCH-LARGE",
            ),
        }  # fmt: skip
        for name in self.set_names:
            began = time.perf_counter()
            data = makers[name]()
            self.sets.append(data)
            print(
                f"generated {data.count} {data.label} instances, {data.size / MB:,.0f} MB, "
                f"in {time.perf_counter() - began:.1f} s",
                flush=True,
            )

    def start(self) -> None:
        self.private.start()
        self.site.peers = {
            DIRECT: {
                "Url": self.private.url + "/",
                "Username": self.private.username,
                "Password": self.private.password,
            }
        }
        self.site.start()
        for data in self.sets:
            began = time.perf_counter()
            support.load_site(self.site, data)
            print(
                f"loaded {data.name} into the site Orthanc ({len(data.studies)} studies) "
                f"in {time.perf_counter() - began:.1f} s",
                flush=True,
            )
            self.results.data.append(
                {
                    "name": data.name,
                    "label": data.label,
                    "count": data.count,
                    "bytes": data.size,
                    "studies": len(data.studies),
                }
            )

    def stop(self) -> None:
        self.site.stop()
        self.private.stop()
        self.black_hole.close()

    # ------------------------------------------------------------------ runs

    @contextlib.contextmanager
    def _intake(self, variant: Variant) -> Iterator[tuple[IntakeProcess, Site]]:
        self._intakes += 1
        workdir = self.tmp / f"intake-{self._intakes:03d}"
        with support.running_intake(
            workdir,
            Backend(variant.backend),
            self.private,
            variant.env(self.tmp, self.black_hole.url),
        ) as (intake, site):
            support.set_peer(self.site, INTAKE, site.peer)
            yield intake, site

    def _timeout(self, data: DataSet) -> float:
        return max(300.0, data.size / MB)  # at least 1 MB/s, or something is wrong

    def _record(self, run: Run) -> None:
        self.results.runs.append(run)
        count, size = run.count, run.size
        per_s, mb_s = support.rate(count, size, run.done)
        ack = "" if run.variant == DIRECT else f"ack {run.ack:6.2f} s, "
        print(
            f"  [{run.rep + 1}] {run.scenario:<6} {run.dataset:<5} x{run.clients:<2} "
            f"{run.variant:<40} {ack}done {run.done:6.2f} s = {per_s:7.1f} inst/s "
            f"{mb_s:6.1f} MB/s",
            flush=True,
        )

    def _direct(
        self, scenario: str, data: DataSet, clients: int, rep: int, send: Callable[[], float]
    ) -> None:
        support.empty_orthanc(self.private)
        meter = support.CpuMeter(
            {"private Orthanc": self.private.pid, "site Orthanc": self.site.pid}
        )
        seconds = send()
        cpu = meter.read()
        stored = support.orthanc_count(self.private)
        if stored != data.count:
            raise RuntimeError(f"the private Orthanc holds {stored} of {data.count} instances")
        run = Run(scenario, data.name, clients, DIRECT, rep, data.count, data.size, seconds,
                  seconds, cpu)  # fmt: skip
        self._record(run)

    def _through_intake(
        self,
        scenario: str,
        data: DataSet,
        clients: int,
        rep: int,
        variant: Variant,
        send: Callable[[IntakeProcess, Site], float],
        profile: Path | None,
    ) -> Run:
        support.empty_orthanc(self.private)
        with self._intake(variant) as (intake, site):
            assert intake.pid is not None
            recording = pyspy.record(intake.pid, profile) if profile else None
            meter = support.CpuMeter(
                {
                    "intake": intake.pid,
                    "private Orthanc": self.private.pid,
                    "site Orthanc": self.site.pid,
                },
                tree=("intake",),
            )
            try:
                began = time.perf_counter()
                ack = send(intake, site)
                done = ack
                if not variant.stalled:
                    done = support.wait_for_count(
                        self.private, data.count, began, self._timeout(data),
                        support.intake_alive(intake),
                    )  # fmt: skip
                cpu = meter.read()
            finally:
                if recording is not None:
                    recording.stop()
        run = Run(scenario, data.name, clients, variant.name, rep, data.count, data.size, ack,
                  done, cpu)  # fmt: skip
        if profile is None:
            self._record(run)
        return run

    def peer_direct(self, data: DataSet, rep: int) -> None:
        self._direct(
            "peer", data, 1, rep, lambda: support.peer_push(self.site, DIRECT, data,
                                                            self._timeout(data))
        )  # fmt: skip

    def peer_intake(
        self, data: DataSet, rep: int, variant: Variant, profile: Path | None = None
    ) -> Run:
        return self._through_intake(
            "peer", data, 1, rep, variant,
            lambda _i, _s: support.peer_push(self.site, INTAKE, data, self._timeout(data)),
            profile,
        )  # fmt: skip

    def upload_direct(self, data: DataSet, clients: int, rep: int) -> None:
        auth = (self.private.username, self.private.password)
        self._direct(
            "upload", data, clients, rep,
            lambda: support.upload_all(self.private.url, auth, data.files, clients),
        )  # fmt: skip

    def upload_intake(
        self, data: DataSet, clients: int, rep: int, variant: Variant,
        profile: Path | None = None,
    ) -> Run:  # fmt: skip
        return self._through_intake(
            "upload", data, clients, rep, variant,
            lambda intake, site: support.upload_all(
                intake.url, (site.name, site.token), data.files, clients
            ),
            profile,
        )  # fmt: skip

    def rep(self, rep: int) -> None:
        """One repetition of scenarios 1-3; odd repetitions run the intake first."""
        for data in self.sets:
            if rep % 2 == 0:
                self.peer_direct(data, rep)
            for variant in self.variants:
                self.peer_intake(data, rep, variant)
            if rep % 2 == 1:
                self.peer_direct(data, rep)
            for clients in self.sizes.clients:
                if rep % 2 == 0:
                    self.upload_direct(data, clients, rep)
                for variant in self.variants:
                    self.upload_intake(data, clients, rep, variant)
                if rep % 2 == 1:
                    self.upload_direct(data, clients, rep)

    def profile(self, folder: Path) -> None:
        """Untimed extra runs under py-spy (GIL samples): the peer push and 16 clients
        on the first data set."""
        data = self.sets[0]
        variant = self.variants[0]
        peer = folder / f"peer-{data.name}.txt"
        peer_run = self.peer_intake(data, 0, variant, peer)
        upload = folder / f"upload16-{data.name}.txt"
        upload_run = self.upload_intake(data, 16, 0, variant, upload)
        for output, run in ((peer, peer_run), (upload, upload_run)):
            summary = pyspy.summarise(output, run.done)
            print(summary, flush=True)
            self.results.profiles.append(summary)


# -------------------------------------------------------------------- report


def _runs(results: Results, scenario: str, dataset: str, clients: int, variant: str) -> list[Run]:
    return [
        r
        for r in results.runs
        if (r.scenario, r.dataset, r.clients, r.variant) == (scenario, dataset, clients, variant)
    ]


def _ratios(
    results: Results, scenario: str, dataset: str, clients: int, variant: str
) -> list[float]:
    """Per repetition: direct time / intake time-to-Orthanc (> 1: the intake was faster)."""
    direct = {r.rep: r.done for r in _runs(results, scenario, dataset, clients, DIRECT)}
    return [
        direct[r.rep] / r.done
        for r in _runs(results, scenario, dataset, clients, variant)
        if r.rep in direct
    ]


def _fmt_rate(runs: list[Run], attribute: str) -> str:
    seconds = [getattr(r, attribute) for r in runs]
    median, low, high = support.median_spread(seconds)
    count, size = runs[0].count, runs[0].size
    per_s, mb_s = support.rate(count, size, median)
    spread = f"{count / high:.1f}-{count / low:.1f}" if len(runs) > 1 else "-"
    return f"{per_s:8.1f} {mb_s:7.1f} {spread:>13}"


def _fmt_ratio(ratios: list[float]) -> str:
    if not ratios:
        return ""
    median, low, high = support.median_spread(ratios)
    spread = f"{low:.2f}-{high:.2f}" if len(ratios) > 1 else "-"
    return f"{median:5.2f} {spread:>11}"


def table(results: Results, scenario: str, variants: list[str], clients: tuple[int, ...]) -> str:
    header = (
        f"{'data':<6} {'N':>3} {'path':<40} {'inst/s':>8} {'MB/s':>7} {'inst/s range':>13}"
        f" | {'acked inst/s':>12} | {'ratio':>5} {'range':>11}"
    )
    lines = [header, "-" * len(header)]
    for data in results.data:
        name = str(data["name"])
        for n in clients:
            for variant in [DIRECT, *variants]:
                runs = _runs(results, scenario, name, n, variant)
                if not runs:
                    continue
                acked = ""
                ratio = ""
                if variant != DIRECT:
                    median_ack = support.median_spread([r.ack for r in runs])[0]
                    acked = f"{runs[0].count / median_ack:12.1f}"
                    ratio = _fmt_ratio(_ratios(results, scenario, name, n, variant))
                lines.append(
                    f"{name:<6} {n:>3} {variant:<40} {_fmt_rate(runs, 'done')} | {acked:>12} "
                    f"| {ratio}"
                )
    return "\n".join(lines)


_CPU_COLUMNS = ("intake", "intake children", "private Orthanc", "site Orthanc")


def cpu_table(
    results: Results, scenario: str, variants: list[str], clients: tuple[int, ...]
) -> str:
    """CPU ms per instance by process (median over repetitions), and in total."""
    header = (
        f"{'data':<6} {'N':>3} {'path':<40} {'intake':>7} {'workers':>8} {'private':>8} "
        f"{'site':>7} {'total':>7}"
    )
    lines = [header, "-" * len(header)]
    for data in results.data:
        name = str(data["name"])
        for n in clients:
            for variant in [DIRECT, *variants]:
                runs = _runs(results, scenario, name, n, variant)
                if not runs:
                    continue
                cells = []
                for column in _CPU_COLUMNS:
                    values = [r.cpu.get(column, 0.0) * 1000 / r.count for r in runs]
                    cells.append(support.median_spread(values)[0])
                total = support.median_spread([sum(r.cpu.values()) * 1000 / r.count for r in runs])[
                    0
                ]
                intake, workers, private, site = (f"{c:.1f}" for c in cells)
                if variant == DIRECT:
                    intake = workers = ""
                if scenario != "peer":
                    site = ""
                lines.append(
                    f"{name:<6} {n:>3} {variant:<40} {intake:>7} {workers:>8} {private:>8} "
                    f"{site:>7} {total:>7.1f}"
                )
    return "\n".join(lines)


def verdicts(results: Results, variants: list[str]) -> list[tuple[bool, str]]:
    out: list[tuple[bool, str]] = []
    for variant in variants:
        for data in results.data:
            name = str(data["name"])
            ratios = _ratios(results, "peer", name, 1, variant)
            if ratios:
                median = support.median_spread(ratios)[0]
                ok = median >= PEER_TARGET
                out.append(
                    (
                        ok,
                        f"peer push {name:<5} {variant}: {median:.2f}x direct "
                        f"(target >= {PEER_TARGET:.1f}x)",
                    )
                )
            for clients in UPLOAD_TARGET_CLIENTS:
                ratios = _ratios(results, "upload", name, clients, variant)
                if ratios:
                    median = support.median_spread(ratios)[0]
                    ok = median >= UPLOAD_TARGET
                    out.append(
                        (
                            ok,
                            f"uploads x{clients:<2} {name:<5} {variant}: {median:.2f}x direct "
                            f"(target >= {UPLOAD_TARGET:.1f}x)",
                        )
                    )
    return out


def report(results: Results, variants: list[str], clients: tuple[int, ...]) -> bool:
    print()
    print("Machine:")
    for key, value in results.machine.items():
        print(f"  {key:<10} {value}")
    print("Data:")
    for data in results.data:
        print(
            f"  {data['name']:<6} {data['count']:>5} x {data['label']}, "
            f"{int(str(data['bytes'])) / MB:,.0f} MB in {data['studies']} studies"
        )
    print()
    print("inst/s and MB/s (MB = 10^6 bytes) are medians over the repetitions, to the moment")
    print("the private Orthanc held every instance; 'range' is the slowest-fastest repetition;")
    print("'acked' is when the sender had its last answer; 'ratio' is direct time / intake time,")
    print("per repetition, median and range (> 1: the intake was faster).")
    print()
    print("1-2. Peer push (site Orthanc /peers/{direct|intake}/store, synchronous)")
    print(table(results, "peer", variants, (1,)))
    print()
    print("3. Concurrent uploads (N httpx clients, POST /instances)")
    print(table(results, "upload", variants, clients))
    print()
    print("CPU ms per instance (user + system, median), per process: the intake's main")
    print("process, its validation workers, the private Orthanc, the site Orthanc (peer push)")
    print()
    print("1-2. Peer push")
    print(cpu_table(results, "peer", variants, (1,)))
    print()
    print("3. Concurrent uploads")
    print(cpu_table(results, "upload", variants, clients))
    print()
    passed = True
    targeted = [v for v in variants if "stalled" not in v]  # ack-only runs are diagnostics
    for ok, line in verdicts(results, targeted):
        passed &= ok
        print(f"{'MET    ' if ok else 'NOT MET'} {line}")
    if results.large is not None:
        print()
        print("4. " + "\n".join(large_instance.report(results.large)))
        passed &= results.large.passed
    print()
    print(f"The run took {results.seconds / 60:.1f} minutes.")
    return passed


# ---------------------------------------------------------------------- main


def _variants(backends: list[str], levers: list[str]) -> list[Variant]:
    """The default intake on each backend; the levers on the first backend only."""
    variants = [Variant(backend) for backend in backends]
    for lever in levers:
        settings: list[tuple[str, str]] = []
        flags: set[str] = set()
        for assignment in lever.split(","):
            key, equals, value = assignment.partition("=")
            key = key.strip().upper()
            if key == "STALLED" and not equals:
                flags.add(key)
                continue
            if not equals:
                raise ValueError(f"a lever is NAME=VALUE or stalled, not {assignment!r}")
            if not key.startswith("INTAKE_"):
                key = "INTAKE_" + key
            settings.append((key, value.strip()))
        variants.append(Variant(backends[0], tuple(settings), "STALLED" in flags))
    return variants


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small counts, one repetition")
    parser.add_argument("--reps", type=int, help="repetitions (full: 3, quick: 1)")
    parser.add_argument(
        "--backend",
        action="append",
        choices=["sqlite", "postgresql"],
        help="intake database(s); repeat for both (default: sqlite)",
    )
    parser.add_argument(
        "--lever",
        action="append",
        default=[],
        metavar="NAME=VALUE[,...]",
        help="an extra intake variant (first backend) with these INTAKE_* settings, e.g. "
        "FORWARD_CONCURRENCY=8 or EVENT_LOOP=asyncio; 'stalled' gives it an Orthanc that "
        "never answers (acknowledgements alone)",
    )
    parser.add_argument(
        "--sets", default="ct,small,large", help="data sets among ct, small, large (default: all)"
    )
    parser.add_argument("--clients", help="client counts for scenario 3 (default: 1,4,16)")
    parser.add_argument(
        "--no-large-instance", action="store_true", help="skip scenario 4 (the 1 GiB instance)"
    )
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="also run py-spy; raw stacks go to DIR"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every run as JSON")
    args = parser.parse_args(argv)
    support.exit_on_sigterm()

    sizes = QUICK if args.quick else FULL
    if args.reps is not None:
        if args.reps < 1:
            parser.error("--reps must be at least 1")
        sizes = Sizes(**{**asdict(sizes), "reps": args.reps})
    if args.clients:
        clients = tuple(int(c) for c in args.clients.split(","))
        sizes = Sizes(**{**asdict(sizes), "clients": clients})
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    if not sets or any(s not in ("ct", "small", "large") for s in sets):
        parser.error("--sets takes ct, small and/or large")
    if args.profile is not None and pyspy.executable() is None:
        parser.error("--profile needs py-spy: .venv/bin/pip install py-spy")
    backends = args.backend or ["sqlite"]
    try:
        variants = _variants(backends, args.lever)
    except ValueError as exc:
        parser.error(str(exc))

    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp_name:
        tmp = Path(tmp_name)
        bench = Bench(tmp, sizes, variants, sets)
        try:
            bench.generate()
            bench.start()
            version = "?"
            with bench.private.client() as http:
                version = str(http.get("/system").json().get("Version", "?"))
            bench.results.machine = support.machine(version, tmp, "postgresql" in backends)
            for rep in range(sizes.reps):
                print(f"repetition {rep + 1} of {sizes.reps}", flush=True)
                bench.rep(rep)
            if args.profile is not None:
                bench.profile(args.profile)
        finally:
            bench.stop()
        if not args.no_large_instance:
            print("large instance", flush=True)
            bench.results.large = large_instance.run(
                tmp,
                Backend(backends[0]),
                pixel_bytes=sizes.huge_bytes,
                reps=max(1, min(sizes.reps, 2)),
            )
    results = bench.results
    results.seconds = time.perf_counter() - began
    results.machine["load"] += f", {support.load_average()} at the end"
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(results), indent=2, default=str))
    passed = report(results, [v.name for v in variants], sizes.clients)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
