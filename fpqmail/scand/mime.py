"""Taking a MIME message apart, by byte offsets, in time linear in its size and within
explicit limits.

A scanner that must deliver every untouched part byte for byte can only splice, so
the parser does not rebuild the message: it finds where each part's header and body
begin and end (Part). Decomposed then turns the message into what the engines judge
(its objects): every leaf's body with its transfer encoding undone, the inside of a
forwarded message whatever its encoding, files uuencoded into a text, and every byte no
leaf covers (headers, preambles, delimiter lines, epilogues), so that nothing goes
unscanned and each byte reaches each engine about once.

Lenient like a mail client: a missing close delimiter ends the part at the end of its
parent, a multipart without a boundary parameter is a single leaf, sloppy base64 is
decoded as far as it goes (and its raw text is judged too). Hostile input meets a limit
(Limits) and the message is refused (LimitExceeded), never passed as clean.
"""

import binascii
import codecs
import mmap
import os
import re
from dataclasses import dataclass

from .deadline import check as check_deadline
from .engines import ScanObject

LF, CR, SP, TAB = 0x0A, 0x0D, 0x20, 0x09
CRLF = b"\r\n"
CHUNK = 1 << 20          # decoding works in pieces of this many input bytes
SPILL = 256 << 10        # a decoded object larger than this lives in a memfd, not the heap
_HEADER_NAME = re.compile(rb"[!-9;-~]+[ \t]*:")
MAX_NAME = 998  # a field name longer than a line may be (RFC 5322) is not one
_WANTED = (b"content-type", b"content-disposition", b"content-transfer-encoding")
_BASE64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_NOT_BASE64 = bytes(c for c in range(256) if c not in _BASE64)
_BASE64_TEXT = _BASE64 + b"= \t\r\n"
# After a delimiter: transport padding, and stray CRs (a line ending in CR CR LF) that
# mail clients take as part of the line break.
_PADDING = re.compile(rb"[ \t\r]*")
# A uuencode begin line: at the start of the data, or found by the LF before it (a
# pattern with a literal start is searched fast).
_UU_LINE = rb"begin [0-7]{3,4} ([^\r\n]{0,1000})\r?\n"
_UU_FIRST = re.compile(_UU_LINE)
_UU_BEGIN = re.compile(rb"\n" + _UU_LINE)
_QUOTED_STOP = re.compile(rb'["\\]')
_ENCODED_WORD = re.compile(rb"=\?([^?\s]*)\?([BbQq])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(rb"(\?=)[ \t]+(?==\?)")
_QP_HEX = re.compile(rb"=([0-9A-Fa-f]{2})")
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")
DECODED = ("base64", "quoted-printable")  # any other transfer encoding is taken as it is


@dataclass(frozen=True)
class Limits:
    """What one message may cost; past any of them the message is refused
    (docs/scand-settings.md says why each default is what it is)."""
    max_size: int          # bytes of message
    max_parts: int         # MIME entities, nested messages' included
    max_depth: int         # containers (multipart, message/rfc822) inside each other
    max_header_size: int   # bytes of one header (the message's or a part's)
    max_header_lines: int  # lines of one header field (continuations)
    max_expansion: int     # bytes decoded and sent to the engines, in times the message's size

    @classmethod
    def from_settings(cls, raw):
        """The limits of the daemon's settings (FP_SCAND_MAX_*; unset: the defaults of
        settings.TABLE). Raises settings.SettingsError for a bad value."""
        from .settings import DEFAULTS, number

        def get(key, low, high):
            return number(raw, key, low, high, int, default=int(DEFAULTS[key]))
        return cls(max_size=get("FP_SCAND_MAX_SIZE", 1, 1 << 40),
                   max_parts=get("FP_SCAND_MAX_PARTS", 1, 1 << 30),
                   max_depth=get("FP_SCAND_MAX_DEPTH", 1, 200),
                   max_header_size=get("FP_SCAND_MAX_HEADER_SIZE", 1, 1 << 40),
                   max_header_lines=get("FP_SCAND_MAX_HEADER_LINES", 1, 1 << 30),
                   max_expansion=get("FP_SCAND_MAX_EXPANSION", 1, 1000))

    def check_size(self, size):
        """LimitExceeded for a message larger than max_size: checked before a byte of it
        is read."""
        if size > self.max_size:
            raise LimitExceeded("message too large to be scanned (#5.3.4)")


class LimitExceeded(Exception):
    """The message is past one of the limits; str() is the SMTP text of the refusal."""


class Part:
    """One MIME entity: the whole message, a body part of a multipart, or the message
    inside a message/rfc822 part. Offsets index the buffer it was parsed from."""

    def __init__(self, start, end, parent, depth):
        self.start = start          # first byte of its header
        self.end = end              # one past the last byte of its body
        self.parent = parent
        self.depth = depth          # containers around it
        self.children = []
        self.body_start = start
        self.newline = b"\n"
        self.content_type = "text/plain"
        self.encoding = "7bit"
        self.filename = None
        # A body part of a multipart can be cut out and replaced; the top-level message
        # and the message inside a message/rfc822 part cannot (their parent can).
        self.separable = parent is not None and parent.is_multipart
        # The smallest separable part holding this one (itself included), or None.
        self.removable = self if self.separable else (parent.removable if parent else None)
        self.is_multipart = False
        self.seq = 0                # its position in the tree, in message order
        self.last = 0               # the seq of its last descendant (itself if none)

    @property
    def encoded_message(self):
        """A forwarded message in base64 or quoted-printable: a leaf of this tree whose
        decoded body is parsed as a message of its own."""
        return self.content_type == "message/rfc822" and self.encoding in DECODED

    def leaves(self):
        """The parts that hold content (not containers), in message order."""
        stack = [self]
        while stack:
            part = stack.pop()
            if part.children:
                stack.extend(reversed(part.children))
            else:
                yield part

    def contains(self, other):
        return self.seq <= other.seq <= self.last


def newline_of(buf):
    """b"\\r\\n" if the message's first line ends in CRLF, else b"\\n"."""
    i = buf.find(b"\n", 0, 65536)
    return CRLF if i > 0 and buf[i - 1] == CR else b"\n"


class _Count:
    """What a message has used of its limits so far, nested messages included."""

    def __init__(self, limits, size):
        self.limits = limits
        self.parts = 0
        self.handled = 0  # bytes decoded or sent to the engines
        self.allowed = limits.max_expansion * max(size, 1)

    def part(self):
        self.room_for(1)
        self.parts += 1

    def room_for(self, parts):
        """Raise LimitExceeded unless `parts` more parts are allowed."""
        if self.parts + parts > self.limits.max_parts:
            raise LimitExceeded(f"message has more than {self.limits.max_parts} MIME parts (#5.3.4)")

    def handle(self, n):
        self.handled += n
        if self.handled > self.allowed:
            raise LimitExceeded("message too large to be scanned once decoded (#5.3.4)")


class _Parser:
    """Builds the part tree of one buffer (bytes or mmap: anything with find()), one
    entity after the other, each line looked at once."""

    def __init__(self, buf, limits, deadline, count, depth=0):
        self.buf = buf
        self.limits = limits
        self.deadline = deadline
        self.count = count
        self.depth = depth  # of the message in buf, when it is a decoded forwarded one
        self.seq = 0

    def tree(self):
        return self.entity(0, len(self.buf), "text/plain", self.depth, None)

    def entity(self, start, end, default_type, depth, parent):
        check_deadline(self.deadline)
        self.count.part()
        part = Part(start, end, parent, depth)
        part.seq = self.seq
        self.seq += 1
        fields, part.body_start, newline = read_header(self.buf, start, end, self.limits)
        # Its own line ending, for a notice put in its place; a part without one
        # (a single line) inherits its parent's.
        part.newline = newline or (parent.newline if parent else b"\n")
        part.content_type, part.encoding, part.filename, boundary = describe(fields, default_type)
        container = part.content_type.startswith("multipart/") or part.content_type == "message/rfc822"
        if container and depth >= self.limits.max_depth:
            raise LimitExceeded(f"MIME parts nested more than {self.limits.max_depth} levels deep (#5.6.0)")
        if part.content_type.startswith("multipart/") and boundary:
            child_type = "message/rfc822" if part.content_type == "multipart/digest" else "text/plain"
            spans = self.split(part.body_start, end, boundary)
            if spans:
                part.is_multipart = True
                part.children = [self.entity(s, e, child_type, depth + 1, part) for s, e in spans]
        elif part.content_type == "message/rfc822" and part.encoding not in DECODED:
            part.children = [self.entity(part.body_start, end, "text/plain", depth + 1, part)]
        part.last = self.seq - 1
        return part

    def split(self, body_start, end, boundary):
        """The (start, end) spans of the body parts between the delimiter lines of a
        multipart body. The line break before a delimiter belongs to the delimiter."""
        buf = self.buf
        delimiter = b"--" + boundary
        found = []  # (delimiter start, first byte after its line, is close delimiter)
        # Only a delimiter at the start of a line counts: look for it behind a LF (and
        # at the very start of the body), so that text merely containing it costs nothing.
        if buf[body_start:body_start + len(delimiter)] == delimiter:
            i = body_start
        else:
            i = self._next(delimiter, body_start, end)
        while i >= 0:
            j = i + len(delimiter)
            close = buf[j:min(j + 2, end)] == b"--"
            if close:
                j += 2
            j = _PADDING.match(buf, j, end).end()
            if j < end and buf[j] == LF:
                j += 1
            elif j != end:
                i = self._next(delimiter, i + 1, end)  # the boundary is only a prefix of this line
                continue
            found.append((i, j, close))
            if close:
                break
            if len(found) % 256 == 0:  # a body of a million delimiters is not even split
                self.count.room_for(len(found))
                check_deadline(self.deadline)
            i = self._next(delimiter, j, end)
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

    def _next(self, delimiter, pos, end):
        """The start of the next delimiter that begins a line, at or after pos."""
        i = self.buf.find(b"\n" + delimiter, max(pos - 1, 0), end)
        return i + 1 if i >= 0 else -1


def read_header(buf, start, end, limits):
    """({wanted field name: value}, body_start, newline or None) for the header at start.

    Only the fields that shape the MIME structure are kept (the first of each name);
    the others are only counted against the limits. The header ends at an empty line
    (which belongs to neither header nor body) or, for broken input, at the first line
    that is neither a field nor a continuation. Each line is looked at once."""
    pieces = {}
    current = None      # the pieces of the field being read, None if it is not wanted
    in_field = False
    lines = 0           # lines of the field being read
    newline = None
    pos = start
    while pos < end:
        nl = buf.find(b"\n", pos, end)
        line_end = end if nl < 0 else nl + 1
        content_end = end if nl < 0 else nl
        while content_end > pos and buf[content_end - 1] in (CR, LF):
            content_end -= 1
        if newline is None and nl >= 0:
            newline = CRLF if nl > pos and buf[nl - 1] == CR else b"\n"
        if content_end == pos:
            return _joined(pieces), line_end, newline
        continuation = buf[pos] in (SP, TAB) and in_field
        if not continuation and not _HEADER_NAME.match(buf, pos, min(content_end, pos + MAX_NAME + 1)):
            return _joined(pieces), pos, newline
        if line_end - start > limits.max_header_size:
            raise LimitExceeded(f"message has a header of more than {limits.max_header_size} bytes (#5.6.0)")
        if continuation:
            lines += 1
            if lines > limits.max_header_lines:
                raise LimitExceeded(f"message has a header field of more than {limits.max_header_lines} lines (#5.6.0)")
            if current is not None:
                current.append(bytes(buf[pos:content_end]).strip())
        else:
            colon = buf.find(b":", pos, content_end)
            name = bytes(buf[pos:colon]).strip().lower()
            in_field, lines, current = True, 1, None
            if name in _WANTED and name not in pieces:
                current = pieces[name] = [bytes(buf[colon + 1:content_end]).strip()]
        pos = line_end
    return _joined(pieces), end, newline


def _joined(pieces):
    return {name: b" ".join(parts) for name, parts in pieces.items()}


def describe(fields, default_type):
    """(content type, transfer encoding, file name or None, boundary bytes or None) of
    a part's wanted header fields."""
    content_type, params = parse_content_field(fields.get(b"content-type"))
    if content_type is None:
        content_type = default_type
    _, disposition = parse_content_field(fields.get(b"content-disposition"))
    encoding = fields.get(b"content-transfer-encoding", b"").split(b"(", 1)[0].strip().lower()
    encoding = encoding.decode("ascii", "replace") or "7bit"
    filename = parameter_text(disposition, "filename") or parameter_text(params, "name")
    boundary = parameter_bytes(params, "boundary")
    return content_type, encoding, filename or None, boundary or None


def parse_content_field(value):
    """(type/subtype lowercased, [(parameter name, value bytes)]) of a Content-Type or
    Content-Disposition value; (None, []) if absent. A type that is not one word with
    one slash is text/plain, as RFC 2045 says. One pass over the value."""
    if value is None:
        return None, []
    semi = value.find(b";")
    main = (value if semi < 0 else value[:semi]).split(b"(", 1)[0].strip().lower()
    words = main.split()
    main = words[0] if words else b""
    kind, slash, sub = main.partition(b"/")
    content_type = main.decode("ascii", "replace") if kind and slash and sub and b"/" not in sub else "text/plain"
    params = []
    pos = len(value) if semi < 0 else semi + 1
    n = len(value)
    while pos < n:
        eq = value.find(b"=", pos)
        semi = value.find(b";", pos)
        if eq < 0 or 0 <= semi < eq:  # a parameter without a value: skip it
            pos = n if semi < 0 else semi + 1
            continue
        name = value[pos:eq].strip().lower().decode("ascii", "replace")
        pos = eq + 1
        while pos < n and value[pos] in (SP, TAB):
            pos += 1
        if pos < n and value[pos] == 0x22:  # a quoted string, with \\ escapes
            pieces = []
            pos += 1
            while True:
                m = _QUOTED_STOP.search(value, pos)
                if m is None:  # unterminated: it runs to the end
                    pieces.append(value[pos:])
                    pos = n
                    break
                pieces.append(value[pos:m.start()])
                if value[m.start()] == 0x22:
                    pos = m.start() + 1
                    break
                pieces.append(value[m.start() + 1:m.start() + 2])
                pos = m.start() + 2
            text = b"".join(pieces)
            semi = value.find(b";", pos)
            pos = n if semi < 0 else semi + 1  # anything after the closing quote is junk
        else:
            semi = value.find(b";", pos)
            stop = n if semi < 0 else semi
            text = value[pos:stop].strip()
            pos = stop + 1
        if name:
            params.append((name, text))
    return content_type, params


def parameter_bytes(params, name):
    """The raw value of parameter `name`, RFC 2231 continuations joined and percent
    escapes undone; the first plain `name=` if there is no `name*` form."""
    value, _ = _parameter(params, name)
    return value


def parameter_text(params, name):
    """The value of parameter `name` as text: RFC 2231 (charset, continuations) or
    RFC 2047 encoded words, as mail clients show file names. None if absent."""
    value, charset = _parameter(params, name)
    if value is None:
        return None
    if charset is not None:
        return _text(value, charset)
    return decode_words(value)


def _parameter(params, name):
    plain = None
    sections = {}
    star = name + "*"
    for key, value in params:
        if key == name:
            if plain is None:
                plain = value
        elif key.startswith(star):
            rest = key[len(star):]  # "" (name*=, one extended section), "0", "1*", ...
            extended = rest == "" or rest.endswith("*")
            number = rest.rstrip("*") or "0"
            if number.isdigit() and len(number) <= 4:
                sections.setdefault(int(number), (value, extended))
    if 0 not in sections:
        return plain, None
    pieces, charset = [], None
    k = 0
    while k in sections:
        value, extended = sections[k]
        if extended:
            if k == 0:
                first, quote, rest = value.partition(b"'")
                if quote and b"'" in rest:
                    charset = first.decode("ascii", "replace")
                    value = rest.partition(b"'")[2]
            value = _PERCENT.sub(lambda m: bytes.fromhex(m.group(1).decode()), value)
        pieces.append(value)
        k += 1
    return b"".join(pieces), charset or "utf-8"


def decode_words(value):
    """Bytes of a header value with RFC 2047 encoded words decoded, as text. Encoded
    words separated only by white space are joined, as the RFC says."""
    if b"=?" not in value:
        return _text(value, "utf-8")
    value = _BETWEEN_WORDS.sub(rb"\1", value)
    out = []
    pos = 0
    for m in _ENCODED_WORD.finditer(value):
        out.append(_text(value[pos:m.start()], "utf-8"))
        charset, kind, text = m.group(1).split(b"*", 1)[0], m.group(2).upper(), m.group(3)
        if kind == b"B":
            data = _base64_lenient(text)
        else:
            data = _QP_HEX.sub(lambda h: bytes.fromhex(h.group(1).decode()), text.replace(b"_", b" "))
        out.append(_text(data, charset.decode("ascii", "replace")))
        pos = m.end()
    out.append(_text(value[pos:], "utf-8"))
    return "".join(out)


def _text(data, charset):
    try:
        codecs.lookup(charset)
    except LookupError:
        charset = "utf-8"
    return data.decode(charset, "replace")


def _base64_lenient(data):
    # Mail in the wild has line breaks, stray characters and missing padding in base64;
    # decode what is there the way a mail client would rather than give up.
    data = data.translate(None, _NOT_BASE64)
    data = data[:len(data) - len(data) % 4] if len(data) % 4 == 1 else data + b"=" * (-len(data) % 4)
    return binascii.a2b_base64(data)


# ---- what the engines see ------------------------------------------------------------------

class Decomposed:
    """A message taken apart for the engines: its part tree, and its objects (ScanObject)
    each tied to the part of the tree that a threat found in it incriminates (owner).
    close() frees the decoded objects (memfds); use it as a context manager.
    Raises LimitExceeded and deadline.TimeLimit."""

    def __init__(self, buf, limits, deadline=None):
        self._limits = limits
        self._deadline = deadline
        self._count = _Count(limits, len(buf))
        self._owned = []  # what to close: _Decoded objects and memfds
        self.objects = []
        try:
            self.tree = _Parser(buf, limits, deadline, self._count).tree()
            self._add(buf, self.tree, owner=None)
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.objects = []  # (they hold views of the buffers closed here)
        for decoded in self._owned:
            decoded.close()
        self._owned = []

    def _add(self, buf, tree, owner):
        """The objects of one parsed buffer: its bytes outside every leaf's body (in one
        object), then every leaf. owner: the part of the top tree that anything found in
        this buffer incriminates (None: the top level itself)."""
        gaps = []
        pos = 0
        leaves = list(tree.leaves())
        for leaf in leaves:
            gaps.append((pos, leaf.body_start))
            pos = leaf.end
        gaps.append((pos, len(buf)))
        rest = self._sink()
        for start, end in gaps:
            if end > start:
                rest.write(memoryview(buf)[start:end])
        self._object(rest, owner, None)
        for leaf in leaves:
            check_deadline(self._deadline)
            self._leaf(buf, leaf, owner if owner is not None else leaf)

    def _leaf(self, buf, leaf, holder):
        body = memoryview(buf)[leaf.body_start:leaf.end]
        if leaf.encoding == "base64":
            decoded = self._sink()
            sloppy = _decode_base64(body, decoded, self._deadline)
            if sloppy:
                # Characters base64 does not have: a mail client may show this text as
                # it is. Judge it as written too.
                self._count.handle(len(body))
                self.objects.append(ScanObject(body, None, leaf.filename, holder))
        elif leaf.encoding == "quoted-printable":
            decoded = self._sink()
            _decode_qp(body, decoded, self._deadline)
        else:
            self._count.handle(len(body))
            self.objects.append(ScanObject(body, None, leaf.filename, holder))
            self._uuencoded(buf, leaf.body_start, leaf.end, holder)
            return
        if leaf.encoded_message:
            inner = decoded.finish()
            self._owned.append(inner)
            tree = _Parser(inner.data, self._limits, self._deadline, self._count, leaf.depth + 1).tree()
            self._add(inner.data, tree, holder)
        else:
            data = self._object(decoded, holder, leaf.filename)
            self._uuencoded(data, 0, len(data), holder)

    def _object(self, sink, owner, filename):
        decoded = sink.finish()
        self._owned.append(decoded)
        self.objects.append(ScanObject(decoded.data, decoded.fd, filename, owner))
        return decoded.data

    def _uuencoded(self, data, start, end, holder):
        """Files uuencoded into a text (begin 644 name ... end), as mail clients show
        them: each decoded is an object of its own, tied to the part that holds it."""
        pos = start
        while True:
            # A begin line starts the data or follows a LF (the one before pos included).
            begin = (pos == 0 and _UU_FIRST.match(data, 0, end)) or _UU_BEGIN.search(data, max(pos - 1, 0), end)
            if begin is None:
                return
            self._count.part()
            sink = self._sink()
            pos = _decode_uu(data, begin.end(), end, sink, self._deadline)
            name = begin.group(1).strip()
            self._object(sink, holder, _text(name, "utf-8") if name else None)

    def _sink(self):
        return _Sink(self._count, self._owned)


class _Sink:
    """Collects decoded bytes: in memory while small, in a memfd beyond SPILL bytes (so
    that big objects never sit in the heap, where freed memory is not given back)."""

    def __init__(self, count, owned):
        self._count = count
        self._owned = owned
        self._pieces = []
        self._size = 0
        self._fd = None

    def write(self, data):
        n = len(data)
        if not n:
            return
        self._count.handle(n)
        if self._fd is None and self._size + n <= SPILL:
            self._pieces.append(bytes(data))
        else:
            if self._fd is None:
                self._fd = os.memfd_create("fpqmail-part", os.MFD_CLOEXEC)
                self._owned.append(_Closer(self._fd))
                for piece in self._pieces:
                    _write_all(self._fd, piece)
                self._pieces = []
            _write_all(self._fd, data)
        self._size += n

    def finish(self):
        if self._fd is None:
            return _Decoded(b"".join(self._pieces), None, None)
        mapped = mmap.mmap(self._fd, self._size, access=mmap.ACCESS_READ)
        return _Decoded(mapped, self._fd, mapped)


class _Decoded:
    """What a _Sink collected."""

    def __init__(self, data, fd, mapped):
        self.data = data        # bytes or a read-only mmap of fd
        self.fd = fd            # a memfd holding exactly data from offset 0, or None
        self._mapped = mapped

    def close(self):
        if self._mapped is not None:
            try:
                self._mapped.close()
            except BufferError:  # a view still held by someone: the GC unmaps it
                pass
            self._mapped = None


class _Closer:
    """A memfd to close with the Decomposed that made it."""

    def __init__(self, fd):
        self.fd = fd

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _write_all(fd, data):
    with memoryview(data) as view:
        while len(view):
            n = os.write(fd, view)
            view = view[n:]


def _decode_base64(body, sink, deadline):
    """Decode base64 from body into sink, piece by piece; True if the text had
    characters base64 does not know (besides white space and padding)."""
    sloppy = False
    carry = b""
    for pos in range(0, len(body), CHUNK):
        check_deadline(deadline)
        raw = bytes(body[pos:pos + CHUNK])
        if not sloppy and raw.translate(None, _BASE64_TEXT):
            sloppy = True
        data = carry + raw.translate(None, _NOT_BASE64)
        usable = len(data) - len(data) % 4
        sink.write(binascii.a2b_base64(data[:usable]))
        carry = data[usable:]
    if carry:
        sink.write(_base64_lenient(carry))
    return sloppy


def _decode_uu(data, pos, end, sink, deadline):
    """Decode the uuencoded lines from pos (the line after `begin`) into sink, up to
    the `end` line or the first line that is not uuencode; the position after it."""
    lines = 0
    while pos < end:
        nl = data.find(b"\n", pos, end)
        stop = end if nl < 0 else nl + 1
        line = bytes(data[pos:stop]).rstrip(b"\r\n")
        if line == b"end" or not line:  # (a2b_uu would make 32 NULs of an empty line)
            return stop
        try:
            sink.write(binascii.a2b_uu(line))
        except binascii.Error:
            return pos
        pos = stop
        lines += 1
        if lines % 4096 == 0:
            check_deadline(deadline)
    return pos


def _decode_qp(body, sink, deadline):
    """Decode quoted-printable from body into sink, piece by piece. A piece never ends
    inside an escape (=XX) or a soft line break (=CRLF): an = among its last three
    bytes waits for the next piece."""
    carry = b""
    for pos in range(0, len(body), CHUNK):
        check_deadline(deadline)
        data = carry + bytes(body[pos:pos + CHUNK])
        cut = len(data)
        if pos + CHUNK < len(body):
            eq = data.rfind(b"=", max(cut - 3, 0))
            cut = eq if eq >= 0 else cut
        sink.write(binascii.a2b_qp(data[:cut]))
        carry = data[cut:]
