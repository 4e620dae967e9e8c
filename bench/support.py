"""Shared pieces of the throughput benchmarks: data, processes, clocks, the machine.

The processes are the test harnesses (``tests.support``): real Debian Orthancs and
real ``python -m app serve`` intakes on loopback. Nothing here changes them; the
intake is started with the service's production defaults (the harness's test-speed
overrides are put back), plus whatever a benchmark variant asks for.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import queue
import random
import signal
import socket
import sqlite3
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    generate_uid,
)

from app.settings import Settings
from tests.support import postgres
from tests.support.intake import IntakeProcess, Site, current_rss, peak_rss
from tests.support.orthanc import OrthancProcess
from tests.support.studies import make_study

MB = 1_000_000  # figures are in MB = 10^6 bytes
MIB = 1024 * 1024
_POLL_SECONDS = 0.05
_STREAM_CHUNK = MIB
_IN_MEMORY_MAX = 16 * MIB  # bigger files are streamed from disk by the clients
_PIXEL_DATA_HEADER = b"\xe0\x7f\x10\x00OW\x00\x00"  # (7FE0,0010) OW, Explicit VR LE
_FRAME_SIDE = 512

# The harness speeds the intake up for tests; a benchmark runs it as shipped.
_HARNESS_OVERRIDES = (
    "validation_workers",
    "log_level",
    "forward_retry_base_seconds",
    "forward_retry_max_seconds",
    "forward_poll_seconds",
    "spool_min_free_bytes",
)


def production_env() -> dict[str, str]:
    """INTAKE_* values that undo the harness's test-speed settings (Settings defaults)."""
    return {
        f"INTAKE_{name.upper()}": str(Settings.model_fields[name].default)
        for name in _HARNESS_OVERRIDES
    }


def exit_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C, so the ``finally`` blocks stop every Orthanc and
    intake this benchmark started (the intakes would otherwise outlive it)."""

    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, leave)


# --------------------------------------------------------------------------- data


@dataclass
class DataSet:
    """Files of one kind, written once; ``studies`` are their Orthanc IDs on the site."""

    name: str
    label: str
    files: list[Path]
    size: int  # bytes, all files
    studies: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.files)


def _write_study_files(
    folder: Path, prefix: str, files: list[bytes], start: int
) -> tuple[list[Path], int]:
    paths: list[Path] = []
    total = 0
    for offset, data in enumerate(files):
        path = folder / f"{prefix}-{start + offset:05d}.dcm"
        path.write_bytes(data)
        paths.append(path)
        total += len(data)
    return paths, total


def generate_images(
    folder: Path,
    name: str,
    label: str,
    *,
    count: int,
    per_study: int,
    side: int,
    patient_id: str,
) -> DataSet:
    """``count`` CT instances of ``side``x``side``x16-bit, ``per_study`` to a study, two
    series per study (tests.support.studies.make_study: random pixels, fresh UIDs)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    total = 0
    remaining = count
    while remaining:
        in_study = min(per_study, remaining)
        series = 2 if in_study >= 2 and in_study % 2 == 0 else 1
        files = make_study(
            n_series=series,
            per_series=in_study // series,
            rows=side,
            cols=side,
            patient_id=patient_id,
            seed=len(paths),
        )
        written, size = _write_study_files(folder, name, files, len(paths))
        paths += written
        total += size
        remaining -= in_study
    return DataSet(name, label, paths, total)


def _multiframe_header(frames: int, patient_id: str, study_uid: str, series_uid: str) -> bytes:
    """Part 10 header of a multi-frame 16-bit secondary capture, up to Pixel Data."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SOPClassUID = MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.Manufacturer = "Orthanc Intake benchmark"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Generated multi-frame study"
    ds.SeriesDescription = "Generated multi-frame series"
    ds.PatientName = "Bench^Intake"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.Rows = _FRAME_SIDE
    ds.Columns = _FRAME_SIDE
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.preamble = bytes(128)
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def write_multiframe(
    path: Path,
    pixel_bytes: int,
    *,
    patient_id: str,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> int:
    """Write a multi-frame 512x512x16-bit instance of about ``pixel_bytes`` of pixels.

    Streamed: the Part 10 header, then Pixel Data frame by frame from one random 4 MiB
    block, so memory stays flat whatever the size. Returns the file's size.
    """
    frame = _FRAME_SIDE * _FRAME_SIDE * 2
    frames = max(1, pixel_bytes // frame)
    length = frames * frame
    if length >= 2**32:
        raise ValueError("Pixel Data of 4 GiB or more does not fit a 32-bit length")
    header = _multiframe_header(
        frames, patient_id, study_uid or generate_uid(), series_uid or generate_uid()
    )
    block = random.Random(frames).randbytes(4 * MIB)  # noqa: S311 - pixels, not secrets
    with path.open("wb") as out:
        out.write(header)
        out.write(_PIXEL_DATA_HEADER + length.to_bytes(4, "little"))
        left = length
        while left:
            piece = block[: min(left, len(block))]
            out.write(piece)
            left -= len(piece)
    return path.stat().st_size


def generate_multiframes(
    folder: Path, name: str, label: str, *, count: int, pixel_bytes: int, patient_id: str
) -> DataSet:
    """``count`` multi-frame instances in one study and series."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    paths: list[Path] = []
    total = 0
    for index in range(count):
        path = folder / f"{name}-{index:05d}.dcm"
        total += write_multiframe(
            path, pixel_bytes, patient_id=patient_id, study_uid=study_uid, series_uid=series_uid
        )
        paths.append(path)
    return DataSet(name, label, paths, total)


# ------------------------------------------------------------------------ uploads


def file_body(path: Path) -> tuple[bytes | Iterator[bytes], dict[str, str]]:
    """A request body for ``path``: bytes when small, else streamed with Content-Length."""
    size = path.stat().st_size
    headers = {"Content-Type": "application/dicom"}
    if size <= _IN_MEMORY_MAX:
        return path.read_bytes(), headers

    def chunks() -> Iterator[bytes]:
        with path.open("rb") as file:
            while chunk := file.read(_STREAM_CHUNK):
                yield chunk

    headers["Content-Length"] = str(size)
    return chunks(), headers


def upload_all(
    url: str, auth: tuple[str, str], files: list[Path], clients: int, timeout: float = 600
) -> float:
    """POST every file to ``url``/instances from ``clients`` threads sharing one queue.

    Each client keeps one keep-alive connection, as a script with an httpx.Client does.
    Every answer must be 200 with Status Success. Returns the wall time in seconds.
    """
    work: queue.SimpleQueue[Path] = queue.SimpleQueue()
    for path in files:
        work.put(path)
    errors: list[str] = []
    start = threading.Barrier(clients + 1)

    def client() -> None:
        with httpx.Client(base_url=url, auth=auth, timeout=timeout) as http:
            start.wait()
            while not errors:
                try:
                    path = work.get_nowait()
                except queue.Empty:
                    return
                try:
                    content, headers = file_body(path)
                    answer = http.post("/instances", content=content, headers=headers)
                    status = answer.json().get("Status") if answer.status_code == 200 else None
                except Exception as exc:  # any failure is reported by the caller
                    errors.append(f"{path.name}: {type(exc).__name__}: {exc}")
                    return
                if status != "Success":
                    errors.append(f"{path.name}: HTTP {answer.status_code} {answer.text[:300]}")
                    return

    threads = [threading.Thread(target=client, name=f"client-{i}") for i in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise RuntimeError(f"{len(errors)} upload(s) failed, first: {errors[0]}")
    return elapsed


# ------------------------------------------------------------------------ Orthanc


def orthanc_count(orthanc: OrthancProcess, http: httpx.Client | None = None) -> int:
    """Instances stored in ``orthanc`` (GET /statistics)."""
    if http is None:
        with orthanc.client() as own:
            return orthanc_count(orthanc, own)
    answer = http.get("/statistics")
    answer.raise_for_status()
    return int(answer.json()["CountInstances"])


def wait_for_count(
    orthanc: OrthancProcess,
    expected: int,
    began: float,
    timeout: float,
    alive: Callable[[], None] = lambda: None,
) -> float:
    """Poll until ``orthanc`` holds ``expected`` instances; seconds since ``began``.

    ``alive`` is called on each poll and raises when a process it watches has died.
    """
    deadline = time.perf_counter() + timeout
    with orthanc.client() as http:
        while True:
            if orthanc_count(orthanc, http) >= expected:
                return time.perf_counter() - began
            if time.perf_counter() > deadline:
                count = orthanc_count(orthanc, http)
                raise TimeoutError(f"Orthanc holds {count}/{expected} after {timeout:.0f} s")
            alive()
            time.sleep(_POLL_SECONDS)


def empty_orthanc(orthanc: OrthancProcess) -> None:
    """Delete every patient, so the next run stores everything afresh (no AlreadyStored)."""
    with orthanc.client(timeout=600) as http:
        for patient in http.get("/patients").json():
            http.delete(f"/patients/{patient}").raise_for_status()
        count = orthanc_count(orthanc, http)
    if count:
        raise RuntimeError(f"Orthanc {orthanc.name!r} still holds {count} instances")


def load_site(site: OrthancProcess, data: DataSet, clients: int = 4) -> None:
    """Store ``data`` in the site Orthanc (untimed set-up) and note its study IDs."""
    studies: set[str] = set()
    errors: list[str] = []
    lock = threading.Lock()
    work: queue.SimpleQueue[Path] = queue.SimpleQueue()
    for path in data.files:
        work.put(path)

    def client() -> None:
        with site.client(timeout=600) as http:
            while not errors:
                try:
                    path = work.get_nowait()
                except queue.Empty:
                    return
                try:
                    content, headers = file_body(path)
                    answer = http.post("/instances", content=content, headers=headers)
                    answer.raise_for_status()
                    study = str(answer.json()["ParentStudy"])
                except Exception as exc:  # any failure is reported by the caller
                    errors.append(f"{path.name}: {type(exc).__name__}: {exc}")
                    return
                with lock:
                    studies.add(study)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"loading the site Orthanc failed: {errors[0]}")
    data.studies = sorted(studies)


def peer_push(site: OrthancProcess, peer: str, data: DataSet, timeout: float) -> float:
    """A synchronous store job of ``data``'s studies to ``peer``; its wall time."""
    began = time.perf_counter()
    answer = site.push_to_peer(peer, data.studies, timeout=timeout)
    elapsed = time.perf_counter() - began
    body: dict[str, Any] = answer.json() if answer.status_code == 200 else {}
    if body.get("FailedInstancesCount") != 0 or body.get("InstancesCount") != data.count:
        raise RuntimeError(f"peer push to {peer} failed: HTTP {answer.status_code} {answer.text}")
    return elapsed


def set_peer(site: OrthancProcess, name: str, peer: Mapping[str, Any]) -> None:
    """Point the site Orthanc's peer ``name`` somewhere else (PUT /peers/{name})."""
    with site.client() as http:
        http.put(f"/peers/{name}", json=dict(peer)).raise_for_status()


# ------------------------------------------------------------------------- intake


@dataclass
class Backend:
    """Where the intake keeps its database: a fresh one per intake process."""

    name: str  # "sqlite" | "postgresql"

    def create(self, workdir: Path) -> str:
        if self.name == "sqlite":
            return f"sqlite:///{workdir / 'intake.db'}"
        return postgres.create_database()

    def drop(self, url: str) -> None:
        if self.name == "postgresql":
            postgres.drop_database(url)


@contextlib.contextmanager
def running_intake(
    workdir: Path,
    backend: Backend,
    orthanc: OrthancProcess,
    env: Mapping[str, str],
    site_name: str = "bench-site",
) -> Iterator[tuple[IntakeProcess, Site]]:
    """A fresh intake (new database, new spool) with one site; stopped and dropped after.

    A fresh database per run matters: the intake remembers every SOP Instance UID it
    took, so a second push of the same files would be answered as duplicates.
    """
    workdir.mkdir(parents=True)
    url = backend.create(workdir)
    intake = IntakeProcess(workdir, url, orthanc=orthanc, env_extra=dict(env))
    try:
        intake.start()
        site = intake.add_site(site_name)
        yield intake, site
    finally:
        intake.stop()
        backend.drop(url)


class BlackHole:
    """A loopback port that takes connections and never answers: an Orthanc that hangs.

    An intake pointed at it acknowledges uploads as usual while its forwarder workers
    sit on their first request (until ORTHANC_TIMEOUT_SECONDS), so a run measures the
    receive path alone.
    """

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(128)
        self.port: int = self._socket.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._socket.close()


def intake_alive(intake: IntakeProcess) -> Callable[[], None]:
    def check() -> None:
        if intake.returncode is not None:
            raise RuntimeError(f"the intake exited {intake.returncode}:\n{intake.log_tail()}")

    return check


# ----------------------------------------------------------------------- memory


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (its validation workers and their helpers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a live process has used so far (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used by some processes between ``start`` and ``read``.

    Each entry is a pid; with ``tree`` its live descendants are counted too (under
    the name + " children"), e.g. the intake's validation workers.
    """

    def __init__(self, pids: Mapping[str, int | None], tree: tuple[str, ...] = ()) -> None:
        self._pids = {name: pid for name, pid in pids.items() if pid is not None}
        self._tree = tree
        self._start = self._now()

    def _now(self) -> dict[str, float]:
        now: dict[str, float] = {}
        for name, pid in self._pids.items():
            now[name] = cpu_seconds(pid)
            if name in self._tree:
                now[f"{name} children"] = sum(cpu_seconds(c) for c in descendants(pid))
        return now

    def read(self) -> dict[str, float]:
        now = self._now()
        return {name: round(now[name] - self._start.get(name, 0.0), 3) for name in now}


def own_peak_rss() -> int:
    return peak_rss(os.getpid())


class RssSampler:
    """Samples the summed VmRSS of a process tree every ``interval`` s in a thread."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self._pid = pid
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.peak_total = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = [self._pid, *descendants(self._pid)]
            self.peak_total = max(self.peak_total, sum(current_rss(p) for p in pids))
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------ figures


def median_spread(values: list[float]) -> tuple[float, float, float]:
    """Median, minimum and maximum."""
    return statistics.median(values), min(values), max(values)


def rate(count: int, size: int, seconds: float) -> tuple[float, float]:
    """Instances per second and MB per second."""
    return count / seconds, size / MB / seconds


# ------------------------------------------------------------------------ machine


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _ram_bytes() -> int:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def _disk(folder: Path) -> str:
    """Filesystem and device under ``folder``, and whether the kernel calls it rotational."""
    best = ("", "", "")
    for line in _read("/proc/mounts").splitlines():
        device, mount, fstype = line.split()[:3]
        if str(folder.resolve()).startswith(mount) and len(mount) >= len(best[1]):
            best = (device, mount, fstype)
    device, _, fstype = best
    kind = ""
    name = Path(device).name
    rotational = _read(f"/sys/block/{name}/queue/rotational").strip()
    if rotational:
        kind = ", rotational" if rotational == "1" else ", non-rotational"
    virtual = " (virtio)" if name.startswith("vd") else ""
    return f"{fstype} on {device}{virtual}{kind}"


def fsync_ms(folder: Path, size: int = 512 * 1024, rounds: int = 20) -> float:
    """Median ms to write ``size`` bytes, fsync the file and fsync its folder."""
    data = os.urandom(size)
    times: list[float] = []
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(rounds):
        path = folder / f"fsync-probe-{index}"
        began = time.perf_counter()
        with path.open("wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        times.append((time.perf_counter() - began) * 1000)
        path.unlink()
    return statistics.median(times)


def _postgres_version() -> str:
    with contextlib.suppress(Exception):
        done = subprocess.run(
            ["psql", "--version"], capture_output=True, text=True, timeout=10, check=False
        )
        if done.returncode == 0:
            return done.stdout.strip()
    return "unknown"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: how busy the shared machine was."""
    return " ".join(_read("/proc/loadavg").split()[:3])


def _commit() -> str:
    """The checkout's commit, and whether app/ differs from it (what was measured)."""
    with contextlib.suppress(Exception):
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "app", "alembic"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        return head + (" with uncommitted changes in app/ or alembic/" if dirty else "")
    return "unknown"


def machine(orthanc_version: str, folder: Path, with_postgres: bool) -> dict[str, str]:
    ram = _ram_bytes() / 1024**3
    info = {
        "cpu": f"{_cpu_model()}, {os.cpu_count()} CPUs",
        "ram": f"{ram:.1f} GiB",
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}",
        "orthanc": f"Orthanc {orthanc_version} (Debian package)",
        "disk": _disk(folder),
        "fsync": f"{fsync_ms(folder / 'probe'):.1f} ms to write+fsync 512 KiB and its folder",
        "load": f"load average {load_average()} at start",
        "commit": _commit(),
    }
    if with_postgres:
        info["postgresql"] = _postgres_version() + " (client), server on loopback"
    return info
