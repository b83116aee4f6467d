"""SpamAssassin's spamd (by default port 783), spoken with the stdlib.

One request per connection, the spamc protocol (SpamAssassin's spamd/PROTOCOL):

    SYMBOLS SPAMC/1.5\\r\\n
    Content-length: <bytes>\\r\\n
    User: <recipient>\\r\\n            (only for per-user scores)
    \\r\\n
    <the message>

and spamd answers `SPAMD/1.1 0 EX_OK`, a `Spam: True ; 1005.2 / 5.0` line and, after an
empty line, the names of the rules that hit, separated by commas. SYMBOLS costs spamd
what CHECK does and names the rules for the header. spamd has no opinion beyond spam or
not: its action is tag (score at or above its required score) or deliver; a reject
comes only from the policy's own threshold.
"""

import re
import socket

from fpqmail.values import printable

from . import DELIVER, TAG, SpamEngine, SpamResult, header_value, peer_name, read_reply, send, symbol_names
from ..engines import EngineError

_STATUS = re.compile(r"SPAMD/1\.\d+ (\d+) (.*)")
_SPAM = re.compile(r"(True|False|Yes|No) ; (-?\d{1,9}(?:\.\d{1,9})?) / (-?\d{1,9}(?:\.\d{1,9})?)", re.I)


class SpamdEngine(SpamEngine):
    name = "spamd"

    def _request(self, size, sender, recipients, client, user, queue_id):
        head = b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\n" % size
        if user is not None and header_value(user) is not None and b" " not in user:
            head += b"User: " + user + b"\r\n"
        # spamd reads the envelope and the client from the message's own Received lines
        # (qmail-smtpd wrote the top one); it takes no headers for them.
        return head + b"\r\n"

    def _check(self, sock, request, message):
        endpoint = peer_name(sock)  # now: a peer that closed has no name any more
        send(sock, request, message)
        try:
            sock.shutdown(socket.SHUT_WR)  # the whole message is there, as spamc says it
        except OSError:
            pass  # spamd answered and closed early (a refusal): its reply says why
        status, fields, body = read_reply(sock)
        return parse_reply(status, fields, body, endpoint)

    def _ping(self, sock):
        sock.sendall(b"PING SPAMC/1.5\r\n\r\n")
        # spamd answers PING with one line and closes: no empty line ends its head.
        reply = b""
        while len(reply) < 4096:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
        if not re.fullmatch(rb"SPAMD/1\.\d+ 0 PONG\r?\n?", reply):
            raise EngineError(f"PING answered {printable(reply, 80)!r}")


def parse_reply(status, fields, body, endpoint=""):
    """spamd's reply -> SpamResult; EngineError for an error code or a garbled reply."""
    m = _STATUS.fullmatch(status)
    if not m:
        raise EngineError(f"answered {printable(status, 80)!r}")
    if m.group(1) != "0":
        raise EngineError(f"error {m.group(1)}: {printable(m.group(2), 120)}")
    spam = _SPAM.fullmatch(fields.get("spam", ""))
    if not spam:
        raise EngineError(f"no score in the reply: {printable(fields.get('spam', ''), 80)!r}")
    names = body.decode("latin-1").strip().split(",") if body.strip() else []
    return SpamResult("spamd", TAG if spam.group(1).lower() in ("true", "yes") else DELIVER,
                      float(spam.group(2)), float(spam.group(3)), symbol_names(names), endpoint=endpoint)
