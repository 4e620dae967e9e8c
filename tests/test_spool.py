"""The spool's streaming receive: caps, gzip, preamble, timeouts (real files, no HTTP)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import zlib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest

from app.errors import (
    ClientTimeout,
    CorruptCompression,
    InstanceTooLarge,
    SpoolFull,
    UnsupportedEncoding,
)
from app.intake.spool import QUEUE, Received, Spool

DICM = b"\0" * 128 + b"DICM" + b"rest of the file" * 10


async def _chunks(parts: Iterable[bytes], delay: float = 0) -> AsyncIterator[bytes]:
    for part in parts:
        if delay:
            await asyncio.sleep(delay)
        yield part


def _receive(
    spool: Spool,
    parts: Iterable[bytes],
    *,
    max_bytes: int = 10_000,
    encoding: str | None = None,
    idle: float = 5,
    delay: float = 0,
) -> Received:
    return asyncio.run(
        spool.receive(
            _chunks(parts, delay), max_bytes=max_bytes, content_encoding=encoding, idle_timeout=idle
        )
    )


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    return spool


def _leftovers(spool: Spool) -> list[Path]:
    return list((spool.root / "tmp").iterdir())


def test_receive_hashes_and_keeps_bytes(spool: Spool) -> None:
    """Split across odd chunk sizes, the stored bytes and hash equal the input."""
    received = _receive(spool, [DICM[:7], DICM[7:131], DICM[131:]])
    assert received.path.read_bytes() == DICM
    assert received.sha256 == hashlib.sha256(DICM).hexdigest()
    assert received.byte_size == len(DICM)
    assert received.executable_preamble is None


def test_nonzero_harmless_preamble_is_zeroed(spool: Spool) -> None:
    """CVE-2019-11687: a preamble with content is stored as zeros."""
    data = b"TIFF-ish junk".ljust(128, b"x") + DICM[128:]
    received = _receive(spool, [data])
    assert received.path.read_bytes() == DICM
    assert received.sha256 == hashlib.sha256(DICM).hexdigest()


@pytest.mark.parametrize("magic", [b"MZ\x90\x00", b"\x7fELF", b"#!/bin/sh\n", b"PK\x03\x04"])
def test_executable_preamble_is_flagged_and_kept_as_sent(spool: Spool, magic: bytes) -> None:
    data = magic.ljust(128, b"\0") + DICM[128:]
    received = _receive(spool, [data])
    assert received.executable_preamble is not None
    assert received.path.read_bytes() == data


def test_cap_refuses_and_leaves_nothing(spool: Spool) -> None:
    with pytest.raises(InstanceTooLarge):
        _receive(spool, [b"x" * 6000, b"x" * 6000])
    assert _leftovers(spool) == []


def test_gzip_is_inflated(spool: Spool) -> None:
    received = _receive(spool, [gzip.compress(DICM)], encoding="gzip")
    assert received.path.read_bytes() == DICM


def test_concatenated_gzip_members(spool: Spool) -> None:
    body = gzip.compress(DICM[:100]) + gzip.compress(DICM[100:])
    assert _receive(spool, [body], encoding="gzip").path.read_bytes() == DICM


def test_gzip_bomb_stops_at_the_cap_without_inflating_it_all(spool: Spool) -> None:
    """A 1 GiB-of-zeros gzip body is refused once the output passes the cap."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"\0" * (1024 * 1024)
    bomb = b"".join(compressor.compress(block) for _ in range(1024)) + compressor.flush()
    assert len(bomb) < 2 * 1024 * 1024
    with pytest.raises(InstanceTooLarge):
        _receive(spool, [bomb], max_bytes=4 * 1024 * 1024, encoding="gzip")
    assert _leftovers(spool) == []


@pytest.mark.parametrize(
    "body", [b"not gzip at all", gzip.compress(DICM)[:-12]], ids=["garbage", "truncated"]
)
def test_corrupt_gzip(spool: Spool, body: bytes) -> None:
    with pytest.raises(CorruptCompression):
        _receive(spool, [body], encoding="gzip")
    assert _leftovers(spool) == []


def test_unknown_encoding_is_refused(spool: Spool) -> None:
    with pytest.raises(UnsupportedEncoding):
        _receive(spool, [DICM], encoding="br")


def test_trickling_body_times_out(spool: Spool) -> None:
    with pytest.raises(ClientTimeout):
        _receive(spool, [b"x", b"y"], idle=0.05, delay=0.5)
    assert _leftovers(spool) == []


def test_free_space_floor(tmp_path: Path) -> None:
    spool = Spool(tmp_path, min_free_bytes=2**62)
    spool.ensure()
    with pytest.raises(SpoolFull):
        _receive(spool, [DICM])


def test_keep_moves_durably(spool: Spool) -> None:
    received = _receive(spool, [DICM])
    kept = spool.keep(received.path, QUEUE, "r1.dcm")
    assert kept.read_bytes() == DICM
    assert not received.path.exists()


def test_executable_without_dicm_is_not_a_polyglot(spool: Spool) -> None:
    """A bare ELF or ZIP body is left for validation to call "not DICOM"."""
    for magic in (b"\x7fELF", b"PK\x03\x04"):
        received = _receive(spool, [magic + b"\0" * 300])
        assert received.executable_preamble is None
