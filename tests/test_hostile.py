"""Hostile and malformed input through the real intake to the real private Orthanc.

Every case of the generated corpus (``tests/support/hostile.py``) is sent to one intake
process (SQLite, one validation worker, ``MAX_INSTANCE_BYTES`` 32 MiB and
``MAX_REQUEST_BYTES`` 64 MiB so that bombs reach their caps quickly; every other limit
at its default). For each case:

- the documented status, Orthanc's error shape, and the refusal counted under the
  documented machine reason (``intake_uploads_total`` on ``/metrics``); for a ZIP or
  STOW-RS body, each file's own answer;
- nothing left behind in the spool's ``tmp/``;
- no crash: the process is alive and ``/healthz`` answers;
- other uploads keep flowing: a good instance sent right after is taken and reaches
  the private Orthanc;
- memory: the high-water marks of the intake and of its validation worker are reset
  before the case (``/proc/<pid>/clear_refs``), so each figure is that case's own:
  the intake's peak RSS grows by less than ``INTAKE_GROWTH_BOUND`` and the worker's peak
  RSS stays under ``WORKER_PEAK_BOUND``.

Slow clients (headers or bodies trickled) are covered by ``tests/test_slow_clients.py``.
With ``INTAKE_HOSTILE_REPORT=<file>`` the measured figures are written there as JSON
(docs/RELIABILITY.md, "Hostile and malformed input", is made from them).
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.archives import make_zip
from tests.support.hostile import (
    CASES,
    FORM,
    MIB,
    Case,
    Memory,
    Probe,
    form,
    good_instance,
    measure,
    raw_exchange,
    rejections,
    worker_pids,
    zip_many_entries,
)
from tests.support.intake import IntakeProcess, Site, wait_until
from tests.support.orthanc import OrthancProcess
from tests.support.studies import make_study

INTAKE_GROWTH_BOUND = 64 * MIB
WORKER_PEAK_BOUND = 96 * MIB
_REPORT: list[dict[str, Any]] = []


@pytest.fixture(scope="module")
def hostile_intake(
    tmp_path_factory: pytest.TempPathFactory, private_orthanc: OrthancProcess
) -> Iterator[IntakeProcess]:
    workdir = tmp_path_factory.mktemp("hostile-intake")
    process = IntakeProcess(
        workdir / "intake",
        f"sqlite:///{workdir / 'intake.db'}",
        orthanc=private_orthanc,
        env_extra={
            "INTAKE_MAX_INSTANCE_BYTES": str(32 * MIB),
            "INTAKE_MAX_REQUEST_BYTES": str(64 * MIB),
            "INTAKE_LOG_LEVEL": "INFO",
        },
    )
    process.start()
    yield process
    process.kill()
    path = os.environ.get("INTAKE_HOSTILE_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(_REPORT, f, indent=1)


@pytest.fixture(scope="module")
def hostile_site(hostile_intake: IntakeProcess) -> Site:
    return hostile_intake.add_site("hostile")


def _authorization(site: Site) -> str:
    return "Basic " + base64.b64encode(f"{site.name}:{site.token}".encode()).decode()


def _pid(intake: IntakeProcess) -> int:
    assert intake.pid is not None, "the intake is not running"
    return intake.pid


def _send(intake: IntakeProcess, site: Site, probe: Probe) -> tuple[int, bytes]:
    if probe.raw is not None:
        return raw_exchange(intake.public_port, probe.raw)
    with httpx.Client(base_url=intake.url, auth=(site.name, site.token), timeout=120) as client:
        response = client.post(probe.path, content=probe.body, headers=probe.headers)
    return response.status_code, response.content


def _in_orthanc(orthanc: OrthancProcess, instance: str) -> bool:
    with orthanc.client(timeout=10) as client:
        return client.get(f"/instances/{instance}").status_code == 200


def _orthanc_count(orthanc: OrthancProcess) -> int:
    with orthanc.client(timeout=30) as client:
        return int(client.get("/statistics").json()["CountInstances"])


def _still_serving(
    intake: IntakeProcess, site: Site, orthanc: OrthancProcess, before: int | None = None
) -> None:
    """Alive, answering, and a good upload right after is taken and reaches Orthanc;
    with ``before``, Orthanc then holds exactly one more instance than that."""
    assert intake.returncode is None, intake.log_tail()
    assert httpx.get(f"{intake.admin_url}/healthz", timeout=30).status_code == 200
    answer = intake.upload(site, good_instance())
    assert answer.status_code == 200, answer.text
    assert answer.json()["Status"] == "Success"
    instance = answer.json()["ID"]
    wait_until(lambda: _in_orthanc(orthanc, instance), timeout=60, interval=0.1)
    if before is not None:
        wait_until(lambda: _orthanc_count(orthanc) >= before + 1, timeout=60, interval=0.1)
        assert _orthanc_count(orthanc) == before + 1


def _nothing_left_in_tmp(intake: IntakeProcess) -> None:
    # A refused upload's partial file goes as it is refused; allow the event loop a moment.
    wait_until(lambda: not list((intake.spool / "tmp").iterdir()), timeout=10, interval=0.1)


def _items(content: bytes, path: str) -> tuple[str, ...]:
    """Per-file outcomes of a ZIP (JSON array) or STOW-RS (DICOM JSON) answer."""
    answer = json.loads(content)
    if path.startswith("/dicom-web"):
        failed = answer.get("00081198", {}).get("Value", [])
        referenced = answer.get("00081199", {}).get("Value", [])
        reasons = tuple(f"0x{f['00081197']['Value'][0]:04X}" for f in failed)
        return reasons + ("Success",) * len(referenced)
    return tuple(a["Status"] if a["Status"] != "Failure" else a["IntakeReason"] for a in answer)


def _check_error_shape(status: int, content: bytes, path: str, details: str) -> None:
    body = json.loads(content)
    assert body["HttpStatus"] == status
    assert body["Method"] == "POST"
    assert body["Uri"] == path
    assert {"HttpError", "Message", "OrthancError", "OrthancStatus"} <= set(body)
    assert details in body.get("Details", ""), body


def _record(case_id: str, what: str, outcome: str, memory: Memory, seconds: float) -> None:
    _REPORT.append(
        {
            "case": case_id,
            "what": what,
            "outcome": outcome,
            "intake_growth_mib": round(memory.intake_growth / MIB, 1),
            "worker_peak_mib": round(memory.worker_peak / MIB, 1),
            "worker_growth_mib": round(memory.worker_growth / MIB, 1),
            "reset": memory.reset,
            "seconds": round(seconds, 2),
        }
    )


def _within_bounds(memory: Memory) -> None:
    assert memory.intake_growth < INTAKE_GROWTH_BOUND, f"intake grew {memory.intake_growth}"
    assert memory.worker_peak < WORKER_PEAK_BOUND, f"worker peaked at {memory.worker_peak}"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_hostile_input_is_refused_as_documented_and_costs_nothing_else(
    hostile_intake: IntakeProcess,
    hostile_site: Site,
    private_orthanc: OrthancProcess,
    case: Case,
) -> None:
    probe = case.build(_authorization(hostile_site))
    expect = case.expect
    counted = rejections(hostile_intake.admin_url, hostile_site.name)
    in_orthanc = _orthanc_count(private_orthanc)
    started = time.monotonic()
    with measure(_pid(hostile_intake)) as memory:
        status, content = _send(hostile_intake, hostile_site, probe)
    seconds = time.monotonic() - started
    delta = rejections(hostile_intake.admin_url, hostile_site.name) - counted

    assert status == expect.status, content[:2000]
    if expect.items is not None:
        assert _items(content, probe.path) == expect.items
        outcome = f"{status}: " + ", ".join(expect.items)
    else:
        if probe.raw is None or expect.reason is not None:
            _check_error_shape(status, content, probe.path, expect.details)
        outcome = f"{status} {expect.reason or '(not counted)'}"
    if expect.reason is not None:
        assert dict(delta) == {expect.reason: 1}
    elif expect.items is not None:
        assert delta == Counter(expect.counted)
    else:
        assert not delta
    _nothing_left_in_tmp(hostile_intake)
    # What the case itself got stored (a good file beside hostile ones) reaches Orthanc
    # too; nothing else of it does.
    taken = (expect.items or ()).count("Success")
    wait_until(lambda: _orthanc_count(private_orthanc) >= in_orthanc + taken, timeout=60)
    _still_serving(hostile_intake, hostile_site, private_orthanc, in_orthanc + taken)
    _record(case.id, case.what, outcome, memory, seconds)
    _within_bounds(memory)


def test_executable_preambles_are_kept_as_evidence(hostile_intake: IntakeProcess) -> None:
    """The PE, ELF and #! cases above each left their file, as sent, under refused/."""
    kept = {p.read_bytes()[:4] for p in (hostile_intake.spool / "refused").iterdir()}
    assert {b"MZ\x90\x00", b"\x7fELF", b"#!/b"} <= kept


# --- oversized and numerous request headers ------------------------------------------------


def _header_request(site: Site, extra: bytes) -> bytes:
    return (
        b"POST /instances HTTP/1.1\r\nHost: intake\r\nAuthorization: "
        + _authorization(site).encode()
        + b"\r\nContent-Length: 0\r\n"
        + extra
        + b"\r\n"
    )


HEADER_CASES = {
    "header-line-100k": ("a 100 KB header line", b"X-Padding: " + b"a" * 100_000 + b"\r\n"),
    "header-line-8m": ("an 8 MiB header line", b"X-Padding: " + b"a" * (8 * MIB) + b"\r\n"),
    "headers-10000": ("10,000 header lines", b"".join(b"X-H%d: v\r\n" % n for n in range(10_000))),
    "headers-101": ("101 header lines", b"".join(b"X-H%d: v\r\n" % n for n in range(98))),
    "headers-65k": (
        "many lines just over 64 KiB in all",
        b"".join(b"X-H%d: %s\r\n" % (n, b"v" * 700) for n in range(94)),
    ),
}


@pytest.mark.parametrize("name", list(HEADER_CASES))
def test_oversized_headers_are_refused_with_431_at_little_cost(
    hostile_intake: IntakeProcess,
    hostile_site: Site,
    private_orthanc: OrthancProcess,
    name: str,
) -> None:
    """A head over 64 KiB or 100 lines (the defaults) gets 431 in Orthanc's error shape,
    the connection closes, memory stays within the cap plus a read, and uploads flow."""
    what, extra = HEADER_CASES[name]
    started = time.monotonic()
    with measure(_pid(hostile_intake)) as memory:
        status, content = raw_exchange(
            hostile_intake.public_port, _header_request(hostile_site, extra)
        )
    seconds = time.monotonic() - started
    assert status == 431, (status, content[:500])
    _check_error_shape(431, content, "/instances", "INTAKE_MAX_HEADER_BYTES")
    assert memory.intake_growth < 4 * MIB, f"grew {memory.intake_growth}"
    _still_serving(hostile_intake, hostile_site, private_orthanc)
    _record(name, what, "431 headers_too_large", memory, seconds)


def test_a_head_just_under_the_caps_is_served(
    hostile_intake: IntakeProcess, hostile_site: Site
) -> None:
    """100 header lines and a head of nearly 64 KiB are within the caps: not refused."""
    base = _header_request(hostile_site, b"")
    lines = 100 - base.count(b"\r\n") + 2  # the request line and the blank line are not headers
    pad = (64 * 1024 - len(base) - lines * 16) // lines
    extra = b"".join(b"X-H%03d: %s\r\n" % (n, b"v" * pad) for n in range(lines))
    request = _header_request(hostile_site, extra)
    assert request.count(b"\r\n") - 2 == 100
    status, content = raw_exchange(hostile_intake.public_port, request)
    assert status == 400, content[:500]  # got to the app: an empty body is not an instance
    assert json.loads(content)["Message"] != "Request header fields too large"


def test_an_overlong_request_target_gets_414(
    hostile_intake: IntakeProcess, hostile_site: Site, private_orthanc: OrthancProcess
) -> None:
    target = b"/instances?" + b"a" * (200 * 1024)
    with measure(_pid(hostile_intake)) as memory:
        status, content = raw_exchange(
            hostile_intake.public_port,
            b"GET " + target + b" HTTP/1.1\r\nHost: intake\r\n\r\n",
        )
    assert status == 414, (status, content[:500])
    body = json.loads(content)
    assert (body["HttpStatus"], body["Method"], body["Uri"]) == (414, "GET", "/instances")
    assert memory.intake_growth < 4 * MIB
    _still_serving(hostile_intake, hostile_site, private_orthanc)


def test_the_admin_listener_refuses_big_heads_in_its_own_shape(
    hostile_intake: IntakeProcess,
) -> None:
    status, content = raw_exchange(
        hostile_intake.admin_port,
        b"GET /sites HTTP/1.1\r\nHost: admin\r\n" + HEADER_CASES["headers-10000"][1] + b"\r\n",
    )
    assert status == 431
    assert json.loads(content)["error"] == "headers_too_large"


# --- many connections ----------------------------------------------------------------------


def test_200_connections_held_open_while_real_uploads_flow(
    hostile_intake: IntakeProcess, hostile_site: Site, private_orthanc: OrthancProcess
) -> None:
    """200 sockets held open (idle, half a request line, headers then part of a body,
    and finished keep-alive requests) while 10 real uploads go through and reach Orthanc.
    Each from a loopback address of its own: one address may hold 32 (test_connections)."""
    port = hostile_intake.public_port
    auth = _authorization(hostile_site).encode()
    partial_body = (
        b"POST /instances HTTP/1.1\r\nHost: intake\r\nAuthorization: "
        + auth
        + b"\r\nContent-Length: 1048576\r\n\r\n"
        + bytes(4096)
    )
    held: list[socket.socket] = []
    started = time.monotonic()
    try:
        with measure(_pid(hostile_intake)) as memory:
            for n in range(200):
                source = (f"127.0.{100 + n // 200}.{n % 200 + 1}", 0)
                sock = socket.create_connection(
                    ("127.0.0.1", port), timeout=30, source_address=source
                )
                held.append(sock)
                kind = n % 4
                if kind == 1:
                    sock.sendall(b"POST /instances HTTP/1.1\r\nHost: in")
                elif kind == 2:
                    sock.sendall(partial_body)
                elif kind == 3:
                    sock.sendall(b"GET /system HTTP/1.1\r\nHost: intake\r\nAuthorization: ")
                    sock.sendall(auth + b"\r\n\r\n")
                    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            files = [good_instance() for _ in range(10)]

            def upload(data: bytes) -> httpx.Response:
                return hostile_intake.upload(hostile_site, data)

            with concurrent.futures.ThreadPoolExecutor(5) as pool:
                answers = list(pool.map(upload, files))
            seconds = time.monotonic() - started
            alive = sum(_open(sock) for sock in held)
        assert [a.status_code for a in answers] == [200] * 10, [a.text for a in answers]
        assert alive == 200, f"only {alive} of the 200 connections were still open"
    finally:
        for sock in held:
            sock.close()
    ids = [a.json()["ID"] for a in answers]
    wait_until(lambda: all(_in_orthanc(private_orthanc, i) for i in ids), timeout=60)
    _nothing_left_in_tmp(hostile_intake)  # the 50 abandoned partial bodies are gone
    _still_serving(hostile_intake, hostile_site, private_orthanc)
    _record(
        "connections-200",
        "200 connections held open + 10 uploads",
        "10/10 uploads 200 while all 200 were open",
        memory,
        seconds,
    )
    _within_bounds(memory)


def _open(sock: socket.socket) -> bool:
    """The server has not closed this connection (nothing to read, no EOF)."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


# --- archives: what a request may cost ------------------------------------------------------


def test_a_zip_of_1000_non_dicom_entries_does_not_stop_other_uploads(
    hostile_intake: IntakeProcess, hostile_site: Site, private_orthanc: OrthancProcess
) -> None:
    """Orthanc skips such entries; the intake records each as a `rejected` row (one
    committed transaction per entry). Meanwhile other uploads are still taken."""
    archive = zip_many_entries(1000)
    with (
        measure(_pid(hostile_intake)) as memory,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        offset = hostile_intake.log_path.stat().st_size
        started = time.monotonic()
        sent = pool.submit(hostile_intake.upload, hostile_site, archive, timeout=300)
        # Under way: the intake has begun skipping the archive's entries (one log line each).
        wait_until(lambda: _skipped_an_entry(hostile_intake, offset), timeout=60, interval=0.02)
        during = [hostile_intake.upload(hostile_site, good_instance()) for _ in range(3)]
        latency = time.monotonic() - started
        zip_unanswered = not sent.done()  # the three were not queued behind the archive
        answer = sent.result(timeout=300)
        seconds = time.monotonic() - started
    assert answer.status_code == 200
    assert answer.json() == []
    assert [a.status_code for a in during] == [200] * 3
    assert zip_unanswered, f"the ZIP was answered before the 3 uploads ({latency:.1f} s)"
    _still_serving(hostile_intake, hostile_site, private_orthanc)
    _record(
        "zip-1000-skipped",
        "ZIP of 1,000 non-DICOM entries (93 KB)",
        f"200 [] after {seconds:.1f} s; 3 uploads meanwhile 200 in {latency:.1f} s",
        memory,
        seconds,
    )
    _within_bounds(memory)


def _skipped_an_entry(intake: IntakeProcess, offset: int) -> bool:
    """Since ``offset`` in its log, the intake skipped the first entry of ``zip_many_entries``."""
    with intake.log_path.open("rb") as log:
        log.seek(offset)
        return b"skipped: entry '0.txt' is not a DICOM file" in log.read()


def test_refused_archive_entries_are_counted_in_the_metrics(
    hostile_intake: IntakeProcess, hostile_site: Site
) -> None:
    archive = make_zip(
        [("inner.zip", make_zip([("x.dcm", good_instance())])), ("ok.dcm", good_instance())]
    )
    counted = rejections(hostile_intake.admin_url, hostile_site.name)
    answer = hostile_intake.upload(hostile_site, archive)
    assert [a["Status"] for a in answer.json()] == ["Failure", "Success"]
    delta = rejections(hostile_intake.admin_url, hostile_site.name) - counted
    assert dict(delta) == {"nested_archive": 1}


def test_the_file_cap_holds_for_the_whole_request(
    tmp_path: Path, private_orthanc: OrthancProcess
) -> None:
    """`MAX_FILES_PER_REQUEST` counts a form's plain parts and the entries of all its ZIP
    parts together: over it, the request gets 413 and nothing of it is stored."""
    intake = IntakeProcess(
        tmp_path / "intake",
        f"sqlite:///{tmp_path / 'intake.db'}",
        orthanc=private_orthanc,
        env_extra={"INTAKE_MAX_FILES_PER_REQUEST": "3"},
    )
    with intake:
        site = intake.add_site("capped")
        admin = intake.add_admin()
        archives = [
            make_zip([(f"{n}.dcm", f) for n, f in enumerate(make_study(1, 3))]) for _ in range(2)
        ]
        two = make_zip([(f"{n}.dcm", f) for n, f in enumerate(make_study(1, 2))])
        over = {
            "two ZIPs of 3": [(f"part{n}", f"{n}.zip", data) for n, data in enumerate(archives)],
            "a file and a ZIP of 3": [
                ("plain", "plain.dcm", good_instance()),
                ("zip", "three.zip", archives[0]),
            ],
            "a ZIP of 2 and 2 files": [
                ("zip", "two.zip", two),
                ("a", "a.dcm", good_instance()),
                ("b", "b.dcm", good_instance()),
            ],
        }
        for what, fields in over.items():
            answer = intake.upload(site, form(fields), headers={"Content-Type": FORM})
            assert answer.status_code == 413, (what, answer.text)
            assert "INTAKE_MAX_FILES_PER_REQUEST=3" in answer.json()["Details"], what
        with intake.admin_client(admin) as client:
            rows = client.get("/api/uploads", params={"site": "capped"}).json()["items"]
        assert [row["state"] for row in rows] == ["rejected"] * 3  # one refusal per request
        assert {row["reason"] for row in rows} == {"archive_too_large"}
        assert not list((intake.spool / "tmp").iterdir())

        # At the cap exactly: a ZIP of 2 and one file are taken, all three.
        fields = [("zip", "two.zip", two), ("plain", "plain.dcm", good_instance())]
        answer = intake.upload(
            site, form(fields), headers={"Content-Type": FORM, "Accept": "application/json"}
        )
        assert answer.status_code == 200, answer.text
        assert [item["Status"] for item in answer.json()] == ["Success"] * 3


def test_the_workers_are_still_the_ones_started(hostile_intake: IntakeProcess) -> None:
    """No case killed a validation worker (a dead one is replaced, with a log line)."""
    assert len(worker_pids(_pid(hostile_intake))) == 1
    assert "a validation worker died" not in hostile_intake.log_text()
    assert "Traceback" not in hostile_intake.log_text()
