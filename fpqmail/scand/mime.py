"""Locating the parts of a MIME message by byte offsets, without re-serialising it.

The stdlib email package rebuilds a message when it writes it back (refolds headers,
changes line endings); a scanner that must deliver every untouched part byte for byte
can only splice. parse() finds where each part's header and body begin and end; the
email package is used only to decode parameter values (RFC 2231, RFC 2047 file names).
Lenient like a mail client: a missing close delimiter ends the part at the end of its
parent, a multipart without a usable boundary is a single leaf.
"""

import binascii
import re

MAX_DEPTH = 50  # deeper nesting is treated as a leaf (parsing stays bounded)
LF, CR = 0x0A, 0x0D
_HEADER_NAME = re.compile(rb"[!-9;-~]+[ \t]*:")
_NOT_BASE64 = bytes(c for c in range(256) if not (chr(c).isascii() and (chr(c).isalnum() or chr(c) in "+/")))


class Part:
    """One MIME entity: the whole message, a body part of a multipart, or the message
    inside a message/rfc822 part. Offsets index the original message."""

    def __init__(self, buf, start, end, default_type, depth, parent=None):
        self.start = start          # first byte of its header
        self.end = end              # one past the last byte of its body
        self.parent = parent
        self.children = []
        # A body part of a multipart can be cut out and replaced; the top-level message
        # and the message inside a message/rfc822 part cannot (their parent can).
        self.separable = parent is not None and parent.is_multipart
        fields, self.body_start, newline = _read_header(buf, start, end)
        # Its own line ending, for a notice put in its place; a part without one
        # (a single line) inherits its parent's.
        self.newline = newline or (parent.newline if parent else b"\n")
        self.content_type, self.encoding, self.filename, boundary = _describe(fields, default_type)
        self.is_multipart = False
        container = self.content_type.startswith("multipart/") or self.content_type == "message/rfc822"
        self.cut = container and depth >= MAX_DEPTH  # a container left unparsed
        if depth >= MAX_DEPTH:
            return
        if self.content_type.startswith("multipart/") and boundary:
            child_type = "message/rfc822" if self.content_type == "multipart/digest" else "text/plain"
            spans = _split(buf, self.body_start, end, boundary)
            if spans:
                self.is_multipart = True
                self.children = [Part(buf, s, e, child_type, depth + 1, self) for s, e in spans]
        elif self.content_type == "message/rfc822" and self.encoding in ("7bit", "8bit", "binary"):
            self.children = [Part(buf, self.body_start, end, "text/plain", depth + 1, self)]

    def leaves(self):
        """The parts that hold content (not containers), in message order."""
        if not self.children:
            yield self
        for child in self.children:
            yield from child.leaves()

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()

    def too_deep(self):
        """Whether a container below this part was left unparsed (MAX_DEPTH)."""
        return any(part.cut for part in self.walk())

    def removable(self):
        """The smallest separable part containing this one, or None."""
        part = self
        while part is not None and not part.separable:
            part = part.parent
        return part

    def decoded(self, buf):
        """The body with its Content-Transfer-Encoding undone (bytes)."""
        body = buf[self.body_start:self.end]
        if self.encoding == "base64":
            return _decode_base64(body)
        if self.encoding == "quoted-printable":
            return binascii.a2b_qp(body)
        return body


def parse(buf):
    """The part tree of a whole message. buf: bytes or mmap (anything with find())."""
    return Part(buf, 0, len(buf), "text/plain", 0)


def newline_of(buf):
    """b"\\r\\n" if the message's first line ends in CRLF, else b"\\n"."""
    i = buf.find(b"\n", 0, 65536)
    return b"\r\n" if i > 0 and buf[i - 1] == CR else b"\n"


def _read_header(buf, start, end):
    """Returns ([(name, value)], body_start, newline or None) for the header at start.

    The header ends at an empty line (which belongs to neither header nor body) or, for
    broken input, at the first line that is neither a field nor a continuation."""
    fields = []
    newline = None
    pos = start
    while pos < end:
        nl = buf.find(b"\n", pos, end)
        line_end = end if nl < 0 else nl + 1
        line = buf[pos:line_end]
        if newline is None and nl >= 0:
            newline = b"\r\n" if line.endswith(b"\r\n") else b"\n"
        content = line.rstrip(b"\r\n")
        if not content:
            return fields, line_end, newline
        if content[:1] in (b" ", b"\t") and fields:
            fields[-1][1] += b" " + content.strip()
        elif _HEADER_NAME.match(content):
            name, _, value = content.partition(b":")
            fields.append([name.strip().lower(), value.strip()])
        else:
            return fields, pos, newline
        pos = line_end
    return fields, end, newline


def _describe(fields, default_type):
    """(content type, transfer encoding, file name or None, boundary or None)."""
    from email.message import Message
    wanted = {b"content-type": "Content-Type", b"content-disposition": "Content-Disposition"}
    msg = Message()
    msg.set_default_type(default_type)
    encoding = "7bit"
    for name, value in fields:
        text = value.decode("ascii", "surrogateescape")
        if name in wanted and wanted[name] not in msg:
            msg[wanted[name]] = text
        elif name == b"content-transfer-encoding":
            encoding = text.strip().lower() or "7bit"
    boundary = msg.get_boundary()
    if boundary is not None and not boundary.isascii():
        boundary = None  # RFC 2046 boundaries are ASCII: one with other bytes is not usable
    return msg.get_content_type(), encoding, _filename(msg), boundary


def _filename(msg):
    try:
        name = msg.get_filename()  # Content-Disposition filename, else Content-Type name
        if name and "=?" in name:
            from email.header import decode_header, make_header
            name = str(make_header(decode_header(name)))
    except Exception:  # a broken parameter must not stop the scan; the name is cosmetic
        return None
    if not name:
        return None
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _split(buf, body_start, end, boundary):
    """The (start, end) spans of the body parts between the delimiter lines of a
    multipart body. The line break before a delimiter belongs to the delimiter."""
    delimiter = b"--" + boundary.encode("ascii", "surrogateescape")
    found = []  # (delimiter start, first byte after its line, is close delimiter)
    pos = body_start
    while True:
        i = buf.find(delimiter, pos, end)
        if i < 0:
            break
        pos = i + 1
        if i != body_start and buf[i - 1] != LF:
            continue
        j = i + len(delimiter)
        close = buf[j:j + 2] == b"--"
        if close:
            j += 2
        while j < end and buf[j] in (0x20, 0x09):
            j += 1
        if j < end and buf[j] == CR and j + 1 < end and buf[j + 1] == LF:
            j += 2
        elif j < end and buf[j] == LF:
            j += 1
        elif j != end:
            continue  # the boundary is only a prefix of this line
        found.append((i, j, close))
        if close:
            break
        pos = j
    spans = []
    for k, (_, part_start, close) in enumerate(found):
        if close:
            break
        if k + 1 < len(found):
            nxt = found[k + 1][0]
            part_end = nxt - (2 if nxt - part_start >= 2 and buf[nxt - 2] == CR else 1)
            spans.append((part_start, max(part_start, part_end)))
        else:
            spans.append((part_start, end))  # no close delimiter: runs to the parent's end
    return spans


def _decode_base64(body):
    # Mail in the wild has line breaks, stray characters and missing padding in base64;
    # decode what is there the way a mail client would rather than give up.
    data = bytes(body).translate(None, _NOT_BASE64)
    data = data[: len(data) - len(data) % 4] if len(data) % 4 == 1 else data + b"=" * (-len(data) % 4)
    return binascii.a2b_base64(data)
