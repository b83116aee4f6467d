"""F-PROT 6's scanning daemon fpscand (TCP, by default 127.0.0.1:10200).

Per object: `SCAN STREAM <name> SIZE <n>\\n` then exactly n bytes. fpscand answers one
line per scanned object, `<code> <<text>> <object>`, archive members as
`<name>-><member>`, the line for the stream itself last; then `QUIT\\n` ends the session.
The code is a bit field: 1 infected, 2 suspicious, 4 interrupted, 8 skipped by a scan
restriction, 16 I/O error, 32 engine error, 64 not scanned but clean, 128 disinfected.
F-PROT's own documentation calls its MIME support minimal and asks clients to decode
attachments themselves, so examine() sends fpscand decoded parts, one stream each, all
of one message on one connection.
"""

import re

from . import Engine, EngineError
from .endpoints import Endpoints
from .. import deadline as time_limit
from ..settings import number

INFECTED = 1 | 2
# Not a complete scan: never a clean verdict. 128 (disinfected) only comes with a
# disinfection option, which is never sent, so it is unexpected here.
NOT_SCANNED = 4 | 8 | 16 | 32 | 128
MAX_LINE = 64 * 1024
MAX_LINES = 100_000  # member lines of one stream
_REPLY = re.compile(r"(\d{1,3}) <(.*?)> (\S.*)")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


class FpscandEngine(Engine):
    name = "fpscand"

    def __init__(self, endpoints, settings):
        self._endpoints = Endpoints(
            "fpscand", endpoints, allow_unix=False,
            connect_timeout=number(settings, "FP_SCAND_FPSCAND_CONNECT_TIMEOUT", 0.001, 86400, default=5.0),
            timeout=number(settings, "FP_SCAND_FPSCAND_TIMEOUT", 0.001, 86400, default=60.0))
        self._max_size = number(settings, "FP_SCAND_FPSCAND_MAX_SIZE", 1, 1 << 40, int, default=10 << 20)

    def scan_objects(self, objects, deadline=None):
        for obj in objects:
            size = len(obj.data)
            if size > self._max_size:
                raise EngineError(f"fpscand: object of {size} bytes is over FP_SCAND_FPSCAND_MAX_SIZE ({self._max_size})")
        if not objects:
            return []
        # The object name is echoed back and ends at white space: keep it a safe word.
        streams = [(obj.data, _UNSAFE.sub("_", obj.filename)[:100] if obj.filename else "message") for obj in objects]
        return self._endpoints.ask(lambda sock, unix: _session(sock, streams, deadline), deadline)

    def ping(self):
        # fpscand has no PING: scanning an empty stream is the cheapest full round trip.
        self._endpoints.ask(lambda sock, unix: _session(sock, [(b"", "ping")], None))

    def reload(self):
        pass  # fpscand reloads its own signature files


def _session(sock, streams, deadline):
    """SCAN STREAM for each (data, name) in turn on one connection, then QUIT (every
    wait on sock is bounded by Endpoints: the engine's timeout and the deadline)."""
    verdicts = []
    with sock.makefile("rb") as replies:
        for data, name in streams:
            time_limit.check(deadline)
            sock.sendall(f"SCAN STREAM {name} SIZE {len(data)}\n".encode("ascii"))
            sock.sendall(data)
            verdicts.append(parse_reply(_result_lines(replies, name), name))
    try:
        sock.sendall(b"QUIT\n")
    except OSError:
        pass  # the verdicts are in; a session that ends badly does not change them
    return verdicts


def _result_lines(replies, name):
    """The result lines for stream `name`, up to the one for the stream itself."""
    lines = []
    while True:
        line = replies.readline(MAX_LINE + 1)
        if not line.endswith(b"\n"):
            raise EngineError("connection closed in a reply" if len(line) <= MAX_LINE else "reply line too long")
        lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
        if _result(lines[-1], name).group(3) == name:
            return lines  # the line for the stream itself comes last
        if len(lines) > MAX_LINES:
            raise EngineError("too many reply lines")


def parse_reply(lines, name):
    """fpscand's result lines for stream `name` -> threat names; EngineError if the
    object was not scanned completely or a line is not a result line."""
    threats, trouble = [], []
    for line in lines:
        match = _result(line, name)
        code, text = int(match.group(1)), match.group(2)
        if code & INFECTED:
            # "infected: EICAR_Test_File" -> "EICAR_Test_File"
            threats.append(text.partition(": ")[2].strip() or text.strip() or "unnamed")
        elif code & NOT_SCANNED:
            trouble.append(f"{code} <{text}> {match.group(3)}")
    if threats:
        return list(dict.fromkeys(threats))
    if trouble:
        raise EngineError("not scanned: " + "; ".join(trouble))
    return []


def _result(line, name):
    """The match of a result line about stream `name` (or a member of it); EngineError
    for anything else, at once rather than waiting for a line that will not come."""
    match = _REPLY.fullmatch(line)
    if (not match or int(match.group(1)) > 255
            or not (match.group(3) == name or match.group(3).startswith(name + "->"))):
        raise EngineError(f"unexpected reply {line[:200]!r}")
    return match
