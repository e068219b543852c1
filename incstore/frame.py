"""Frame: the one zstd frame a chunk is (FORMAT.md §1), and how a reader keeps it honest.

A chunk comes from a store someone else may write, so before and while it is decoded:
- its header must name a content checksum and, if it names a content size, the item's NAR size
  (`header_problem`);
- its window must fit `MAX_WINDOW` (the decoder refuses more), so memory per decoding worker
  stays bounded whatever the chunk asks for; incstore writes at most zstd level 19, whose
  window is 8 MiB;
- it must end where the file ends (`FrameEnd`): data after the frame (a tail, skippable frames,
  a second frame) is refused, so nothing ever reads or trusts bytes past it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import zstandard

MAX_WINDOW = 1 << 23
HEADER_BYTES = 18  # the longest frame header
MAGIC = b"\x28\xb5\x2f\xfd"


_LOCAL = threading.local()


def decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decoder (making one costs more than decoding a small chunk); each
    `stream_reader` of it starts a fresh frame."""
    found = getattr(_LOCAL, "decompressor", None)
    if found is None:
        import zstandard

        found = _LOCAL.decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
    return found


def header_problem(head: bytes, nar_size: int | None) -> str | None:
    """Why a chunk whose file starts with `head` cannot be a chunk of a NAR of `nar_size`
    bytes, or None."""
    import zstandard

    try:
        params = zstandard.get_frame_parameters(head)
    except zstandard.ZstdError as e:
        return f"is not a zstd frame ({e})"
    if not params.has_checksum:
        return "has no zstd content checksum"
    size = params.content_size
    if nar_size is not None and size not in (zstandard.CONTENTSIZE_UNKNOWN,
                                              zstandard.CONTENTSIZE_ERROR) and size != nar_size:
        return f"declares {size} bytes of content, not the item's {nar_size}"
    if params.window_size > MAX_WINDOW:
        return f"asks for a {params.window_size}-byte window (at most {MAX_WINDOW})"
    return None


class FrameEnd:
    """Follows a zstd frame through its block headers as the compressed bytes go by, to find
    where it ends; what comes after is `trailing` (RFC 8878, sections 3.1.1 and 3.1.1.2).
    Only headers are looked at (block bodies are skipped by their sizes), and only the bytes
    of a header that straddles two pieces are kept."""

    def __init__(self) -> None:
        self.pos = 0  # bytes fed so far
        self.need_at = 0  # offset of the next header
        self.buf = b""  # the start of a header that continues in the next piece
        self.stage = "frame"  # the frame header, then block headers, then the checksum
        self.checksum = False
        self.end: int | None = None  # offset just past the frame
        self.broken: str | None = None

    @property
    def trailing(self) -> int:
        return self.pos - self.end if self.end is not None else 0

    def feed(self, data: bytes) -> None:
        base = self.pos
        self.pos += len(data)
        while self.end is None and self.broken is None and self.need_at < self.pos:
            avail = self.buf + data if self.buf else data[self.need_at - base:]
            size = self._header_size(avail)
            if size is None or len(avail) < size:
                if self.broken is None:
                    self.buf = avail  # at most a header's worth
                return
            self.buf = b""
            self._parse(avail[:size])

    def _header_size(self, avail: bytes) -> int | None:
        if self.stage == "block":
            return 3
        if self.stage == "checksum":
            return 4
        if len(avail) < 5:
            return None
        if avail[:4] != MAGIC:
            self.broken = "not a zstd frame"
            return None
        fhd = avail[4]
        single = (fhd >> 5) & 1
        content_size = [1 if single else 0, 2, 4, 8][fhd >> 6]
        return 4 + 1 + (0 if single else 1) + [0, 1, 2, 4][fhd & 3] + content_size

    def _parse(self, header: bytes) -> None:
        if self.stage == "frame":
            self.checksum = bool((header[4] >> 2) & 1)
            self.need_at += len(header)
            self.stage = "block"
        elif self.stage == "block":
            value = int.from_bytes(header, "little")
            last, kind, size = value & 1, (value >> 1) & 3, value >> 3
            if kind == 3:
                self.broken = "a block of the reserved type"
                return
            self.need_at += 3 + (1 if kind == 1 else size)
            if last:
                self.stage = "checksum"
                if not self.checksum:
                    self.end = self.need_at
        else:
            self.need_at += 4
            self.end = self.need_at
