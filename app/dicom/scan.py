"""Walk a DICOM data set's element headers in bounded memory and time.

The walker reads tag, VR and length of every data element, item and delimiter
(PS3.5 §7.1, §7.5), skips values by length and never recurses: nesting lives in
an explicit stack, so depth costs a list entry, not a Python frame. It stops at
the first crossed limit. Only the few short top-level values the caller asks for
are read; everything else, pixel data fragments included, is skipped.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from pydicom.datadict import dictionary_VR

from app.errors import (
    CorruptCompression,
    InflateLimitExceeded,
    MalformedDicom,
    NestingTooDeep,
    TooManyElements,
)

_CHUNK = 64 * 1024
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_ITEM_TAG_LE = b"\xfe\xff\x00\xe0"

# PS3.5 §7.1.2: these VRs have two reserved bytes and a 32-bit length.
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())

_DATASET, _ITEM_FRAME, _SEQUENCE, _FRAGMENTS = range(4)
_NAMES = {
    _DATASET: "the data set",
    _ITEM_FRAME: "an item",
    _SEQUENCE: "a sequence",
    _FRAGMENTS: "encapsulated pixel data",
}


def tag_str(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class Source(Protocol):
    """A forward-only byte stream; ``end`` is its length when known up front."""

    pos: int
    end: int | None
    where: str

    def read(self, n: int) -> bytes: ...
    def peek(self, n: int) -> bytes: ...
    def skip(self, n: int) -> bool: ...


class FileSource:
    """The data set as it lies in the file; positions are file offsets."""

    where = "offset"

    def __init__(self, f: BinaryIO, start: int, size: int) -> None:
        self._f = f
        f.seek(start)
        self.pos = start
        self.end: int | None = size

    def read(self, n: int) -> bytes:
        data = self._f.read(n)
        self.pos += len(data)
        return data

    def peek(self, n: int) -> bytes:
        data = self._f.read(n)
        self._f.seek(-len(data), io.SEEK_CUR)
        return data

    def skip(self, n: int) -> bool:
        if self.end is not None and self.pos + n > self.end:
            return False
        self._f.seek(n, io.SEEK_CUR)
        self.pos += n
        return True


class InflateSource:
    """A raw deflate stream (PS3.5 Annex A.5) inflated chunk by chunk, capped."""

    where = "inflated offset"

    def __init__(self, f: BinaryIO, start: int, max_bytes: int) -> None:
        self._f = f
        f.seek(start)
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buf = bytearray()
        self._done = False
        self._total = 0
        self._max = max_bytes
        self.pos = 0
        self.end: int | None = None

    def _produce(self) -> bool:
        """Inflate at most one chunk more into the buffer; False at the stream's end."""
        while not self._done:
            data = self._inflater.unconsumed_tail or self._f.read(_CHUNK)
            try:
                out = self._inflater.decompress(data, _CHUNK)
            except zlib.error as exc:
                raise CorruptCompression(f"the deflated data set is corrupt: {exc}") from None
            if self._inflater.eof:
                self._done = True
            elif not data and not out:
                raise CorruptCompression("the deflated data set ends before its last block")
            if out:
                self._total += len(out)
                if self._total > self._max:
                    raise InflateLimitExceeded(
                        f"the deflated data set inflates past the cap of {self._max} bytes"
                    )
                self._buf += out
                return True
        return False

    def peek(self, n: int) -> bytes:
        while len(self._buf) < n and self._produce():
            pass
        return bytes(self._buf[:n])

    def read(self, n: int) -> bytes:
        data = self.peek(n)
        del self._buf[:n]
        self.pos += len(data)
        return data

    def skip(self, n: int) -> bool:
        while n > 0:
            if not self._buf and not self._produce():
                return False
            k = min(n, len(self._buf))
            del self._buf[:k]
            self.pos += k
            n -= k
        return True


@dataclass
class _Frame:
    kind: int
    start: int
    end: int | None  # own defined end; None for undefined length or the whole stream
    limit: int | None  # nearest defined end of this frame or of an ancestor
    implicit: bool
    little: bool
    depth: int  # items of a top-level sequence are at depth 1
    last_tag: int = -1


@dataclass
class ScanResult:
    element_count: int = 0
    max_depth: int = 0
    # Wanted top-level elements, encoded as in the file (header + value).
    wanted: dict[int, bytes] = field(default_factory=dict)


def scan(
    source: Source,
    *,
    implicit: bool,
    little: bool,
    max_depth: int,
    max_elements: int,
    wanted: frozenset[int],
    max_wanted_bytes: int = 1024,
) -> ScanResult:
    """Walk the whole data set; raise a ``BadUpload`` leaf at the first problem."""
    result = ScanResult()
    headers = 0  # items and fragments: bounded like elements, reported apart
    stack = [_Frame(_DATASET, source.pos, None, source.end, implicit, little, 0)]
    where = source.where

    def malformed(detail: str, at: int) -> MalformedDicom:
        return MalformedDicom(f"{detail} at {where} {at}")

    def child_end(frame: _Frame, pos: int, length: int, tag: int) -> int:
        end = pos + length
        if frame.limit is not None and end > frame.limit:
            raise malformed(
                f"{tag_str(tag)} declares {length} bytes, past the end of {_NAMES[frame.kind]}"
                f" or of the file",
                pos,
            )
        return end

    while True:
        frame = stack[-1]
        start = source.pos
        if frame.end is not None and start == frame.end:
            stack.pop()
            continue
        if frame.limit is not None and start == frame.limit and len(stack) > 1:
            container = "the file" if frame.limit == source.end else "its parent"
            raise malformed(
                f"{container} ends inside {_NAMES[frame.kind]} opened at {frame.start}", start
            )
        header = source.read(8)
        if not header:
            if len(stack) == 1:
                break
            raise malformed(f"file ends inside {_NAMES[frame.kind]} opened at {frame.start}", start)
        if len(header) < 8:
            raise malformed("file ends inside an element header", start)
        endian = "<" if frame.little else ">"
        group, elem, length = struct.unpack(endian + "HHL", header)
        tag = group << 16 | elem
        vr = b""
        if group != 0xFFFE and not frame.implicit:
            vr = header[4:6]
            if vr in LONG_VRS:
                extra = source.read(4)
                if len(extra) < 4:
                    raise malformed("file ends inside an element header", start)
                header += extra
                (length,) = struct.unpack(endian + "L", extra)
            elif vr in SHORT_VRS:
                (length,) = struct.unpack(endian + "H", header[6:8])
            else:
                raise malformed(f"{tag_str(tag)} has an unknown VR {vr!r}", start)
        pos = source.pos
        if frame.limit is not None and pos > frame.limit:
            raise malformed(f"{tag_str(tag)} header crosses the end of {_NAMES[frame.kind]}", start)

        if frame.kind in (_SEQUENCE, _FRAGMENTS):
            if tag == _SEQUENCE_END and frame.end is None:
                stack.pop()
                continue
            if tag != _ITEM:
                raise malformed(
                    f"expected an item in {_NAMES[frame.kind]}, found {tag_str(tag)}", start
                )
            headers += 1
            if headers > max_elements:
                raise TooManyElements(f"more than {max_elements} items and fragments")
            if frame.kind == _FRAGMENTS:
                # PS3.5 §A.4: fragments have defined lengths and are never read.
                if length == _UNDEFINED:
                    raise malformed("a pixel data fragment has an undefined length", start)
                child_end(frame, pos, length, tag)
                if not source.skip(length):
                    raise malformed("a pixel data fragment runs past the end of the data", start)
                continue
            depth = frame.depth + 1
            if depth > max_depth:
                raise NestingTooDeep(
                    f"sequences nest {depth} deep at {where} {start}; the cap is {max_depth}"
                )
            result.max_depth = max(result.max_depth, depth)
            end = None if length == _UNDEFINED else child_end(frame, pos, length, tag)
            limit = frame.limit if end is None else end
            stack.append(
                _Frame(_ITEM_FRAME, start, end, limit, frame.implicit, frame.little, depth)
            )
            continue

        # A data set (top level or an item's): data elements, maybe an item delimiter.
        if tag == _ITEM_END and frame.kind == _ITEM_FRAME and frame.end is None:
            stack.pop()
            continue
        if group == 0xFFFE:
            raise malformed(f"unexpected {tag_str(tag)} inside {_NAMES[frame.kind]}", start)
        result.element_count += 1
        if result.element_count > max_elements:
            raise TooManyElements(
                f"more than {max_elements} data elements; the cap is {max_elements}"
            )
        if tag <= frame.last_tag:
            # PS3.5 §7.1: ascending order, each tag at most once; a repeat could show
            # the intake and Orthanc two different values.
            raise malformed(
                f"{tag_str(tag)} follows {tag_str(frame.last_tag)}: tags must ascend", start
            )
        frame.last_tag = tag

        if tag in wanted and len(stack) == 1:
            if length == _UNDEFINED or vr == b"SQ" or length > max_wanted_bytes:
                raise malformed(f"{tag_str(tag)} is not a short value", start)
            value = source.read(length)
            if len(value) < length:
                raise malformed(f"{tag_str(tag)} runs past the end of the data", start)
            result.wanted[tag] = header + value
            continue

        if length == _UNDEFINED:
            if vr == b"UN":
                # PS3.5 §6.2.2: an undefined-length UN is a sequence in Implicit VR LE.
                stack.append(_Frame(_SEQUENCE, start, None, frame.limit, True, True, frame.depth))
            elif tag == _PIXEL_DATA and vr in (b"", b"OB", b"OW"):
                stack.append(
                    _Frame(_FRAGMENTS, start, None, frame.limit, frame.implicit, frame.little, 0)
                )
            elif vr in (b"", b"SQ"):
                stack.append(
                    _Frame(
                        _SEQUENCE,
                        start,
                        None,
                        frame.limit,
                        frame.implicit,
                        frame.little,
                        frame.depth,
                    )
                )
            else:
                raise malformed(
                    f"{tag_str(tag)} with VR {vr.decode()} has an undefined length", start
                )
            continue

        end = child_end(frame, pos, length, tag)
        if vr == b"SQ" or (length >= 8 and vr in (b"", b"UN") and _hides_sequence(tag, source)):
            # An implicit-VR or UN value that holds items is parsed as a sequence by
            # pydicom and DCMTK alike, so its nesting counts too.
            # PS3.5 §6.2.2: a UN sequence is encoded in Implicit VR Little Endian.
            implicit_here, little_here = (
                (True, True) if vr == b"UN" else (frame.implicit, frame.little)
            )
            stack.append(
                _Frame(_SEQUENCE, start, end, end, implicit_here, little_here, frame.depth)
            )
            continue
        if not source.skip(length):
            raise malformed(
                f"{tag_str(tag)} declares {length} bytes, past the end of the data", start
            )

    return result


def _hides_sequence(tag: int, source: Source) -> bool:
    """Whether a value without an explicit SQ VR is a sequence all the same."""
    try:
        return bool(dictionary_VR(tag) == "SQ")
    except KeyError:
        # Private or unknown: readers that look ahead (pydicom does) see items here.
        return source.peek(4) == _ITEM_TAG_LE
