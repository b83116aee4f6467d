"""rspamd's normal worker (by default 127.0.0.1:11333), spoken with the stdlib.

One request per connection: `POST /checkv2 HTTP/1.1`, the envelope and the client as
request headers (From, one Rcpt per recipient, IP, Hostname, Helo, Queue-Id, and
Deliver-To for per-user settings), the message as the body; the reply is JSON with
`action`, `score`, `required_score`, `symbols` and, for a soft reject, the SMTP text in
`messages.smtp_message`.

Why not http.client: the exchange is one request with a Content-Length body and one
Content-Length reply on a connection closed afterwards. Writing the head ourselves lets
the body go out from the caller's buffer in the same system call (send()), and reading
the reply is the same 30 lines that spamd needs (read_reply()); http.client would add
its email-package header parser to every message and its own copies of the body.
"""

import json
import math

from fpqmail.values import printable

from . import (DELIVER, GREYLIST, MAX_RECIPIENTS, MAX_TEXT, REJECT, SOFT_REJECT, TAG, Client, SpamEngine,
               SpamResult, header_value, peer_name, read_reply, send, symbol_names)
from ..engines import EngineError

#: rspamd's actions and what they are here. rspamd's `greylist` action only says the
#: score passed its greylist threshold: rspamd's greylist module (with its redis) turns
#: the messages it really greylists into `soft reject` and the rest into `no action`.
ACTIONS = {
    "no action": DELIVER,
    "greylist": GREYLIST,
    "add header": TAG,
    "rewrite subject": TAG,  # the subject is never rewritten here: the message stays byte-identical
    "soft reject": SOFT_REJECT,
    "reject": REJECT,
    # Not delivering is what rspamd's administrator asked for; refusing tells the sender
    # instead of losing the message without a word.
    "discard": REJECT,
    "quarantine": REJECT,
}
# An action this table does not know (a newer rspamd's) counts as tag: the message
# keeps its score and headers, and the policy's own thresholds still apply.


class RspamdEngine(SpamEngine):
    name = "rspamd"

    def _request(self, size, sender, recipients, client, user, queue_id):
        lines = [b"POST /checkv2 HTTP/1.1", b"Host: rspamd", b"Connection: close",
                 b"Content-Length: %d" % size]
        # An empty sender (a bounce) is <>, as rspamd reads an SMTP MAIL FROM.
        sender = header_value(sender) if sender else b"<>"
        if sender is not None:
            lines.append(b"From: " + sender)
        for recipient in recipients[:MAX_RECIPIENTS]:
            if header_value(recipient) is not None:
                lines.append(b"Rcpt: " + recipient)
        client = client or Client()
        for name, value in (("IP", client.ip), ("Hostname", client.host), ("Helo", client.helo),
                            ("Queue-Id", printable(queue_id, 100))):
            if value:
                lines.append(f"{name}: {value}".encode("ascii"))
        if user is not None and header_value(user) is not None:
            lines.append(b"Deliver-To: " + user)  # rspamd's per-recipient settings
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def _check(self, sock, request, message):
        endpoint = peer_name(sock)  # now: a peer that closed has no name any more
        send(sock, request, message)
        status, _, body = read_reply(sock)
        return parse_reply(status, body, endpoint)

    def _ping(self, sock):
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: rspamd\r\nConnection: close\r\n\r\n")
        status, _, body = read_reply(sock, 4096)
        if not status.startswith("HTTP/1.") or status.split()[1:2] != ["200"] or body.strip() != b"pong":
            raise EngineError(f"ping answered {printable(status, 80)!r}")


def parse_reply(status, body, endpoint=""):
    """rspamd's reply (status line, body) -> SpamResult; EngineError if it is not a
    scan result."""
    parts = status.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or parts[1] != "200":
        raise EngineError(f"answered {printable(status, 80)!r}: {printable(body, 120)}")
    try:
        doc = json.loads(body)
        action = doc["action"]
        score = _number(doc["score"])
        required = _number(doc["required_score"])
        symbols = doc.get("symbols", {})
        messages = doc.get("messages", {})
    except (ValueError, KeyError, TypeError):
        raise EngineError(f"not a scan result: {printable(body, 120)}") from None
    if not isinstance(action, str) or not isinstance(symbols, dict) or not isinstance(messages, dict):
        raise EngineError(f"not a scan result: {printable(body, 120)}")
    text = messages.get("smtp_message")
    return SpamResult("rspamd", ACTIONS.get(action, TAG), score, required, symbol_names(symbols),
                      reason=printable(text, MAX_TEXT) if isinstance(text, str) else "", endpoint=endpoint)


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError("not a number")
    return float(value)
