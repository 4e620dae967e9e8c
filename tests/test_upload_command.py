"""`orthanc-intake upload`: the real command, as a subprocess, against a real intake and Orthanc.

The client logic's corners (URL joining, the folder walk, retry timing, answers a real
intake cannot easily be made to give) are tested in-process at the end, without a server.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socketserver
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.access import tokens
from app.dicom.summary import orthanc_ids
from app.uploader import sender
from tests.conftest import SQLITE_ONLY
from tests.support.certs import make_server_cert
from tests.support.intake import ROOT, IntakeProcess, Site, wait_until
from tests.support.orthanc import OrthancProcess, free_port
from tests.support.shared import shared_intake_fixtures
from tests.support.studies import make_study

# Default settings: the module's shared intake and a site per test. Tests that need settings
# of their own, or stop the archive, start their own intake (``make_intake``).
intake, site, _admin = shared_intake_fixtures()


def _command(
    url: str, site: str, token: str, *args: str, token_in_env: bool = True
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment a site would run; the token in the environment."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    command = [sys.executable, "-m", "app", "upload", "--url", url, "--site", site, *args]
    if token_in_env:
        env["INTAKE_UPLOAD_TOKEN"] = token
    else:
        command += ["--token", token]
    return command, env


def _run(
    intake: IntakeProcess | str, site: str, token: str, *args: str, token_in_env: bool = True
) -> subprocess.CompletedProcess[str]:
    """The command as a site would run it, against an intake or any URL."""
    url = intake if isinstance(intake, str) else intake.url
    command, env = _command(url, site, token, *args, token_in_env=token_in_env)
    return subprocess.run(
        command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )


def _start(url: str, site: str, token: str, *args: str) -> subprocess.Popen[str]:
    """The command started, for a test that signals it while it runs."""
    command, env = _command(url, site, token, *args)
    return subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _write(folder: Path, files: list[bytes]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"IM{n:04d}.dcm" for n in range(1, len(files) + 1)]
    for path, data in zip(paths, files, strict=True):
        path.write_bytes(data)
    return paths


def _orthanc_id(data: bytes) -> tuple[str, str]:
    """(study ID, instance ID) that Orthanc gives this file."""
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    ids = orthanc_ids(ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    return ids.study, ids.instance


def _study_instances(orthanc: OrthancProcess, study_id: str) -> set[str]:
    with orthanc.client() as client:
        response = client.get(f"/studies/{study_id}/instances")
    if response.status_code == 404:
        return set()
    response.raise_for_status()
    return {instance["ID"] for instance in response.json()}


def _wait_for_exactly(orthanc: OrthancProcess, files: list[bytes]) -> None:
    """Poll until each study of ``files`` holds exactly their instances in the private Orthanc."""
    expected: dict[str, set[str]] = {}
    for data in files:
        study, instance = _orthanc_id(data)
        expected.setdefault(study, set()).add(instance)
    for study, instances in expected.items():
        wait_until(lambda s=study, i=instances: _study_instances(orthanc, s) == i, timeout=60)


def _metric(intake: IntakeProcess, name: str, **labels: str) -> float:
    """A counter's value on the admin listener's /metrics (0 when it has no such sample)."""
    text = httpx.get(f"{intake.admin_url}/metrics", timeout=30).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


_COUNTS = dict.fromkeys(
    [
        "accepted",
        "duplicates",
        "quarantined",
        "rejected",
        "skipped",
        "failed",
        "not sent",
        "retries",
    ],
    0,
)


_COUNT_LINE = re.compile(r"^  ([a-z ]+):\s+(\d+)(?:  (.+))?$")


def _counts(summary: str) -> dict[str, int]:
    """The ``  label:  n  what it means`` lines of the human summary."""
    found = (_COUNT_LINE.match(line) for line in summary.splitlines())
    return {m[1]: int(m[2]) for m in found if m}


def _notes(summary: str) -> dict[str, str]:
    """What the summary says a non-zero count means, by label."""
    found = (_COUNT_LINE.match(line) for line in summary.splitlines())
    return {m[1]: m[3] for m in found if m and m[3]}


def test_a_folder_is_walked_sent_and_summarised_as_json(
    intake: IntakeProcess, site: Site, private_orthanc: OrthancProcess, tmp_path: Path
) -> None:
    """DICOM files in nested folders arrive; DICOMDIR and text are skipped; a broken one is
    rejected with the server's reason; the JSON document says all of it; exit 1."""
    export = tmp_path / "export"
    study_a = make_study(n_series=2, per_series=3)
    *study_b, broken = make_study(n_series=1, per_series=3)
    sent = _write(export / "patient-a" / "study" / "series-1", study_a[:3])
    sent += _write(export / "patient-a" / "study" / "series-2", study_a[3:])
    sent += _write(export / "patient-b" / "deeper", [*study_b, broken[:-1000]])
    (export / "notes.txt").write_text("exported by the PACS on Monday\n")
    # A real DICOMDIR is a Part 10 file too: only its name tells it apart.
    index = make_study(n_series=1, per_series=1)[0]
    (export / "DICOMDIR").write_bytes(index)

    done = _run(intake, site.name, site.token, str(export), "--json")

    assert done.returncode == 1, done.stderr
    assert done.stderr == ""  # no progress bar, no warning: stdout is not a terminal
    report = json.loads(done.stdout)
    broken_path = str(sent[-1])
    rejected = report.pop("rejected")
    assert [(r["path"], r["status"], r["reason"]) for r in rejected] == [
        (broken_path, 400, "Bad file format")
    ]
    assert "past the end" in rejected[0]["detail"]  # the server's precise reason
    assert rejected[0]["sent_bytes"] == rejected[0]["size"] == len(broken) - 1000
    assert report.pop("seconds") > 0
    # "files" and "bytes": the broken file was sent and refused, so not counted; "stored":
    # none was in the archive when the intake answered (all queued).
    skipped = [
        (export / "DICOMDIR", "DICOMDIR (a media index, not an instance)"),
        (export / "notes.txt", "not DICOM (no DICM at byte 128, no data set at byte 0)"),
    ]
    assert report == {
        "accepted": 8,
        "stored": 0,
        "duplicates": 0,
        "quarantined": 0,
        "skipped": [
            {
                "path": str(path),
                "status": None,
                "reason": reason,
                "detail": "",
                "sent_bytes": None,
                "size": None,
            }
            for path, reason in skipped
        ],
        "failed": [],
        "not_sent": 0,
        "total": 9,
        "files": 8,
        "bytes": sum(path.stat().st_size for path in sent[:-1]),
        "retries": 0,
        "stopped": None,
        "error": None,
        "error_detail": "",
    }
    _wait_for_exactly(private_orthanc, study_a + study_b)
    assert _orthanc_id(index)[1] not in private_orthanc.instances()


def test_sending_a_folder_again_reports_duplicates_and_exits_0(
    intake: IntakeProcess, site: Site, tmp_path: Path
) -> None:
    """A second run of the same folder stores nothing new: every file is a duplicate."""
    _write(tmp_path / "study", make_study(n_series=1, per_series=4))

    first = _run(intake, site.name, site.token, str(tmp_path / "study"))
    again = _run(intake, site.name, site.token, str(tmp_path / "study"))

    assert first.returncode == 0, first.stdout + first.stderr
    assert _counts(first.stdout) == _COUNTS | {"accepted": 4}
    assert again.returncode == 0, again.stdout + again.stderr
    assert _counts(again.stdout) == _COUNTS | {"duplicates": 4}
    assert again.stderr == ""


@SQLITE_ONLY  # what the command says and does: the intake's database plays no part
def test_a_wrong_token_stops_the_run_after_one_request_with_exit_3(
    make_intake: Callable[..., IntakeProcess], private_orthanc: OrthancProcess, tmp_path: Path
) -> None:
    """One refused request ends the run: exit 3, one line saying what to check, no summary
    of zeros, the token never echoed."""
    # Two failures block the address, so the probes below count the command's requests.
    intake = make_intake(private_orthanc, auth_max_failures="2")
    intake.add_site("hospital-a")
    wrong = tokens.new_token()
    _write(tmp_path / "study", make_study(n_series=1, per_series=5))

    done = _run(intake, "hospital-a", wrong, str(tmp_path / "study"), token_in_env=False)

    assert done.returncode == 3
    assert done.stderr == (
        "error: the intake refused the token for site 'hospital-a' (401: unknown site or "
        "token): check --token (or INTAKE_UPLOAD_TOKEN) and --site. Nothing was uploaded.\n"
    )
    assert done.stdout == ""  # nothing was sent: no "Sent 1 file(s)", no column of zeros
    assert wrong not in done.stdout + done.stderr

    def probe() -> int:
        url = f"{intake.url}/instances"
        return httpx.post(url, auth=("hospital-a", wrong), content=b"x", timeout=30).status_code

    assert probe() == 401  # the command's request was the first failure, this the second
    assert probe() == 429  # so the address is blocked now: the command made exactly one
    assert _metric(intake, "intake_received_bytes_total") == 0


def test_too_many_concurrent_uploads_are_retried_until_accepted(
    intake: IntakeProcess, site: Site, private_orthanc: OrthancProcess, tmp_path: Path
) -> None:
    """Real 429s (one upload at a time for the site, four in flight) are waited out."""
    # --json: the text form fails on a never-used token (app/cli/main.py `_show`).
    policy = intake.cli("sites", "policy", site.name, "--max-concurrent-uploads", "1", "--json")
    assert policy.returncode == 0, policy.stderr
    # 128 KiB files keep each upload busy long enough for the four to overlap.
    files = make_study(n_series=1, per_series=6, rows=256, cols=256)
    _write(tmp_path / "study", files)

    started = time.monotonic()
    done = _run(intake, site.name, site.token, str(tmp_path / "study"), "--json")

    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["accepted"] == 6
    assert report["failed"] == []
    assert report["retries"] > 0
    refused = _metric(
        intake,
        "intake_uploads_total",
        site=site.name,
        outcome="rejected",
        reason="too_many_concurrent_uploads",
    )
    assert refused == report["retries"]
    # The intake's Retry-After (5 s) was honoured before the retries.
    assert time.monotonic() - started >= 5
    _wait_for_exactly(private_orthanc, files)


def test_a_zip_archive_is_sent_whole(
    intake: IntakeProcess, site: Site, private_orthanc: OrthancProcess, tmp_path: Path
) -> None:
    """A ZIP of DICOM files (and a README the server skips) is one request; each entry counts."""
    files = make_study(n_series=1, per_series=3)
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("README.txt", "Exported for the intake.\n")
        for n, data in enumerate(files, 1):
            zf.writestr(f"DICOM/IM{n:04d}", data)

    done = _run(intake, site.name, site.token, str(archive), "--json")

    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert (report["accepted"], report["rejected"], report["files"]) == (3, [], 1)
    assert report["bytes"] == archive.stat().st_size
    _wait_for_exactly(private_orthanc, files)


def _interrupt(process: subprocess.Popen[str]) -> tuple[float, str, str]:
    """Ctrl-C: SIGINT to the running command; (seconds until it exited, stdout, stderr)."""
    signalled = time.monotonic()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    return time.monotonic() - signalled, out, err


def test_ctrl_c_says_what_was_taken_and_running_again_sends_the_rest(
    make_intake: Callable[..., IntakeProcess], private_orthanc: OrthancProcess, tmp_path: Path
) -> None:
    """Ctrl-C while files wait out a real 429: exit 130, a summary of what the intake took
    (the intake's own count), and how to finish; the second run does finish."""
    intake = make_intake(private_orthanc, auth_cache_seconds="0")  # policy changes apply now
    site = intake.add_site("hospital-a")
    # Four instances a minute: ten files need two more minutes, so the run is mid-way when
    # the intake has refused one (the files after it wait out Retry-After).
    policy = intake.cli("sites", "policy", site.name, "--instances-per-minute", "4", "--json")
    assert policy.returncode == 0, policy.stderr
    files = make_study(n_series=1, per_series=10)
    _write(tmp_path / "study", files)

    process = _start(intake.url, site.name, site.token, str(tmp_path / "study"))
    limited = {"outcome": "rejected", "reason": "rate_limited"}
    wait_until(lambda: _metric(intake, "intake_uploads_total", **limited) >= 1)
    seconds, out, err = _interrupt(process)

    assert process.returncode == 130, out + err
    assert seconds < 10  # the files waiting out Retry-After did not hold it up
    taken = int(_metric(intake, "intake_uploads_total", outcome="accepted"))
    assert 4 <= taken < 10
    headline, *_ = out.splitlines()
    assert re.fullmatch(
        rf"Interrupted after \d+\.\d s: {taken} of 10 files taken by the intake "
        rf"\(\d+\.\d kB\); {10 - taken} not sent\.",
        headline,
    )
    counts = _counts(out)
    assert counts.pop("retries") >= 1  # how many depends on the workers' timing
    assert counts | {"retries": 0} == _COUNTS | {"accepted": taken, "not sent": 10 - taken}
    assert out.endswith(
        f"Run the same command again to send the rest: it sends all 10 files again, and the "
        f"intake answers the {taken} it already took as duplicates without storing them "
        "twice.\n"
    )
    assert "Traceback" not in err

    cleared = intake.cli("sites", "policy", site.name, "--clear", "instances_per_minute", "--json")
    assert cleared.returncode == 0, cleared.stderr
    again = _run(intake, site.name, site.token, str(tmp_path / "study"))
    assert again.returncode == 0, again.stdout + again.stderr
    assert _counts(again.stdout) == _COUNTS | {"duplicates": taken, "accepted": 10 - taken}
    _wait_for_exactly(private_orthanc, files)


class _SlowReader(socketserver.ThreadingTCPServer):
    """An HTTP server on loopback that reads bodies at about 1.6 MB/s and answers each one
    "queued": a real intake reads a large file too fast to press Ctrl-C in the middle."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _SlowHandler)
        self.received = 0
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _SlowHandler(socketserver.StreamRequestHandler):
    server: _SlowReader

    def handle(self) -> None:
        while (length := self._content_length()) is not None:
            while length:
                chunk = self.rfile.read(min(length, 16384))
                if not chunk:
                    return  # the client hung up mid-body
                length -= len(chunk)
                self.server.received += len(chunk)
                time.sleep(0.01)
            body = json.dumps({"Status": "Success", "IntakeState": "queued"}).encode()
            head = (
                f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
            )
            self.wfile.write(head.encode() + b"\r\n\r\n" + body)

    def _content_length(self) -> int | None:
        """Read a request's head; its Content-Length, or None once the client hung up."""
        length = 0
        while (line := self.rfile.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return length if line else None


def test_ctrl_c_during_a_large_file_stops_at_once(tmp_path: Path) -> None:
    """A file half sent is abandoned at Ctrl-C (not streamed to its end) and counted as not
    sent; the file the server had answered is counted as taken."""
    small, large = tmp_path / "small.dcm", tmp_path / "large.dcm"
    small.write_bytes(bytes(128) + b"DICM" + bytes(10_000))
    large.write_bytes(bytes(128) + b"DICM" + os.urandom(30_000_000))  # some 20 s at that rate
    with _SlowReader() as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        process = _start(server.url, "hospital-a", "token", str(small), str(large))
        wait_until(lambda: server.received > small.stat().st_size + 1_000_000, timeout=30)
        seconds, out, err = _interrupt(process)
        received = server.received
        server.shutdown()

    assert process.returncode == 130, out + err
    assert seconds < 5
    assert received < large.stat().st_size // 2
    assert out.startswith("Interrupted after ")
    assert "1 of 2 files taken by the intake (10.1 kB); 1 not sent." in out
    assert _counts(out) == _COUNTS | {"accepted": 1, "not sent": 1}
    assert err == ""  # nothing was waiting for an answer, so nothing to wait for


def test_https_to_the_plain_http_intake_says_so_in_one_sentence(
    intake: IntakeProcess, site: Site, tmp_path: Path
) -> None:
    """A wrong scheme is not retried and not shown raw: one line names the URL and the fix;
    --verbose adds OpenSSL's words."""
    _write(tmp_path / "study", make_study(n_series=1, per_series=3))
    wrong = intake.url.replace("http://", "https://")
    port = wrong.rsplit(":", 1)[1]

    done = _run(wrong, site.name, site.token, str(tmp_path / "study"))
    verbose = _run(wrong, site.name, site.token, str(tmp_path / "study"), "--verbose")

    assert done.returncode == verbose.returncode == 1
    assert done.stdout == verbose.stdout == ""
    sentence = (
        f"error: {wrong} does not speak TLS on port {port}: use {intake.url} instead, or "
        "enable TLS on the intake. Nothing was uploaded."
    )
    assert done.stderr == sentence + "\n"
    assert verbose.stderr.startswith(sentence + "\n  (ConnectError: [SSL: ")
    assert _metric(intake, "intake_received_bytes_total", site=site.name) == 0


@pytest.mark.parametrize(
    ("url", "retries", "expected"),
    [
        (
            "http://127.0.0.1:{port}/",
            "0",  # a refused connection is retried (an intake restarting): not here
            "error: nothing is listening at http://127.0.0.1:{port}/ (connection refused): "
            "check the host and port in --url, and that the intake is running. "
            "Nothing was uploaded.\n",
        ),
        (
            "https://intake.invalid/",  # RFC 6761 §6.4: never resolves
            "5",  # a name that does not exist is not retried
            "error: the host name 'intake.invalid' in https://intake.invalid/ could not be "
            "found: check --url, and this machine's network. Nothing was uploaded.\n",
        ),
    ],
)
def test_an_intake_that_cannot_be_reached_is_said_in_one_sentence(
    url: str, retries: str, expected: str, tmp_path: Path
) -> None:
    port = free_port()
    _write(tmp_path / "study", make_study(n_series=1, per_series=2))

    done = _run(
        url.format(port=port), "hospital-a", "token", str(tmp_path / "study"), "--retries", retries
    )

    assert done.returncode == 1
    assert (done.stdout, done.stderr) == ("", expected.format(port=port))


@SQLITE_ONLY  # what the command says and does: the intake's database plays no part
def test_tls_trouble_at_an_https_intake_names_the_fix(
    make_intake: Callable[..., IntakeProcess], private_orthanc: OrthancProcess, tmp_path: Path
) -> None:
    """Its CA not given: "--cacert"; http:// to its TLS port: "use https://"; with the CA
    the same command works."""
    cert = make_server_cert(tmp_path / "certs")
    intake = make_intake(
        private_orthanc, tls_certfile=str(cert.cert_file), tls_keyfile=str(cert.key_file)
    )
    site = intake.add_site("hospital-a")
    files = make_study(n_series=1, per_series=2)
    study = str(_write(tmp_path / "study", files)[0].parent)
    host = intake.url.removeprefix("https://")
    plain = f"http://{host}"

    untrusted = _run(intake, site.name, site.token, study)
    no_tls = _run(plain, site.name, site.token, study, "--retries", "0")
    trusted = _run(intake, site.name, site.token, study, "--cacert", str(cert.ca_file))

    assert (untrusted.returncode, untrusted.stdout) == (1, "")
    assert untrusted.stderr == (
        f"error: the TLS certificate of {host} is not trusted (unable to get local issuer "
        "certificate): pass the CA certificate that signed it with --cacert. Nothing was "
        "uploaded.\n"
    )
    assert (no_tls.returncode, no_tls.stdout) == (1, "")
    assert no_tls.stderr == (
        f"error: {plain} closed the connection without answering: if it serves HTTPS on "
        "that port, use https://. Nothing was uploaded.\n"
    )
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    assert _counts(trusted.stdout)["accepted"] == 2
    _wait_for_exactly(private_orthanc, files)


def test_a_file_refused_part_way_counts_no_bytes_and_says_how_far_it_got(
    intake: IntakeProcess, site: Site, tmp_path: Path
) -> None:
    """The intake refuses a file over the site's cap once it has read the cap: the bytes
    figure counts only the file it took, and the refusal says how much had been sent."""
    policy = intake.cli("sites", "policy", site.name, "--max-instance-bytes", "1000000", "--json")
    assert policy.returncode == 0, policy.stderr
    small = make_study(n_series=1, per_series=1)[0]
    large = make_study(n_series=1, per_series=1, rows=4500, cols=4500)[0]  # 40.5 MB
    paths = _write(tmp_path / "study", [large, small])

    as_json = _run(intake, site.name, site.token, str(tmp_path / "study"), "--json")
    as_text = _run(intake, site.name, site.token, str(tmp_path / "study"))

    assert as_json.returncode == as_text.returncode == 1
    report = json.loads(as_json.stdout)
    assert (report["total"], report["files"], report["bytes"]) == (2, 1, len(small))
    (refused,) = report["rejected"]
    assert (refused["path"], refused["status"], refused["size"]) == (
        str(paths[0]),
        413,
        len(large),
    )
    assert 1_000_000 < refused["sent_bytes"] < len(large)
    headline, *_ = as_text.stdout.splitlines()
    assert re.fullmatch(r"1 of 2 files taken by the intake \(9\.\d kB\) in \d+\.\d s\.", headline)
    assert re.search(
        rf"{paths[0]}: Instance too large \(413\): .*1000000 bytes "
        r"\(after \d+\.\d MB of 40\.5 MB was sent\)\n",
        as_text.stdout,
    )


@SQLITE_ONLY  # what the command says and does: the intake's database plays no part
def test_accepted_while_the_archive_is_down_is_said_to_be_queued(
    make_intake: Callable[..., IntakeProcess], own_orthanc: OrthancProcess, tmp_path: Path
) -> None:
    """With the private Orthanc stopped the intake still takes the files: the summary says
    they are queued, not in the archive; they arrive once it is back."""
    intake = make_intake(own_orthanc)
    site = intake.add_site("hospital-a")
    files = make_study(n_series=1, per_series=3)
    _write(tmp_path / "study", files)
    own_orthanc.stop()

    done = _run(intake, site.name, site.token, str(tmp_path / "study"))

    assert done.returncode == 0, done.stdout + done.stderr
    assert _counts(done.stdout) == _COUNTS | {"accepted": 3}
    assert _notes(done.stdout) == {
        "accepted": "queued: not yet in the archive when the intake answered"
    }
    own_orthanc.start()
    _wait_for_exactly(own_orthanc, files)


# --- the client logic, without a server ------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("https://intake.example.org", "https://intake.example.org/instances"),
        ("https://intake.example.org/", "https://intake.example.org/instances"),
        ("https://host.example/intake", "https://host.example/intake/instances"),
        ("https://host.example/intake/", "https://host.example/intake/instances"),
        ("http://127.0.0.1:8000/a/b//?x=1", "http://127.0.0.1:8000/a/b/instances"),
    ],
)
def test_instances_url_keeps_a_path_prefix(given: str, expected: str) -> None:
    assert str(sender.instances_url(given)) == expected


@pytest.mark.parametrize(
    "given", ["intake.example.org/", "ftp://intake.example.org/", "https://a:b@intake.example.org/"]
)
def test_instances_url_refuses_what_is_not_a_plain_http_url(given: str) -> None:
    with pytest.raises(ValueError, match="URL"):
        sender.instances_url(given)


def test_folder_walk_is_sorted_and_skips_what_is_not_an_instance(tmp_path: Path) -> None:
    """Only DICOM files (Part 10, or bare data sets as Orthanc takes them) and ZIPs inside
    folders are sent, in path order; the rest is listed."""
    dicom = make_study(n_series=1, per_series=1)[0]
    bare = dicom[144 + int.from_bytes(dicom[140:144], "little") :]
    root = tmp_path / "root"
    (root / "b" / "c").mkdir(parents=True)
    (root / "a").mkdir()
    (root / "b" / "c" / "z.dcm").write_bytes(dicom)
    (root / "b" / "y").write_bytes(dicom)
    (root / "b" / "bare").write_bytes(bare)
    (root / "a" / "x.zip").write_bytes(b"PK\x03\x04" + bytes(200))
    (root / "a" / "dicomdir").write_bytes(dicom)
    (root / "a" / "short").write_bytes(b"tiny")
    (root / "a" / "fake.dcm").write_bytes(bytes(128) + b"DICX" + bytes(10))
    outside = tmp_path / "outside.dcm"
    outside.write_bytes(dicom)
    (root / "a" / "link.dcm").symlink_to(outside)
    (root / "linked-folder").symlink_to(tmp_path, target_is_directory=True)
    os.mkfifo(root / "a" / "pipe")
    loose = tmp_path / "loose.txt"
    loose.write_text("sent anyway: it was named on the command line")

    report = sender.Report()
    items = sender.collect([root, loose], report)

    assert [(i.path, i.content_type) for i in items] == [
        (root / "a" / "x.zip", "application/zip"),
        (root / "b" / "bare", "application/dicom"),
        (root / "b" / "c" / "z.dcm", "application/dicom"),
        (root / "b" / "y", "application/dicom"),
        (loose, "application/dicom"),
    ]
    assert items[2].size == len(dicom)
    assert [(Path(p.path).name, p.reason) for p in report.skipped] == [
        ("dicomdir", "DICOMDIR (a media index, not an instance)"),
        ("fake.dcm", "not DICOM (no DICM at byte 128, no data set at byte 0)"),
        ("link.dcm", "not a regular file"),
        ("pipe", "not a regular file"),
        ("short", "not DICOM (no DICM at byte 128, no data set at byte 0)"),
    ]


def test_retry_delay_grows_honours_retry_after_and_is_capped() -> None:
    for _ in range(50):
        assert 0.5 <= sender.retry_delay(0, None) <= 1
        assert 4 <= sender.retry_delay(3, None) <= 8
        assert 5 <= sender.retry_delay(0, 5) <= 6
        assert sender.retry_delay(2, 3600) == sender.MAX_WAIT_SECONDS
        assert sender.retry_delay(30, None) == sender.MAX_WAIT_SECONDS


def _serve(
    tmp_path: Path, handler: Callable[[httpx.Request], httpx.Response], n: int = 1, **kwargs: Any
) -> sender.Report:
    folder = tmp_path / "files"
    _write(folder, [bytes(128) + b"DICM" + bytes([k]) * 70_000 for k in range(n)])
    return sender.upload(
        [folder],
        "http://intake.test/prefix/",
        "site-a",
        "token",
        backoff=0,
        transport=httpx.MockTransport(handler),
        **kwargs,
    )


def test_transient_failures_are_retried_and_final_answers_are_not(tmp_path: Path) -> None:
    """Connection errors, 503 and 507 are retried; 400 is final; 500 fails at once."""
    answers: dict[int, list[Any]] = {
        0: [httpx.ConnectError("refused"), 503, 507, 200],
        1: [400],
        2: [500],
        3: [429] * 10,
    }
    seen: list[tuple[str, str, str | None, int]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = request.read()
        seen.append(
            (
                request.url.path,
                request.headers["content-type"],
                request.headers.get("content-length"),
                len(body),
            )
        )
        answer = answers[body[132]].pop(0)
        if isinstance(answer, Exception):
            raise answer
        if answer == 200:
            return httpx.Response(200, json={"Status": "Success", "IntakeState": "queued"})
        error = {"HttpStatus": answer, "Message": f"m{answer}", "Details": f"d{answer}"}
        return httpx.Response(answer, json=error, headers={"Retry-After": "0"})

    report = _serve(tmp_path, handler, n=4, retries=3)

    assert {s[:3] for s in seen} == {("/prefix/instances", "application/dicom", "70132")}
    assert {s[3] for s in seen} == {70_132}  # streamed whole, every time
    assert report.accepted == 1
    assert [(Path(p.path).name, p.status, p.reason, p.detail) for p in report.rejected] == [
        ("IM0002.dcm", 400, "m400", "d400")
    ]
    assert [(Path(p.path).name, p.status, p.reason) for p in report.failed] == [
        ("IM0003.dcm", 500, "m500"),
        ("IM0004.dcm", 429, "m429"),
    ]
    assert report.retries == 3 + 3
    assert report.exit_code == 1


def test_a_zip_answer_counts_each_entry(tmp_path: Path) -> None:
    """Orthanc answers a ZIP with one object per DICOM entry; failed entries are listed."""

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["content-type"] == "application/zip"
        request.read()
        return httpx.Response(
            200,
            json=[
                {"Status": "Success", "IntakeState": "queued"},
                {"Status": "AlreadyStored", "IntakeState": "duplicate"},
                {"Status": "AlreadyStored", "IntakeState": "quarantined"},
                {
                    "Status": "Failure",
                    "HttpStatus": 400,
                    "IntakeReason": "malformed",
                    "Details": "short",
                },
                {"Status": "Failure", "HttpStatus": 429, "IntakeReason": "rate_limited"},
                {"Status": "Failure", "IntakeEntry": "b/c", "IntakeReason": "?"},
            ],
        )

    archive = tmp_path / "a.zip"
    archive.write_bytes(b"PK\x03\x04" + bytes(100))
    report = sender.upload(
        [archive], "http://intake.test", "s", "t", transport=httpx.MockTransport(handler)
    )

    assert (report.accepted, report.duplicates, report.quarantined) == (1, 1, 1)
    assert report.rejected == [
        sender.Problem(f"{archive} #4", 400, "malformed", "short"),
        sender.Problem(f"{archive}!b/c", 200, "?"),
    ]
    assert report.failed == [sender.Problem(f"{archive} #5", 429, "rate_limited")]
    assert f"{archive} #4: malformed (400): short" in report.summary()


def test_a_token_refused_mid_run_still_summarises_what_was_taken(tmp_path: Path) -> None:
    """A token revoked while files go: the run stops, and says what the intake took."""
    answers = iter([200])

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        if next(answers, 401) == 200:
            return httpx.Response(200, json={"Status": "Success", "IntakeState": "queued"})
        return httpx.Response(401, json={"HttpStatus": 401, "Details": "the token was revoked"})

    report = _serve(tmp_path, handler, n=4, concurrency=1)

    assert (report.stopped, report.files, report.bytes, report.not_sent) == ("token", 1, 70_132, 3)
    assert report.exit_code == 3
    assert report.message() == (
        "error: the intake refused the token for site 'site-a' (401: the token was revoked): "
        "check --token (or INTAKE_UPLOAD_TOKEN) and --site. 1 of 4 files taken; 3 not sent."
    )
    assert report.summary().startswith("1 of 4 files taken by the intake (70.1 kB) in ")


def test_concurrency_is_bounded(tmp_path: Path) -> None:
    lock = threading.Lock()
    in_flight = [0, 0]  # now, most

    def handler(request: httpx.Request) -> httpx.Response:
        with lock:
            in_flight[0] += 1
            in_flight[1] = max(in_flight[1], in_flight[0])
        request.read()
        time.sleep(0.02)
        with lock:
            in_flight[0] -= 1
        return httpx.Response(200, json={"Status": "Success"})

    report = _serve(tmp_path, handler, n=12, concurrency=3)

    assert report.accepted == 12
    assert 1 < in_flight[1] <= 3


@pytest.mark.parametrize(
    ("report", "code"),
    [
        (sender.Report(accepted=2, duplicates=1, skipped=[sender.Problem("x", None, "")]), 0),
        (sender.Report(accepted=2, quarantined=1), 1),
        (sender.Report(failed=[sender.Problem("x", 503, "")]), 1),
        (sender.Report(not_sent=1), 1),
        (sender.Report(failed=[sender.Problem("x", None, "")], stopped="unreachable"), 1),
        (sender.Report(rejected=[sender.Problem("x", 400, "")], stopped="token"), 3),
        (sender.Report(accepted=2, not_sent=1, stopped="interrupted"), 130),
    ],
)
def test_exit_codes(report: sender.Report, code: int) -> None:
    assert report.exit_code == code
