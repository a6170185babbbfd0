"""SMTP's wire form of a message, for both sides of relayd: reading DATA from
a client (smtp.py) and writing it to an upstream (upstream.py).

* Transparency (RFC 5321 4.5.2): ``stuff``/``unstuff`` add or remove the dot
  that starts a line beginning with one. relayd keeps a message in the form
  it was received (still stuffed), so the common case relays it with three
  C-speed counts and no copy (``wire_data``).
* Line endings: only CRLF ends a line. ``normalize_line_endings`` turns a
  bare CR or LF into CRLF before a message goes upstream, which also defuses
  SMTP smuggling downstream (a bare "\\n.\\n" never reaches an upstream as a
  line holding a lone dot).
* Framing: ``read_data`` reads a client's DATA up to <CRLF>.<CRLF> in bulk
  (aiosmtpd reads and unstuffs it line by line, ~5-9 ms of CPU per 100 KB),
  with the size limit applied while reading, through ``ClientReader``: a
  StreamReader that also remembers how the last command line ended and can
  stop serving input once relayd has decided to close.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

END = b"\r\n.\r\n"
# Bytes read from the client per call during DATA. StreamReader pauses the
# transport once its buffer exceeds twice its limit (the line length), so
# its buffer never holds more than that plus one transport read (64 KiB on
# asyncio, 256 KiB on uvloop): one read of this size always empties it,
# which is what ClientReader.unread relies on.
DATA_CHUNK = 1 << 20
# Bytes read past the size limit before giving up on keeping the data: dot
# stuffing adds one byte per line starting with '.', so the raw size may
# exceed the message size a little.
DATA_SLACK = 64 * 1024

_LINE_END = re.compile(rb"\r\n|\n|\r(?!\n)")


class ClientReader(asyncio.StreamReader):
    """The client's stream. ``bare_lf``: whether the last line read with
    ``readuntil`` ended in a bare LF (aiosmtpd strips line endings, so
    "DATA\\n" would open DATA like "DATA\\r\\n": SMTP smuggling). After
    ``stop()`` nothing more is served, buffered input included: once relayd
    has said 421 (too many errors, a lockout), no command the client
    pipelined behind it may run."""

    bare_lf = False
    stopped = False
    # Told every line read (protolog.py); ``secret`` while an AUTH answer is read.
    on_line: Callable[[bytes, bool], None] | None = None
    secret = False

    def stop(self) -> None:
        self.stopped = True

    def _check(self) -> None:
        if self.stopped:
            # aiosmtpd's command loop takes this as the connection gone.
            raise ConnectionResetError("relayd closed the connection")

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        self._check()
        line = await super().readuntil(separator)
        self.bare_lf = not line.endswith(b"\r\n")
        if self.on_line is not None:
            self.on_line(line, self.secret)
        return line

    async def read(self, n: int = -1) -> bytes:
        self._check()
        return await super().read(n)

    def unread(self, data: bytes) -> None:
        """Give back ``data`` read past the end of DATA (pipelined commands,
        RFC 2920). Only right after a read of DATA_CHUNK that came back
        shorter, when the buffer is empty, so the order is kept; after the
        client's EOF the data is dropped, the connection is closing."""
        if data and not self.at_eof():
            self.feed_data(data)


async def read_data(reader: ClientReader, limit: int,
                    progress: Callable[[], None] | None = None) -> bytes | None:
    """Read a DATA body up to <CRLF>.<CRLF>: the message in wire form (still
    dot-stuffed, lines as received, without the end marker), or None when it
    is larger than ``limit`` (what came past it was discarded, not kept).
    Raises asyncio.IncompleteReadError when the client goes away.
    ``progress()`` is called after every chunk (the idle timer)."""
    # A virtual CRLF before the first line lets one search find the end
    # marker whether or not the body is empty.
    buf = bytearray(b"\r\n")
    scan = 0
    oversize = False
    while True:
        chunk = await reader.read(DATA_CHUNK)
        if not chunk:
            raise asyncio.IncompleteReadError(bytes(buf[2:]), None)
        if progress is not None:
            progress()
        buf += chunk
        end = buf.find(END, scan)
        if end >= 0:
            reader.unread(bytes(buf[end + 5:]))
            del buf[end + 2:]
            break
        if len(buf) > limit + DATA_SLACK:
            oversize = True
            del buf[:-4]      # keep enough to spot a marker split across reads
        scan = max(len(buf) - 4, 0)
    if oversize:
        return None
    del buf[:2]
    # The limit is on the message, not on its stuffed form: one byte per line
    # starting with a dot is not the client's (counted only when close).
    if len(buf) > limit and unstuffed_size(buf) > limit:
        return None
    return bytes(buf)


def normalize_line_endings(message: bytes) -> bytes:
    """Every bare CR or LF becomes CRLF; the message ends with CRLF."""
    message = _LINE_END.sub(b"\r\n", message)
    return message if message.endswith(b"\r\n") else message + b"\r\n"


def wire_data(message: bytes, *, stuffed: bool = False) -> tuple[bytes, ...]:
    """The bytes to send after DATA: CRLF line endings, dot-stuffed (RFC 5321
    4.5.2), ending with <CRLF>.<CRLF>.

    ``stuffed``: ``message`` is already in wire form, as relayd received it:
    then the common case costs three C-speed counts and no copy. A plain
    message is stuffed with one bytes.replace. Only a message with a bare CR
    or LF is normalised (unstuffed first, stuffed again after)."""
    crlf = message.count(b"\r\n")
    if message.count(b"\n") != crlf or message.count(b"\r") != crlf:
        if stuffed:
            message, stuffed = unstuff(message), False
        message = normalize_line_endings(message)
    if not stuffed:
        message = stuff(message)
    if message and not message.endswith(b"\r\n"):
        return message, b"\r\n.\r\n"
    return message, b".\r\n"


def stuff(message: bytes) -> bytes:
    """Dot-stuff a message whose lines end in CRLF (RFC 5321 4.5.2)."""
    if b"\r\n." in message:
        message = message.replace(b"\r\n.", b"\r\n..")
    return b"." + message if message.startswith(b".") else message


def unstuff(wire: bytes) -> bytes:
    """Undo dot-stuffing: the first dot of every line that starts with one
    (lines end in CRLF only, as relayd's DATA reader reads them)."""
    if b"\r\n.." in wire:
        wire = wire.replace(b"\r\n..", b"\r\n.")
    return wire[1:] if wire.startswith(b"..") else wire


def unstuffed_size(wire: bytes | bytearray) -> int:
    """``len(unstuff(wire))`` without making the copy: one count, one byte
    per stuffed line (the message size of SPEC 3.17 and of the SIZE limit)."""
    return len(wire) - wire.count(b"\r\n..") - wire.startswith(b"..")
