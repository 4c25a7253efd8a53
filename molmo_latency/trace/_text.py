"""Cut the text of a Kineto trace into chunks of whole events, plain or gzipped.

Part of the trace reader (collect/hold). The streaming path maps a plain file (consumed pages are
handed back) or inflates a gzipped one block by block, and cuts the ``traceEvents`` array
between two events every ~2 MiB; the whole-text paths (:func:`_decode_fast`,
:func:`_decode_slow`) read an array already in memory and are the fallback. See
:mod:`molmo_latency.trace.reader`.
"""

from __future__ import annotations

import mmap
import os
import re
import zlib
from pathlib import Path

import msgspec
import polars as pl

from molmo_latency.errors import TraceError
from molmo_latency.trace._events import (
    _FAST_DECODER,
    _RAW_LIST_DECODER,
    _SLOW_DECODER,
    _TOP_DECODER,
    _checked_frames,
    _Chunks,
    _Settled,
    _event_error,
    _one_line,
    _OutOfRange,
    _Top,
)

# A candidate boundary between two events of the traceEvents array: `}` `,` `{` with JSON
# whitespace between (Kineto writes "},\n  {"). A candidate inside a string or a nested object
# leaves a chunk with unbalanced brackets, which fails to decode; we then try the next one.
_BOUNDARY = re.compile(rb"\}[ \t\r\n]*,[ \t\r\n]*\{")
_CHUNK_BYTES = 2 << 20
_WHITESPACE = b" \t\r\n"
_CHUNK_EVENTS = 32_768  # events per chunk of the per-event (slow) path


class _NotFast(Exception):
    """The fast path cannot read this array; the slow path will (or will say precisely why not)."""


_EVENTS_KEY = re.compile(rb'"traceEvents"[ \t\r\n]*:[ \t\r\n]*\[')
_ARRAY_END = re.compile(rb"\}[ \t\r\n]*\]")
_READ_BYTES = 1 << 20
_HEADER_LIMIT = 16 << 20  # a header this long before traceEvents: not a Kineto trace, read it whole
_EVENT_LIMIT = 32 << 20  # an "event" this long (e.g. a gzip bomb of spaces): read it whole (capped there)
_NON_SPACE = re.compile(rb"[^ \t\r\n]")
_RELEASE_BYTES = 8 << 20  # hand consumed pages of a mapped file back every this many bytes


class _MappedText:
    """A plain file, memory-mapped: no copy of the text; consumed pages are handed back."""

    eof = True

    def __init__(self, f, size: int) -> None:
        self.buf = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
        self.pos = self.released = 0

    def need(self, size: int) -> None:
        pass

    def avail(self) -> int:
        return len(self.buf) - self.pos

    def consume(self, size: int) -> None:
        self.pos += size
        if self.pos - self.released >= _RELEASE_BYTES and hasattr(mmap, "MADV_DONTNEED"):
            upto = self.pos - self.pos % mmap.PAGESIZE
            self.buf.madvise(mmap.MADV_DONTNEED, self.released, upto - self.released)
            self.released = upto

    def close(self) -> None:
        self.buf.close()


class _GzipText:
    """A gzipped file, inflated block by block; only the unconsumed text is kept."""

    def __init__(self, f) -> None:
        self.f, self.buf, self.pos, self.eof = f, b"", 0, False
        self.inflate = zlib.decompressobj(wbits=31)

    def need(self, size: int) -> None:
        if self.eof or len(self.buf) - self.pos >= size:
            return
        parts, have = [self.buf[self.pos:]], len(self.buf) - self.pos
        while have < size and not self.eof:
            block = self._inflated()
            parts.append(block)
            have += len(block)
        self.buf, self.pos = b"".join(parts), 0

    def _inflated(self) -> bytes:
        try:
            while True:
                if self.inflate.eof:  # a member ended: another may follow (gzip allows several)
                    data = self.inflate.unused_data or self.f.read(_READ_BYTES)
                    if not data:
                        self.eof = True
                        return b""
                    self.inflate = zlib.decompressobj(wbits=31)
                else:
                    data = self.inflate.unconsumed_tail or self.f.read(_READ_BYTES)
                    if not data:
                        raise _NotFast  # truncated gzip: the whole-text path says so
                out = self.inflate.decompress(data, _READ_BYTES)
                if out:
                    return out
        except (OSError, zlib.error, EOFError):
            raise _NotFast from None

    def avail(self) -> int:
        return len(self.buf) - self.pos

    def consume(self, size: int) -> None:
        self.pos += size

    def close(self) -> None:
        pass


def _open_text(f):
    head = f.read(2)
    f.seek(0)
    if head == b"\x1f\x8b":
        return _GzipText(f)
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        raise _NotFast
    try:
        return _MappedText(f, size)
    except (OSError, ValueError):
        raise _NotFast from None


def _stream(path: Path) -> tuple[_Top, list[dict[str, pl.DataFrame]], int]:
    """Read a trace holding only ~one chunk of its text at a time (plain: mapped; gzip: inflated
    block by block).

    The text before ``"traceEvents": [`` is the header; chunks are cut between events as in
    :func:`_decode_fast`; after the last event comes ``]`` and the tail. Header, ``null`` and
    tail must then decode as the trace's metadata object. Anything else (a bare event list, an
    odd layout, a decode error) raises _NotFast and the caller reads the file whole.
    """
    try:
        f = open(path, "rb")
    except OSError:
        raise _NotFast from None
    with f:
        try:
            text = _open_text(f)
        except OSError:
            raise _NotFast from None
        try:
            return _stream_text(text)
        finally:
            text.close()


def _stream_text(text) -> tuple[_Top, list[dict[str, pl.DataFrame]], int]:
    def find(pattern: re.Pattern, start: int):
        """`pattern` in the unconsumed text from `start` (relative); the match's relative span."""
        match = pattern.search(text.buf, text.pos + start)
        return None if match is None else (match.start() - text.pos, match.end() - text.pos)

    def copy(start: int, end: int) -> bytes:
        with memoryview(text.buf) as view:
            return bytes(view[text.pos + start:text.pos + end])

    key = None
    while key is None:
        text.need(text.avail() + _READ_BYTES)
        key = find(_EVENTS_KEY, 0)
        if key is None and (text.eof or text.avail() > _HEADER_LIMIT):
            raise _NotFast
    header = copy(0, key[0])
    if not header.lstrip(_WHITESPACE).startswith(b"{"):
        raise _NotFast
    text.consume(key[1])

    chunks, count = _Settled(), 0
    search_from, end_from, attempts, done = None, 0, 0, False
    while not done:
        text.need(_CHUNK_BYTES + _READ_BYTES)
        if search_from is None:
            first = find(_NON_SPACE, 0)
            if first is None:
                raise _NotFast
            if text.buf[text.pos + first[0]] == ord("]"):  # an empty array (or, after a cut, malformed)
                if count:
                    raise _NotFast
                tail = copy(first[1], text.avail())
                break
            search_from = min(_CHUNK_BYTES, text.avail())
        match = find(_BOUNDARY, search_from)
        if match is None and not text.eof:
            if text.avail() > _EVENT_LIMIT:  # no event is this long: the whole-text path words it
                raise _NotFast
            text.need(text.avail() + _READ_BYTES)  # an event longer than a chunk: read on
            continue
        if match is not None:
            events, buf = _try_decode(text, match[0] + 1)
            consumed = match[1] - 1
        else:  # the last chunk: find the `]` that closes the array
            end = find(_ARRAY_END, end_from)
            if end is None:
                raise _NotFast
            events, buf = _try_decode(text, end[0] + 1)
            consumed, done = end[1], events is not None
        if events is None:  # a cut inside a string or an object (or in the tail): try the next one
            attempts += 1
            if attempts > 16:
                raise _NotFast
            if match is not None:
                search_from = match[1]
            else:
                end_from = end[1]
            continue
        if done:
            tail = copy(consumed, text.avail())
        count += len(events)
        try:
            chunks.add(events, buf, fast=True)
        except _OutOfRange:
            raise _NotFast from None
        del events, buf
        text.consume(consumed)
        search_from, end_from, attempts = None, 0, 0
    chunks.flush()
    try:
        meta = _TOP_DECODER.decode(header + b'"traceEvents": null' + tail)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        raise _NotFast from None
    return meta, chunks, count


def _try_decode(text, cut: int) -> tuple[list | None, bytes]:
    with memoryview(text.buf) as view:
        buf = b"".join((b"[", view[text.pos:text.pos + cut], b"]"))
    try:
        return _FAST_DECODER.decode(buf), buf
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        return None, buf



def _decode_fast(array: memoryview) -> tuple[list[dict[str, pl.DataFrame]], int]:
    """Decode the traceEvents array in ~8 MiB chunks cut between events, without a per-event split."""
    end = len(array)
    while end and array[end - 1] in _WHITESPACE:
        end -= 1
    if end < 2 or array[end - 1] != ord("]"):
        raise _NotFast
    pos, end = 1, end - 1  # inside the brackets
    chunks, count = _Chunks(), 0
    while pos < end:
        search_from = pos + _CHUNK_BYTES
        for _attempt in range(4):
            match = _BOUNDARY.search(array, search_from, end) if search_from < end else None
            cut, following = (match.start() + 1, match.end() - 1) if match else (end, end)
            buf = b"".join((b"[", array[pos:cut], b"]"))
            try:
                events = _FAST_DECODER.decode(buf)
            except msgspec.DecodeError:  # malformed: the cut may be inside a string or an object
                if match is None:
                    raise _NotFast from None
                search_from = match.end()
                continue
            except (msgspec.ValidationError, UnicodeDecodeError):  # the text itself: slow path
                raise _NotFast from None
            break
        else:
            raise _NotFast
        count += len(events)
        try:
            chunks.append(_checked_frames(events, buf, fast=True, names=chunks.names))
        except _OutOfRange:
            raise _NotFast from None  # the slow path reports it with the event index
        del events, buf
        pos = following
    return chunks, count


def _decode_slow(path: Path, array: memoryview) -> tuple[list[dict[str, pl.DataFrame]], int]:
    """Split per event, decode untagged events in chunks; errors name the event index."""
    try:
        raws = _RAW_LIST_DECODER.decode(array)
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not valid UTF-8 ({exc.reason}); the file is corrupt") from None
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise TraceError(
            f"{path}: traceEvents is not valid JSON ({_one_line(exc)}); the file is truncated or corrupt"
        ) from None
    chunks = _Chunks()
    for offset in range(0, len(raws), _CHUNK_EVENTS):
        buf = b"".join((b"[", b",".join(raws[offset:offset + _CHUNK_EVENTS]), b"]"))
        try:
            events = _SLOW_DECODER.decode(buf)
        except UnicodeDecodeError as exc:
            raise TraceError(f"{path}: not valid UTF-8 ({exc.reason}); the file is corrupt") from None
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise TraceError(
                f"{path}: {_event_error(exc, offset)}; the trace is corrupt or not from torch.profiler"
            ) from None
        try:
            chunks.append(_checked_frames(events, buf, fast=False, names=chunks.names))
        except _OutOfRange as exc:
            raise TraceError(
                f"{path}: {exc} (in traceEvents[{offset}:{offset + len(events)}]); the trace is corrupt"
            ) from None
    return chunks, len(raws)


