"""Reading a split (byte ranges of files) as byte chunks or as text lines, without holding it in memory."""
from __future__ import annotations

import codecs
import io
from collections.abc import Iterator

from ds_topkast.lm.data.corpus_sources import CorpusError, Split

CHUNK = 1 << 24
TEXT_MODES_FIX = "word and tokenizer modes need text: use data.tokenizer 'bytes' or convert the files"
BYTES_MODE_FIX = "check data.path, or set data.binary: true to model its raw bytes anyway"


class _RangesReader(io.RawIOBase):
    """A readable stream of the bytes of several file ranges, one after another."""

    def __init__(self, ranges: Split):
        self._pending, self._file, self._left = list(ranges), None, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._left == 0:
            if self._file is not None:
                self._file.close()
                self._file = None
            if not self._pending:
                return 0
            part = self._pending.pop(0)
            self._file = part.path.open("rb")
            self._file.seek(part.start)
            self._left = part.end - part.start
        read = self._file.readinto(memoryview(buffer)[:min(len(buffer), self._left)])
        if not read:
            raise CorpusError(f"{self._file.name} became shorter while it was read; prepare the corpus again.")
        self._left -= read
        return read

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        super().close()


def byte_chunks(split: Split) -> Iterator[bytes]:
    """The split's bytes in chunks of CHUNK."""
    with io.BufferedReader(_RangesReader(split), CHUNK) as reader:
        while chunk := reader.read(CHUNK):
            yield chunk


def text_lines(split: Split, source: str) -> Iterator[str]:
    """The split's lines as Python's text files give them (newline "\\n", "\\r\\n" or "\\r"), newline kept."""
    with io.TextIOWrapper(io.BufferedReader(_RangesReader(split), CHUNK), encoding="utf-8", newline=None) as text:
        try:
            yield from text
        except UnicodeDecodeError as err:
            raise CorpusError(f"Corpus {source} is not UTF-8 text ({err.reason}); {TEXT_MODES_FIX}.") from None


def checked_text_bytes(chunks: Iterator[bytes], source: str) -> Iterator[bytes]:
    """Byte-level mode models text: a NUL byte or invalid UTF-8 means the path names the wrong files."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    for chunk in chunks:
        nul = chunk.find(b"\x00")
        if nul >= 0:
            raise CorpusError(f"Corpus {source} looks binary, not text (a NUL byte at offset {offset + nul}); "
                              f"{BYTES_MODE_FIX}.")
        try:
            decoder.decode(chunk)
        except UnicodeDecodeError as err:
            raise CorpusError(f"Corpus {source} is not UTF-8 text (byte {offset + err.start}: {err.reason}); "
                              f"{BYTES_MODE_FIX}.") from None
        offset += len(chunk)
        yield chunk
