"""Fuzzing the validator: whatever the bytes, an answer that is documented, and fast.

``app.dicom.part10.read_summary`` is run in-process on real files (generated instances of
every encoding the intake takes, and pydicom's bundled test files) after hypothesis
has mutated them: byte flips, truncation, insertion, deletion, splices of another
file, length fields set to extreme values (``tests/support/hostile.py``). It must
return a consistent Summary or raise one of the documented refusals
(``hostile.DOCUMENTED``), never another exception, within 2 seconds per file
(hypothesis's deadline). Run with ``--hypothesis-show-statistics`` for the outcomes by
reason; ``bench/fuzz.py`` runs many more examples (and atheris, coverage-guided).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings

from app.dicom.summary import Limits
from tests.support.hostile import fuzz_seeds, mutated, validate_once

SEEDS = fuzz_seeds()
DEFAULT = Limits()
TIGHT = Limits(max_depth=2, max_elements=60, max_inflated_bytes=8192)
FUZZ = settings(
    max_examples=400,
    deadline=timedelta(seconds=2),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "input.dcm"


@pytest.mark.parametrize(("name", "data"), SEEDS, ids=[name for name, _ in SEEDS])
def test_every_seed_gets_a_documented_answer(scratch: Path, name: str, data: bytes) -> None:
    scratch.write_bytes(data)
    validate_once(str(scratch), DEFAULT)


@FUZZ
@given(case=mutated(SEEDS))
def test_mutated_files_get_a_documented_answer_in_bounded_time(
    scratch: Path, case: tuple[str, bytes]
) -> None:
    _name, data = case
    scratch.write_bytes(data)
    event(validate_once(str(scratch), DEFAULT))


@FUZZ
@given(case=mutated(SEEDS))
def test_tight_limits_are_never_overrun(scratch: Path, case: tuple[str, bytes]) -> None:
    """With small caps the limit paths (depth, element count, inflation) are hit often."""
    _name, data = case
    scratch.write_bytes(data)
    event(validate_once(str(scratch), TIGHT))
