"""app/intake/archive.py on its own: every ZIP bound holds before a byte is inflated."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from app.errors import ArchiveTooLarge, MalformedArchive, NestedArchive
from app.intake import archive
from app.intake.spool import Spool
from tests.support.archives import (
    claims_entries,
    corrupt_crc,
    encrypted_zip,
    make_zip,
    overlapping_zip,
    quoted_overlap_zip,
)
from tests.support.studies import make_study

MiB = 1024 * 1024
LIMITS = archive.Limits(
    max_entries=100, max_inflated_bytes=64 * MiB, max_ratio=250, max_entry_bytes=32 * MiB
)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    return spool


def _open(tmp_path: Path, data: bytes, limits: archive.Limits = LIMITS) -> archive.Archive:
    path = tmp_path / "upload.zip"
    path.write_bytes(data)
    return archive.Archive(path, limits)


def test_entries_come_out_in_archive_order_with_preambles_zeroed(
    tmp_path: Path, spool: Spool
) -> None:
    """Entries are inflated one by one into tmp/, in the order the archive lists them."""
    files = make_study(n_series=1, per_series=3)
    first = b"MZ" + files[0][2:]  # a non-executable but non-zero preamble byte pattern
    data = make_zip([("z.dcm", files[2]), ("dir/a.dcm", first), ("m.dcm", files[1])])
    with _open(tmp_path, data) as opened:
        names = [e.name for e in opened.entries]
        extracted = [opened.extract(e, spool) for e in opened.entries]
    assert names == ["z.dcm", "dir/a.dcm", "m.dcm"]
    assert [r.path.read_bytes()[128:] for r in extracted] == [
        files[2][128:],
        files[0][128:],
        files[1][128:],
    ]
    assert all(r.path.parent == spool.root / "tmp" for r in extracted)


def test_path_traversal_names_are_only_labels(tmp_path: Path, spool: Spool) -> None:
    """An entry called ../../x.dcm is read into a spool file of our naming, nowhere else."""
    data = make_zip([("../../escape.dcm", make_study(1, 1)[0])])
    with _open(tmp_path, data) as opened:
        received = opened.extract(opened.entries[0], spool)
    assert received.path.parent == spool.root / "tmp"
    assert not (tmp_path.parent / "escape.dcm").exists()
    assert not any(p.name == "escape.dcm" for p in tmp_path.rglob("*"))


def test_non_dicom_and_dicomdir_entries_are_skipped(tmp_path: Path, spool: Spool) -> None:
    data = make_zip([("README.txt", b"hello"), ("sub/DICOMDIR", bytes(128) + b"DICM")])
    with _open(tmp_path, data) as opened:
        reasons = []
        for entry in opened.entries:
            with pytest.raises(archive.Skipped) as skipped:
                opened.extract(entry, spool)
            reasons.append(skipped.value.reason)
    assert reasons == ["not_dicom", "dicomdir"]
    assert list((spool.root / "tmp").iterdir()) == []


def test_a_nested_archive_is_refused_unopened(tmp_path: Path, spool: Spool) -> None:
    inner = make_zip([("x.dcm", make_study(1, 1)[0])])
    with _open(tmp_path, make_zip([("inner.zip", inner)])) as opened, pytest.raises(NestedArchive):
        opened.extract(opened.entries[0], spool)
    assert list((spool.root / "tmp").iterdir()) == []


def test_a_compression_bomb_is_refused_from_the_directory_alone(tmp_path: Path) -> None:
    """64 MiB of zeros deflate ~1000:1: refused before inflating, with little memory."""
    data = make_zip([("bomb.dcm", bytes(64 * MiB))])
    tracemalloc.start()
    try:
        with pytest.raises(ArchiveTooLarge, match=r"inflates 1\d\d\d times"):
            _open(tmp_path, data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB


def test_the_inflated_total_is_capped(tmp_path: Path) -> None:
    entries = [(f"{i}.dcm", bytes(range(256)) * 4096) for i in range(3)]  # 1 MiB each
    limits = archive.Limits(
        max_entries=100, max_inflated_bytes=2 * MiB, max_ratio=1e9, max_entry_bytes=32 * MiB
    )
    with pytest.raises(ArchiveTooLarge, match="inflates to 3145728 bytes"):
        _open(tmp_path, make_zip(entries), limits)


def test_too_many_entries_are_refused_from_the_end_record(tmp_path: Path) -> None:
    """The end record is read first: a claim of 60000 entries is refused before zipfile."""
    data = claims_entries(make_zip([("a.dcm", b"x")]), 60000)
    with pytest.raises(ArchiveTooLarge, match="60000 entries"):
        _open(tmp_path, data)


def test_overlapping_entries_are_refused(tmp_path: Path) -> None:
    data = overlapping_zip(make_study(1, 1)[0])
    with pytest.raises(MalformedArchive, match="overlap"):
        _open(tmp_path, data)


def test_entries_sharing_a_stream_behind_their_local_headers_are_refused(tmp_path: Path) -> None:
    """The overlap is found from the local headers' own name and extra-field lengths."""
    data = quoted_overlap_zip(make_study(1, 1)[0])
    with pytest.raises(MalformedArchive, match="overlap"):
        _open(tmp_path, data)


def test_many_small_entries_are_capped_by_the_whole_archive_ratio(tmp_path: Path) -> None:
    """32 entries of 1 MiB of zeros (each under the per-entry floor): 413 as a whole."""
    data = make_zip([(f"{i}.dcm", bytes(MiB)) for i in range(32)])
    limits = archive.Limits(
        max_entries=100, max_inflated_bytes=64 * MiB, max_ratio=250, max_entry_bytes=32 * MiB
    )
    with pytest.raises(ArchiveTooLarge, match="times its size"):
        _open(tmp_path, data, limits)


def test_encrypted_entries_are_refused(tmp_path: Path, spool: Spool) -> None:
    with (
        _open(tmp_path, encrypted_zip(make_study(1, 1)[0])) as opened,
        pytest.raises(MalformedArchive, match="encrypted"),
    ):
        opened.extract(opened.entries[0], spool)


def test_a_bad_crc_is_caught_and_leaves_no_file(tmp_path: Path, spool: Spool) -> None:
    data = corrupt_crc(make_zip([("a.dcm", make_study(1, 1)[0])], deflate=False))
    with _open(tmp_path, data) as opened, pytest.raises(MalformedArchive, match="cannot be read"):
        opened.extract(opened.entries[0], spool)
    assert list((spool.root / "tmp").iterdir()) == []


@pytest.mark.parametrize(
    "data",
    [b"PK\x03\x04" + bytes(100), b"PK\x05\x06" + bytes(10), b"PK\x03\x04garbage" * 1000],
    ids=["no-end-record", "short-end-record", "garbage"],
)
def test_truncated_or_garbage_archives_are_malformed(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(MalformedArchive):
        _open(tmp_path, data)


def test_an_oversized_entry_is_refused_alone(tmp_path: Path, spool: Spool) -> None:
    limits = archive.Limits(
        max_entries=10, max_inflated_bytes=64 * MiB, max_ratio=250, max_entry_bytes=1000
    )
    with (
        _open(tmp_path, make_zip([("big.dcm", make_study(1, 1)[0])]), limits) as opened,
        pytest.raises(ArchiveTooLarge, match="limit for one instance"),
    ):
        opened.extract(opened.entries[0], spool)


def test_an_empty_archive_has_no_entries(tmp_path: Path) -> None:
    with _open(tmp_path, make_zip([])) as opened:
        assert opened.entries == []
