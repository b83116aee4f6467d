"""The server side of the Mail Scanner wire protocol (docs/protocol.md, FPQMAIL/1).

Pure functions and one small state machine, no I/O: the request is fed in as it
arrives, in chunks of any size, and replies are formatted into bytes. That keeps the
part that handles bytes from strangers easy to test and to fuzz.
"""

import re
from dataclasses import dataclass

from fpqmail import envelope as qmail_envelope
from fpqmail.values import printable

MAX_LINE = 4096                  # bytes in one head line, without its line end
MAX_HEADER_LINES = 64            # header lines after the request line
MAX_ENVELOPE = 64 * 1024 * 1024  # bytes of raw envelope
MAX_REPLY = 64 * 1024            # a client treats a longer reply as garbage

# Reply values are capped so that even the longest reply stays far below MAX_REPLY.
MAX_VALUE = 512
MAX_THREATS = 100

# The temp files' names: fi<pid>.<random> and fo<pid>.<random> (fp-qmail draws 16 hex
# digits; other clients may draw other letters and digits).
SPOOL_NAME = re.compile(r"\Af([io])(\d{1,10}\.[0-9A-Za-z]{8,64})\Z")
_NAME = re.compile(rb"[A-Za-z0-9-]+\Z")
_NUMBER = re.compile(rb"[0-9]{1,19}\Z")
_PRINTABLE = re.compile(rb"[\x20-\x7e]*\Z")
_REQUIRED = ("in", "out", "size", "envelope")


class ProtocolError(Exception):
    """The request cannot be served; str() is the Reason for the ERROR reply."""


@dataclass(frozen=True)
class Request:
    in_path: str
    out_path: str
    size: int           # bytes the client wrote to In
    envelope_size: int  # bytes of raw envelope that follow the head
    on_virus: str | None = None  # deliver, reject or drop: what the client does with a virus


@dataclass(frozen=True)
class Envelope:
    sender: bytes
    recipients: tuple[bytes, ...]

    def raw(self) -> bytes:
        """The envelope as qmail-queue reads it on fd 1."""
        return b"F" + self.sender + b"\0" + b"".join(b"T" + r + b"\0" for r in self.recipients) + b"\0"


class HeadReader:
    """Collects the request head (request line, header lines, blank line) from chunks.

    feed() returns the Request once the blank line has arrived, None while more is
    needed, and raises ProtocolError as soon as the bytes so far break a rule, so a
    client cannot make the server buffer more than the limits allow. The bytes that
    followed the blank line (the start of the envelope) are left in `rest`.
    """

    def __init__(self):
        self._buf = bytearray()
        self._pos = 0          # start of the first line not yet checked
        self._lines = []       # complete head lines, line ends stripped
        self.rest = b""

    def feed(self, data) -> Request | None:
        self._buf += data
        while True:
            nl = self._buf.find(b"\n", self._pos)
            if nl < 0:
                if len(self._buf) - self._pos > MAX_LINE + 1:  # + 1: room for a CR
                    raise ProtocolError("malformed request: line too long")
                return None
            line = bytes(self._buf[self._pos:nl])
            if line.endswith(b"\r"):
                line = line[:-1]
            self._pos = nl + 1
            if len(line) > MAX_LINE:
                raise ProtocolError("malformed request: line too long")
            if not self._lines:
                _check_request_line(line)
            elif not line:
                self.rest = bytes(self._buf[self._pos:])
                return _parse_headers(self._lines[1:])
            elif len(self._lines) > MAX_HEADER_LINES:
                raise ProtocolError("malformed request: too many header lines")
            self._lines.append(line)


def _check_request_line(line):
    version, _, command = line.partition(b" ")
    if not version.startswith(b"FPQMAIL/"):
        raise ProtocolError("malformed request: not FPQMAIL")
    if version != b"FPQMAIL/1":
        raise ProtocolError("unsupported version")
    if command != b"SCAN":
        raise ProtocolError("malformed request: unknown command")


def _parse_headers(lines) -> Request:
    seen = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not _NAME.match(name):
            raise ProtocolError("malformed request: bad header line")
        value = value.strip(b" \t")
        if not _PRINTABLE.match(value):
            raise ProtocolError("malformed request: header value not printable ASCII")
        key = name.lower().decode("ascii")
        if key not in _REQUIRED + ("on-virus",):
            continue  # a later minor version's header: ignored, as the protocol says
        if key in seen:
            raise ProtocolError(f"malformed request: {name.decode()} given twice")
        seen[key] = value
    missing = [k for k in _REQUIRED if k not in seen]
    if missing:
        raise ProtocolError("malformed request: missing " + ", ".join(k.capitalize() for k in missing))
    for key in ("size", "envelope"):
        if not _NUMBER.match(seen[key]):
            raise ProtocolError(f"malformed request: {key.capitalize()} is not a decimal number")
    envelope_size = int(seen["envelope"])
    if envelope_size > MAX_ENVELOPE:
        raise ProtocolError("malformed request: envelope too large")
    on_virus = seen.get("on-virus", b"").decode("ascii") or None
    if on_virus not in (None, "deliver", "reject", "drop"):
        raise ProtocolError("malformed request: On-Virus is not deliver, reject or drop")
    return Request(seen["in"].decode("ascii"), seen["out"].decode("ascii"),
                   int(seen["size"]), envelope_size, on_virus)


def parse_envelope(raw: bytes) -> Envelope:
    """qmail's envelope (fpqmail.envelope): F<sender>\\0, T<recipient>\\0 per recipient, \\0."""
    try:
        sender, recipients = qmail_envelope.split(raw)
    except ValueError:
        raise ProtocolError("malformed envelope") from None
    return Envelope(sender, tuple(recipients))


def format_reply(status: str, headers=()) -> bytes:
    """FPQMAIL/1 <status>, the headers (name, value) in order, the blank line.

    Values are made printable ASCII and cut to MAX_VALUE; past MAX_THREATS Threat
    headers the rest are left out (the X-Antivirus header in the message names them)."""
    lines = [f"FPQMAIL/1 {status}"]
    threats = 0
    for name, value in headers:
        if name == "Threat":
            threats += 1
            if threats > MAX_THREATS:
                continue
        lines.append(f"{name}: {printable(value)[:MAX_VALUE]}")
    reply = ("\n".join(lines) + "\n\n").encode("ascii")
    assert len(reply) <= MAX_REPLY
    return reply


def error_reply(reason: str) -> bytes:
    return format_reply("ERROR", [("Reason", reason)])

