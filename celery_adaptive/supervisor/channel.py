"""The parent's end of one child's pipes: non-blocking, framed, bounded.

Frames are what billiard's ``Connection.send_bytes`` writes (a 4-byte big-endian signed length,
then the payload), so the child keeps plain blocking ``Connection`` objects while the parent
never blocks on a child: reads go into this channel's own buffer and a partial frame waits
there for the rest; writes that do not fit in the pipe wait in an outbox until it is writable.
A stalled child therefore holds up nothing but itself.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from typing import Any

from celery_adaptive.errors import ProtocolError

_HEADER = struct.Struct("!i")
#: Bytes read per ``os.read``: a pipe holds 64 KiB, so one read usually empties it.
READ_CHUNK = 65536


class FrameDecoder:
    """Splits a byte stream into frames. Pure: bytes in, payloads out."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return every frame now complete. Raises `ProtocolError` on a length
        that is negative or over ``max_frame`` (garbage, or a result too big to take)."""
        self._buffer += data
        frames: list[bytes] = []
        view = self._buffer
        offset = 0
        while len(view) - offset >= _HEADER.size:
            (size,) = _HEADER.unpack_from(view, offset)
            if size < 0 or size > self.max_frame:
                raise ProtocolError(
                    f"frame of {size} bytes announced (limit {self.max_frame}; "
                    "see adaptive_max_message_bytes)"
                )
            end = offset + _HEADER.size + size
            if len(view) < end:
                break
            frames.append(bytes(view[offset + _HEADER.size:end]))
            offset = end
        if offset:
            del self._buffer[:offset]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buffer)


def encode_frame(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload)) + payload


class ChildChannel:
    """Non-blocking framed I/O on a child's two pipes (parent side)."""

    def __init__(self, reader: Any, writer: Any, max_frame: int) -> None:
        # ``reader``/``writer`` are billiard Connections (kept so they close with the channel).
        self._reader_conn = reader
        self._writer_conn = writer
        self.read_fd: int = reader.fileno()
        self.write_fd: int = writer.fileno()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        self._decoder = FrameDecoder(max_frame)
        self._outbox: deque[memoryview] = deque()
        self.eof = False
        self.closed = False

    # -- reading -------------------------------------------------------------------------
    def read_frames(self, max_reads: int = 16) -> list[bytes]:
        """Read what the pipe holds now (bounded) and return the complete frames."""
        frames: list[bytes] = []
        for _ in range(max_reads):
            try:
                data = os.read(self.read_fd, READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.eof = True
                break
            if not data:
                self.eof = True
                break
            frames.extend(self._decoder.feed(data))
            if len(data) < READ_CHUNK:
                break
        return frames

    @property
    def partial_bytes(self) -> int:
        return self._decoder.pending

    # -- writing -------------------------------------------------------------------------
    def send(self, payload: bytes) -> bool:
        """Queue a frame and write what the pipe takes now. True when all of it went out;
        False when some waits for the pipe to become writable (call `flush` then)."""
        if self.closed:
            raise BrokenPipeError("channel closed")
        self._outbox.append(memoryview(encode_frame(payload)))
        return self.flush()

    def flush(self) -> bool:
        """Write queued bytes until the pipe is full. True when nothing is left queued."""
        while self._outbox:
            chunk = self._outbox[0]
            try:
                written = os.write(self.write_fd, chunk)
            except (BlockingIOError, InterruptedError):
                return False
            if written < len(chunk):
                self._outbox[0] = chunk[written:]
                return False
            self._outbox.popleft()
        return True

    @property
    def has_outbox(self) -> bool:
        return bool(self._outbox)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._outbox.clear()
        for conn in (self._reader_conn, self._writer_conn):
            try:
                conn.close()
            except OSError:
                pass

    def fds(self) -> tuple[int, int]:
        return self.read_fd, self.write_fd
