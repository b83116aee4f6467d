"""The server side of the Mail Scanner wire protocol (docs/protocol.md, FPQMAIL/1).

Pure functions and one small state machine, no I/O: the request head is fed in as it
arrives, in chunks of any size, and replies are formatted into bytes. That keeps the
part that handles bytes from strangers easy to test and to fuzz. Which transport a
request came by (descriptors or names) is the connection's business (connection.py).
"""

import re
from dataclasses import dataclass

from fpqmail import envelope as qmail_envelope
from fpqmail.values import printable

MAX_LINE = 4096                  # bytes in one head line, without its line end
MAX_HEADER_LINES = 64            # header lines after the request line
MAX_ENVELOPE = 16 * 1024 * 1024  # bytes of raw envelope
MAX_REPLY = 64 * 1024            # a client treats a longer reply as garbage

# Reply values are capped so that even the longest reply stays far below MAX_REPLY.
MAX_VALUE = 512
MAX_REASON = 200
MAX_THREATS = 100

SCAN, PING = "SCAN", "PING"
ON_VIRUS = ("deliver", "reject", "drop")

# The temp files' names over TCP: fi<pid>.<random> and fo<pid>.<random> (fp-qmail
# draws 16 hex digits; other clients may draw other letters and digits).
SPOOL_NAME = re.compile(r"\Af([io])(\d{1,10}\.[0-9A-Za-z]{8,64})\Z")
_NAME = re.compile(rb"[A-Za-z0-9-]+\Z")
_NUMBER = re.compile(rb"[0-9]{1,19}\Z")
_UID = re.compile(rb"[0-9]{1,10}\Z")
_PRINTABLE = re.compile(rb"[\x20-\x7e]*\Z")
_KNOWN = ("in", "out", "size", "envelope", "on-virus", "caller", "client-ip", "client-host")


class ProtocolError(Exception):
    """The request cannot be served; str() is the Reason for the ERROR reply."""


@dataclass(frozen=True)
class Request:
    command: str                 # SCAN or PING
    size: int = 0                # SCAN: bytes the client wrote to In
    envelope_size: int = 0       # SCAN: bytes of raw envelope that follow the head
    in_path: str | None = None   # TCP only: the names of In and Out
    out_path: str | None = None
    on_virus: str | None = None  # deliver, reject or drop, if the client said
    caller: int | None = None    # the real uid that ran fp-qmail, if the client said
    client_ip: str | None = None     # the SMTP client, if the client said
    client_host: str | None = None


class Envelope:
    """qmail's envelope, F<sender>\\0, T<recipient>\\0 per recipient, \\0, kept as the
    raw bytes it came as: a request may carry millions of recipients, and nothing on a
    request's way needs one Python object per recipient. `recipients` splits them
    only when asked (the quarantine's metadata)."""

    __slots__ = ("_raw",)

    def __init__(self, sender: bytes, recipients=()):
        self._raw = b"F" + sender + b"\0" + b"".join(b"T" + r + b"\0" for r in recipients) + b"\0"

    @classmethod
    def from_raw(cls, raw):
        """raw (bytes or bytearray, kept as it is) after the check qmail-queue makes;
        ProtocolError if it is not one whole envelope."""
        problem, length = qmail_envelope.check(raw)
        if problem or length != len(raw):
            raise ProtocolError("malformed envelope")
        envelope = cls.__new__(cls)
        envelope._raw = raw
        return envelope

    @property
    def sender(self) -> bytes:
        return bytes(self._raw[1:self._raw.index(b"\0")])

    @property
    def recipient_count(self) -> int:
        return self._raw.count(b"\0T")  # a NUL ends every address: "\0T" starts a recipient

    @property
    def recipients(self) -> tuple:
        return tuple(bytes(f[1:]) for f in bytes(self._raw[:-2]).split(b"\0")[1:])

    def distinct_recipients(self, stretch=1 << 16):
        """The recipients, without the repeats within each stretch of about `stretch`
        bytes of the envelope (one may come again in a later stretch): each stretch is
        split and deduplicated at C speed, so a million copies of one address cost a few
        hundred set operations, not a million steps, and never all of them at once."""
        raw = self._raw
        start = raw.index(b"\0") + 1  # the first recipient's T
        stop = len(raw) - 1           # the envelope's final NUL
        while start < stop:
            end = raw.index(b"\0", min(start + stretch, stop - 1))  # the NUL of a recipient
            yield from set(bytes(raw[start + 1:end]).split(b"\0T"))
            start = end + 1

    def iter_recipients(self):
        """The recipients one at a time, never all of them at once."""
        raw = self._raw
        start = raw.index(b"\0") + 1
        while raw[start:start + 1] == b"T":
            end = raw.index(b"\0", start)
            yield bytes(raw[start + 1:end])
            start = end + 1

    def raw(self) -> bytes:
        """The envelope as qmail-queue reads it on fd 1."""
        return bytes(self._raw)

    def __len__(self):
        return len(self._raw)

    def __eq__(self, other):
        return isinstance(other, Envelope) and self._raw == other._raw

    def __repr__(self):
        return f"<Envelope from {printable(self.sender, 80)!r}, {self.recipient_count} recipients>"


def parse_envelope(raw) -> Envelope:
    """qmail's envelope (fpqmail.envelope's rules), kept raw; ProtocolError if malformed."""
    return Envelope.from_raw(raw)


class HeadReader:
    """Collects the request head (request line, header lines, blank line) from chunks.

    feed() returns the Request once the blank line has arrived, None while more is
    needed, and raises ProtocolError as soon as the bytes so far break a rule, so a
    client cannot make the server buffer more than the limits allow. `command` is
    known as soon as the request line is (a server may refuse a SCAN at once). The
    bytes that followed the blank line (the start of the envelope) are left in `rest`.
    """

    def __init__(self):
        self._buf = bytearray()
        self._pos = 0          # start of the first line not yet checked
        self._lines = []       # complete header lines, line ends stripped
        self.command = None
        self.rest = b""

    @property
    def buffered(self):
        """Bytes held so far (what the server counts against its memory budget)."""
        return len(self._buf)

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
            if self.command is None:
                self.command = _request_line(line)
            elif not line:
                self.rest = bytes(self._buf[self._pos:])
                self._buf = bytearray()
                return _request(self.command, self._lines)
            elif len(self._lines) >= MAX_HEADER_LINES:
                raise ProtocolError("malformed request: too many header lines")
            else:
                self._lines.append(line)


def _request_line(line):
    version, _, command = line.partition(b" ")
    if not version.startswith(b"FPQMAIL/"):
        raise ProtocolError("malformed request: not FPQMAIL")
    if version != b"FPQMAIL/1":
        raise ProtocolError("unsupported version")
    if command not in (b"SCAN", b"PING"):
        raise ProtocolError("malformed request: unknown command")
    return command.decode("ascii")


def _request(command, lines) -> Request:
    seen = _headers(lines)
    if command == PING:
        return Request(PING)
    missing = [k for k in ("size", "envelope") if k not in seen]
    if missing:
        raise ProtocolError("malformed request: missing " + ", ".join(k.capitalize() for k in missing))
    for key in ("size", "envelope"):
        if not _NUMBER.match(seen[key]):
            raise ProtocolError(f"malformed request: {key.capitalize()} is not a decimal number")
    envelope_size = int(seen["envelope"])
    if envelope_size > MAX_ENVELOPE:
        raise ProtocolError("malformed request: envelope too large")
    if ("in" in seen) != ("out" in seen):
        raise ProtocolError("malformed request: In and Out go together")
    on_virus = seen.get("on-virus")
    if on_virus is not None and on_virus.decode("ascii") not in ON_VIRUS:
        raise ProtocolError("malformed request: On-Virus is not deliver, reject or drop")
    caller = seen.get("caller")
    if caller is not None and not (_UID.match(caller) and int(caller) < 1 << 32):
        raise ProtocolError("malformed request: Caller is not a uid")

    def text(key):
        value = seen.get(key)
        return value.decode("ascii") if value else None
    return Request(SCAN, int(seen["size"]), envelope_size, text("in"), text("out"), text("on-virus"),
                   int(caller) if caller is not None else None, text("client-ip"), text("client-host"))


def _headers(lines):
    """{known lower-case name: value bytes}; unknown names are checked, then ignored."""
    seen = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not _NAME.match(name):
            raise ProtocolError("malformed request: bad header line")
        value = value.strip(b" \t")
        if not _PRINTABLE.match(value):
            raise ProtocolError("malformed request: header value not printable ASCII")
        key = name.lower().decode("ascii")
        if key not in _KNOWN:
            continue  # a later minor version's header: ignored, as the protocol says
        if key in seen:
            raise ProtocolError(f"malformed request: {name.decode()} given twice")
        seen[key] = value
    return seen


def format_reply(status: str, headers=()) -> bytes:
    """FPQMAIL/1 <status>, the headers (name, value) in order, the blank line.

    Values are made printable ASCII and cut to MAX_VALUE (a Reason to MAX_REASON); past MAX_THREATS Threat
    headers the rest are left out (the X-Antivirus header in the message names them)."""
    lines = [f"FPQMAIL/1 {status}"]
    threats = 0
    for name, value in headers:
        if name == "Threat":
            threats += 1
            if threats > MAX_THREATS:
                continue
        lines.append(f"{name}: {printable(value)[:MAX_REASON if name == 'Reason' else MAX_VALUE]}")
    reply = ("\n".join(lines) + "\n\n").encode("ascii")
    assert len(reply) <= MAX_REPLY
    return reply


def error_reply(reason: str) -> bytes:
    return format_reply("ERROR", [("Reason", reason)])
