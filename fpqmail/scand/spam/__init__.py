"""Spam scoring beside the virus engines: rspamd and SpamAssassin's spamd.

A spam engine scores one whole message in one round trip (one connection, one request,
one reply) and never raises for the engine's trouble: score() always returns a
SpamResult, 'unknown' with the reason when the engine was down, slow, answered garbage,
or the message was over the size limit and not sent at all (skipped, as spamc does).
What a score means for the message (tag, reject, tempfail) is the policy's business
(fpqmail/scand/policy.py); the headers a scored message gets are built by
header_block() below.

Specs: `rspamd:ENDPOINT[,ENDPOINT...]` and `spamd:ENDPOINT[,ENDPOINT...]`, where an
ENDPOINT is an absolute unix socket path, host:port or [v6]:port; several endpoints
share the load (engines/endpoints.py).
"""

import ipaddress
import re
from dataclasses import dataclass

from fpqmail.values import printable

from ..engines import EngineError
from ..engines.endpoints import BACKOFF, Endpoints
from ..headers import fold, listed
from ..settings import number

#: the largest message scored, in bytes: spamc's default (500 KB); a larger message is
#: not sent and gets the outcome 'unknown' (skipped)
MAX_SIZE = 512_000
CONNECT_TIMEOUT = 5.0
TIMEOUT = 30.0
#: the most recipients sent to an engine (rspamd's default max_recipients: it ignores
#: the rest); the rest of a message's recipients still count for the policy
MAX_RECIPIENTS = 1024
#: the most of an engine's reply read (rspamd's JSON names every symbol and its options)
MAX_REPLY = 4 << 20
#: the most symbols kept for the header and the log, and the longest name
MAX_SYMBOLS = 100
MAX_SYMBOL = 100
MAX_TEXT = 200

#: actions, normalised from the engines' own words
DELIVER, TAG, REJECT, SOFT_REJECT, GREYLIST, UNKNOWN = (
    "deliver", "tag", "reject", "soft-reject", "greylist", "unknown")

#: the verdicts of X-Spam-Status
YES, NO, UNSCORED = "Yes", "No", "Unknown"

_UNSAFE = re.compile(rb"[\x00-\x1f\x7f]")  # never in a request header of ours
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


@dataclass(frozen=True)
class SpamResult:
    """One engine's opinion of one message."""

    engine: str                 # "rspamd" | "spamd"
    action: str                 # deliver | tag | reject | soft-reject | greylist | unknown
    score: float = 0.0
    required: float = 0.0       # the engine's own threshold (rspamd: its reject score)
    symbols: tuple = ()         # rule names, printable ASCII, sorted
    reason: str = ""            # unknown: why; soft-reject: the engine's SMTP text, if any
    skipped: bool = False       # unknown because it was not sent (over the size limit)
    endpoint: str = ""          # the endpoint that answered

    @property
    def known(self):
        return self.action != UNKNOWN

    def summary(self):
        """For the daemon's one log line per message."""
        if not self.known:
            return f"spam={self.engine}:unknown ({self.reason})"
        return f"spam={self.engine}:{self.action} score={self.score:.1f}/{self.required:.1f}"


def unknown(engine, reason, skipped=False):
    return SpamResult(engine, UNKNOWN, reason=printable(reason, MAX_TEXT), skipped=skipped)


@dataclass(frozen=True)
class Client:
    """What the SMTP client told qmail-smtpd's environment, as fp-qmail passed it on
    (Client-IP, Client-Host; docs/protocol.md). Only well-formed values are kept; they
    go to the engine (where they colour the score) and nowhere else."""

    ip: str = ""
    host: str = ""
    helo: str = ""

    @classmethod
    def of(cls, ip="", host="", helo=""):
        try:
            ip = str(ipaddress.ip_address(ip)) if ip else ""
        except ValueError:
            ip = ""
        return cls(ip, host if _HOST.fullmatch(host or "") else "", helo if _HOST.fullmatch(helo or "") else "")


class SpamEngine:
    """The interface of rspamd and spamd; one instance per daemon, shared by its workers."""

    name = "spam"

    def __init__(self, endpoints, *, connect_timeout=CONNECT_TIMEOUT, timeout=TIMEOUT,
                 max_size=MAX_SIZE, backoff=BACKOFF):
        """Raises ValueError for a bad endpoint list."""
        self._endpoints = Endpoints(self.name, endpoints, connect_timeout, timeout, backoff=backoff)
        self.max_size = max_size

    def score(self, message, sender, recipients, *, client=Client(), user=None, queue_id="",
              deadline=None) -> SpamResult:
        """Score message (bytes-like: bytes, memoryview or mmap; sent as it is, no copy).

        sender, recipients: the envelope's addresses (bytes). user: the address whose
        per-user scores the engine should use (None: the engine's own defaults).
        queue_id: names the message in the engine's log. deadline: time.monotonic()
        by which the answer must be in."""
        size = len(message)
        if size > self.max_size:
            return unknown(self.name, f"not scored: {size} bytes, over the limit of {self.max_size}", True)
        request = self._request(size, sender, recipients, client, user, queue_id)
        try:
            return self._endpoints.ask(lambda sock, unix: self._check(sock, request, message), deadline)
        except EngineError as e:
            return unknown(self.name, str(e))

    def ping(self, deadline=None):
        """Health check: return if some endpoint answers (by deadline, a
        time.monotonic() value, if given), else raise EngineError."""
        self._endpoints.ask(lambda sock, unix: self._ping(sock), deadline)

    def reload(self):
        pass  # the engines reload their own rules

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"

    # ---- for the engine modules ------------------------------------------------------

    def _request(self, size, sender, recipients, client, user, queue_id) -> bytes:
        raise NotImplementedError

    def _check(self, sock, request, message) -> SpamResult:
        raise NotImplementedError

    def _ping(self, sock):
        raise NotImplementedError


#: the kinds of spam engine, as an engine spec names them
KINDS = ("rspamd", "spamd")


def is_spam_spec(spec):
    return spec.partition(":")[0] in KINDS


def options_from(settings) -> dict:
    """The spam engine's options from the daemon's FP_SCAND_* settings (an unset or
    empty key takes the default above); SettingsError names a bad one."""
    return {
        "connect_timeout": number(settings, "FP_SCAND_SPAM_CONNECT_TIMEOUT", 0.001, 86400, default=CONNECT_TIMEOUT),
        "timeout": number(settings, "FP_SCAND_SPAM_TIMEOUT", 0.001, 86400, default=TIMEOUT),
        "max_size": number(settings, "FP_SCAND_SPAM_MAX_SIZE", 0, 1 << 40, int, default=MAX_SIZE),
    }


def make_spam_engine(spec, **options) -> SpamEngine:
    """An engine from `rspamd:ENDPOINTS` or `spamd:ENDPOINTS`; options as SpamEngine
    takes them (options_from() reads them from the settings). ValueError for anything
    else."""
    kind, _, endpoints = spec.partition(":")
    if kind == "rspamd" and endpoints:
        from .rspamd import RspamdEngine
        return RspamdEngine(endpoints, **options)
    if kind == "spamd" and endpoints:
        from .spamd import SpamdEngine
        return SpamdEngine(endpoints, **options)
    raise ValueError(f"unknown spam engine {spec!r} (expected rspamd:ENDPOINT or spamd:ENDPOINT)")


# ---- shared by the engine modules ----------------------------------------------------

def header_value(value: bytes):
    """An envelope value fit for a request header line, or None (a control character,
    CR and LF above all, would end the line and start another)."""
    return None if _UNSAFE.search(value) else value


def send(sock, head: bytes, message):
    """The request head and the message in as few system calls as the socket takes,
    gathered (sendmsg), never copied or concatenated. One write for head and body also
    keeps Nagle's algorithm from holding the body back until the head is acknowledged."""
    with memoryview(message) as body:
        buffers = [memoryview(head), body.cast("B")]
        while buffers:
            sent = sock.sendmsg(buffers)
            while buffers and sent >= len(buffers[0]):
                sent -= len(buffers[0])
                buffers.pop(0)
            if buffers:
                buffers[0] = buffers[0][sent:]


def read_reply(sock, limit=MAX_REPLY):
    """(first line, {lower-case field name: value}, body) of a reply framed as HTTP and
    spamd frame theirs: a head ended by an empty line, then Content-Length bytes, or
    everything up to the end of the stream when no length is given. A connection closed
    before any byte is a ConnectionError: the endpoint, not the message, failed."""
    data = bytearray()
    end = -1
    while end < 0:
        chunk = sock.recv(65536)
        if not chunk:
            if not data:
                raise ConnectionError("connection closed without a reply")
            raise EngineError(f"reply ended in its head: {printable(bytes(data[:80]), 80)!r}")
        data += chunk
        end = data.find(b"\r\n\r\n", max(0, len(data) - len(chunk) - 3))
        if end < 0 and len(data) > limit:
            raise EngineError("reply head too long")
    lines = data[:end].decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            raise EngineError(f"malformed reply line {printable(line, 80)!r}")
        fields[name.strip().lower()] = value.strip()
    body = data[end + 4:]
    length = fields.get("content-length")
    if length is not None:
        if not (length.isascii() and length.isdigit() and len(length) < 12) or int(length) > limit:
            raise EngineError(f"bad or too large Content-Length {printable(length, 20)!r}")
        length = int(length)
    while length is None or len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            if length is not None:
                raise EngineError("reply shorter than its Content-Length")
            break
        body += chunk
        if len(body) > limit:
            raise EngineError("reply too long")
    return lines[0], fields, bytes(body[:length] if length is not None else body)


def symbol_names(names):
    """Rule names as the header and the log show them: printable, bounded, sorted."""
    kept = sorted({printable(name, MAX_SYMBOL) for name in names if name})
    return tuple(kept[:MAX_SYMBOLS])


def peer_name(sock):
    peer = sock.getpeername()
    if isinstance(peer, tuple):
        host, port = peer[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return peer


# ---- the headers of a scored message -------------------------------------------------

def header_block(result, verdict, required, newline=b"\n") -> bytes:
    """The spam headers a message gets, in its own line ending (newline), folded (by
    headers.fold, as X-Antivirus is) where a line can be, printable ASCII:

        X-Spam-Status: Yes, score=S required=R tests=NAME,NAME,...
        X-Spam-Score: S
        X-Spam-Flag: YES                          (only for Yes)

    or only `X-Spam-Status: Unknown` when the message was not scored (the verdict is
    Unknown: the engine failed, or the message was over the size limit). verdict: the
    policy's (policy.Decision.verdict); required: the threshold it was measured against."""
    if verdict == UNSCORED or result is None or not result.known:
        return b"X-Spam-Status: Unknown" + newline
    score = f"{result.score:.1f}"
    status = f"X-Spam-Status: {verdict}, score={score} required={required:.1f}"
    if result.symbols:
        pieces = listed(list(result.symbols))
        pieces[0] = "tests=" + pieces[0]
        status += fold(pieces, len(status), newline.decode("ascii"), gap="")
    lines = [status, f"X-Spam-Score: {score}"]
    if verdict == YES:
        lines.append("X-Spam-Flag: YES")
    # Symbol names are printable already (symbol_names); the rest is ours.
    return "".join(line + newline.decode("ascii") for line in lines).encode("ascii")

