"""Several intake processes on one PostgreSQL: each file forwarded once, by its own node."""

from __future__ import annotations

import re
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select

from app.db.models import Upload
from tests.support.intake import IntakeProcess, Site, wait_until
from tests.support.orthanc import OrthancProcess
from tests.support.studies import make_study

pytestmark = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)

_FORWARDED = re.compile(r"forwarded receipt=([0-9a-f]{32}) ")


def _forwards(*intakes: IntakeProcess) -> Counter[str]:
    return Counter(r for i in intakes for r in _FORWARDED.findall(i.log_text()))


def _states(database_url: str) -> dict[str, str]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(Upload.receipt, Upload.state)).all()
        return {receipt: str(state) for receipt, state in rows}
    finally:
        engine.dispose()


def _send(pairs: list[tuple[IntakeProcess, Site, bytes]]) -> list[str]:
    """Upload concurrently; the receipts, in order."""

    def one(pair: tuple[IntakeProcess, Site, bytes]) -> str:
        intake, site, data = pair
        response = intake.upload(site, data)
        assert response.status_code == 200, response.text
        return str(response.json()["IntakeReceipt"])

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, pairs))


@pytest.fixture
def blackhole() -> Iterator[str]:
    """An "Orthanc" that accepts connections and never answers: deliveries hang there."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


def test_two_processes_sharing_a_spool_forward_each_file_exactly_once(
    make_intake: Callable[..., IntakeProcess],
    own_orthanc: OrthancProcess,
    database_url: str,
    tmp_path: Path,
) -> None:
    shared = {"spool_dir": str(tmp_path / "spool"), "node_name": "host-a"}
    first = make_intake(own_orthanc, **shared)
    second = make_intake(own_orthanc, **shared)
    site = first.add_site("busy")
    files = make_study(n_series=3, per_series=10)
    receipts = _send([(first if i % 2 else second, site, f) for i, f in enumerate(files)])
    wait_until(lambda: all(_states(database_url)[r] == "forwarded" for r in receipts), timeout=120)
    forwards = _forwards(first, second)
    assert {r: forwards[r] for r in receipts} == dict.fromkeys(receipts, 1)
    assert len(own_orthanc.instances()) == len(files)


def test_a_killed_process_s_claims_are_taken_over(
    make_intake: Callable[..., IntakeProcess],
    own_orthanc: OrthancProcess,
    blackhole: str,
    database_url: str,
    tmp_path: Path,
) -> None:
    """SIGKILL while its deliveries hang: the other process of the node forwards them."""
    shared = {"spool_dir": str(tmp_path / "spool"), "node_name": "host-a"}
    stuck = make_intake(None, orthanc_url=blackhole, forward_lease_seconds="6", **shared)
    site = stuck.add_site("orphaned")
    receipts = _send([(stuck, site, f) for f in make_study(n_series=1, per_series=6)])
    stuck.kill()
    survivor = make_intake(own_orthanc, forward_lease_seconds="6", **shared)
    wait_until(lambda: all(_states(database_url)[r] == "forwarded" for r in receipts), timeout=120)
    assert _forwards(survivor) == Counter(dict.fromkeys(receipts, 1))


def test_each_node_forwards_only_the_files_in_its_own_spool(
    make_intake: Callable[..., IntakeProcess],
    own_orthanc: OrthancProcess,
    blackhole: str,
    database_url: str,
) -> None:
    """Node a's Orthanc is unreachable: node b never takes (or quarantines) a's files."""
    node_a = make_intake(None, orthanc_url=blackhole, node_name="a")
    node_b = make_intake(own_orthanc, node_name="b")
    site = node_a.add_site("two-hosts")
    files = make_study(n_series=1, per_series=8)
    on_a = _send([(node_a, site, f) for f in files[:4]])
    on_b = _send([(node_b, site, f) for f in files[4:]])
    wait_until(lambda: all(_states(database_url)[r] == "forwarded" for r in on_b), timeout=60)
    node_b.stop()
    node_b.start()  # start-up recovery must not touch node a's rows
    wait_until(lambda: "listener" in node_b.log_text(), timeout=30)
    states = _states(database_url)
    assert [states[r] for r in on_a] == ["queued"] * 4
    assert not set(on_a) & set(_forwards(node_b))
    assert "spool_file_missing" not in node_b.log_text()
