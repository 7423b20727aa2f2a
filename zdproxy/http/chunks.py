"""Chunk sizes of a chunked body, checked against a bound. Sans-IO.

llhttp accepts any chunk size up to 2**64 - 1 (``ffffffffffffffff``) and
httptools does not report the sizes it parsed, so a small follower walks the
same bytes: it reads each chunk-size line and skips the chunk's data by
arithmetic, so a read costs one ``find`` per chunk that starts in it, never a
pass over the data. It stops at the last chunk (size 0); the trailer section
and anything malformed are left to llhttp, which refuses what is invalid.
"""

from __future__ import annotations

from typing import Final

#: chunk sizes above this are refused: 1 TiB, far beyond any real chunk, far
#: below the 2**63 where peers' signed arithmetic goes wrong
MAX_CHUNK_SIZE: Final = 1 << 40

#: bytes of a chunk-size line kept while its end has not arrived; a size needs
#: at most 11 hex digits below the bound, so a longer run of them is refused
_LINE_KEEP: Final = 64
_HEX = b"0123456789abcdefABCDEF"


class ChunkSizeGuard:
    """Follows one chunked body; :meth:`feed` is False once a size is too large."""

    __slots__ = ("done", "left", "limit", "line")

    def __init__(self, limit: int = MAX_CHUNK_SIZE) -> None:
        self.limit = limit
        #: bytes of the current chunk's data (and its CRLF) still to skip
        self.left = 0
        #: the start of a chunk-size line whose end is in a later read
        self.line = b""
        #: the last chunk was seen: nothing more to check
        self.done = False

    def feed(self, data: bytes | bytearray, start: int = 0) -> bool:
        """Walk ``data[start:]``, the next bytes of the body; False: a size is too large."""
        end = len(data)
        pos = start
        while pos < end and not self.done:
            left = self.left
            if left:
                step = min(left, end - pos)
                self.left = left - step
                pos += step
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self.line += data[pos : pos + _LINE_KEEP - len(self.line)]
                return len(self.line) < _LINE_KEEP or not self._too_long(self.line)
            line = self.line + data[pos:newline] if self.line else data[pos:newline]
            self.line = b""
            size = self._size(line)
            if size is None:
                return False
            if size == 0:
                self.done = True
            self.left = size + 2  # the data, then its CRLF
            pos = newline + 1
        return True

    def _size(self, line: bytes | bytearray) -> int | None:
        """The chunk size a line declares; None when it is above the bound."""
        digits = line.split(b";", 1)[0].rstrip(b"\r")
        if self._too_long(digits):
            return None
        try:
            size = int(digits, 16)
        except ValueError:
            # not a size llhttp accepts either: it refuses the body; stop following
            self.done = True
            return 0
        return size if size <= self.limit else None

    @staticmethod
    def _too_long(line: bytes | bytearray) -> bool:
        """A run of hex digits too long for any size under the bound (leading zeros
        included: ``0000...1`` is refused once it is this long)."""
        return len(line) >= _LINE_KEEP and not bytes(line[:_LINE_KEEP]).translate(None, _HEX)
