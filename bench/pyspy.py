"""py-spy around a running intake: record its stacks, then say where the time went.

py-spy is a developer tool, not a dependency: install it into the virtualenv
(``.venv/bin/pip install py-spy``) to use ``--profile`` of ``bench.throughput``.
It attaches to a pid (ptrace), so it needs root or ``kernel.yama.ptrace_scope=0``.
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_RATE = 200  # samples per second


def executable() -> str | None:
    """py-spy next to this interpreter (the virtualenv), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


@dataclass
class Recording:
    process: subprocess.Popen[bytes]
    output: Path
    log: Path

    def stop(self) -> None:
        """SIGINT makes py-spy write its file; wait for it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def record(pid: int, output: Path) -> Recording:
    """Start sampling ``pid`` and its children (the validation workers) into ``output``.

    Raw (collapsed) stacks without line numbers. Only the thread holding the GIL is
    sampled (``--gil``): the shares are of each interpreter's busy time, the resource
    an asyncio service runs out of first; C code that releases the GIL (fsync,
    SHA-256 of big buffers, socket I/O) is not counted.
    """
    binary = executable()
    if binary is None:
        raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
    output.parent.mkdir(parents=True, exist_ok=True)
    command = [
        binary,
        "record",
        "--pid",
        str(pid),
        "--subprocesses",
        "--nonblocking",
        "--nolineno",
        "--rate",
        str(_RATE),
        "--format",
        "raw",
        "--output",
        str(output),
    ]
    command.append("--gil")
    log = output.with_suffix(".log")
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    return Recording(process, output, log)


# Where a stack's time goes, first match from the leaf up wins. Each entry is a
# label and the substrings of a frame ("function (file)") that put a sample there.
_CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("validation worker: parse header (dicom.read_summary)", ("read_summary",)),
    ("spool: fsync + rename", ("_fsync_file", "_fsync_dir", "fsync")),
    ("spool: sha256 + write of the body", ("_emit", "SpoolFile.write", "write (app/spool")),
    ("database: SQLAlchemy / sqlite3 / psycopg", ("sqlalchemy", "sqlite3", "psycopg")),
    ("forwarder: httpx/httpcore to Orthanc", ("httpcore", "httpx", "_file_chunks")),
    ("receive: uvicorn/starlette request stream", ("httptools_impl", "starlette", "uvicorn")),
    ("logging", ("logging/",)),
    ("asyncio event loop", ("asyncio/",)),
    ("multiprocessing / executor plumbing", ("multiprocessing", "concurrent/futures")),
]


def _category(stack: list[str]) -> str:
    for frame in reversed(stack):
        for label, needles in _CATEGORIES:
            if any(needle in frame for needle in needles):
                return label
    return "other"


# py-spy --subprocesses opens a stack with one frame per process, parent first:
# process PID:"command line" (a command line may itself contain ";").
_PROCESS_FRAME = re.compile(r'process \d+:"[^"]*";?')


def _process_label(stack_text: str) -> tuple[str, str]:
    """The process a raw stack belongs to, and the stack without its process frames."""
    commands = _PROCESS_FRAME.findall(stack_text)
    rest = _PROCESS_FRAME.sub("", stack_text)
    innermost = commands[-1] if commands else ""
    if "multiprocessing" in innermost:
        label = "validation workers (and multiprocessing helpers)"
    elif "app.forwarding.process" in innermost:
        label = "forwarder process"
    elif "app serve" in innermost or not commands:
        label = "intake main process"
    else:
        label = "other processes"
    return label, rest


# Which job of the intake a stack serves, by the first app/ module that shows it.
_JOBS: list[tuple[str, tuple[str, ...]]] = [
    ("forwarding (claim, POST to Orthanc, mark forwarded)", ("(app/forwarding/forwarder.py)",)),
    (
        "receiving (HTTP, auth, spool, validate, persist)",
        (
            "(app/api/",
            "(app/intake/pipeline.py)",
            "(app/intake/spool.py)",
            "(app/access/gate.py)",
            "(app/dicom",
        ),
    ),
]


def _job(stack: list[str]) -> str:
    for label, needles in _JOBS:
        if any(needle in frame for frame in stack for needle in needles):
            return label
    return "neither: event loop, thread hand-offs, other"


def summarise(path: Path, seconds: float | None = None, top: int = 15) -> str:
    """Samples per process, per job, per category (leaf-most match), hottest functions.

    With the run's duration, a --gil recording also says how busy the GIL was.
    """
    per_process: collections.Counter[str] = collections.Counter()
    per_category: collections.Counter[tuple[str, str]] = collections.Counter()
    per_job: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        process, rest = _process_label(stack_text)
        stack = [f for f in rest.split(";") if f and not f.startswith("thread ")]
        total += count
        per_process[process] += count
        per_category[(process, _category(stack))] += count
        if process == "intake main process":
            per_job[_job(stack)] += count
        for frame in set(stack):
            if "(app/" in frame and "(app/cli/main.py)" not in frame and "__main__" not in frame:
                inclusive[frame] += count
        if stack:
            leaf[stack[-1]] += count
    if not total:
        return f"{path}: no samples"
    lines = [f"{path.name}: {total} samples"]
    if seconds:
        main = per_process["intake main process"]
        lines[0] += (
            f" in {seconds:.1f} s; intake main process: {main / _RATE:.1f} s of samples = "
            f"{100 * main / _RATE / seconds:.0f} % of the run"
        )
    lines.append("  intake main process, by job:")
    for label, n in per_job.most_common():
        lines.append(f"    {100 * n / total:5.1f} %  {label}")
    lines.append("  by process and by what the leaf-most frame is doing:")
    for process, count in per_process.most_common():
        lines.append(f"  {process}: {100 * count / total:.1f} %")
        for (owner, label), n in per_category.most_common():
            if owner == process:
                lines.append(f"    {100 * n / total:5.1f} %  {label}")
    lines.append("  app functions, inclusive:")
    for frame, count in inclusive.most_common(top):
        lines.append(f"    {100 * count / total:5.1f} %  {frame}")
    lines.append("  hottest functions, self:")
    for frame, count in leaf.most_common(top // 2):
        lines.append(f"    {100 * count / total:5.1f} %  {frame}")
    return "\n".join(lines)
