"""What the scanner does to a message: ask the engines, then deliver it unchanged (with
one added header), cut out the parts that carry a threat, or declare it infected.

Byte-exactness is the rule: the output is the added X-Antivirus header followed by the
original bytes, except that each removed part's bytes (between its delimiter lines) are
replaced by a short text/plain notice. Nothing else is re-encoded or refolded.
"""

from fpqmail.values import printable

from . import mime
from .deadline import check

HEADER_WIDTH = 78
NESTING_LIMIT_NAME = "MIME-Nesting-Limit-Exceeded"
MAX_THREAT = 200  # characters; file names can be long, header lines must not be


class Examined:
    """The verdict on one message and the means to write the message to deliver."""

    def __init__(self, message, engines, status, threats, removed=()):
        self.status = status        # "clean" | "cleaned" | "infected"
        self.threats = threats      # printable ASCII, "Name" or "Name in file.zip"
        self.engines = engines      # names of the engines that looked
        self._message = message
        self._removed = list(removed)  # [(start, end, replacement bytes)], sorted, disjoint

    def write(self, out) -> int:
        """Write the message to deliver to the binary file object out; return the
        number of bytes written. For "infected" it is the original with the header
        naming the threats: not to be delivered, but useful to look at."""
        header = self._header(mime.newline_of(self._message))
        out.write(header)
        return len(header) + self._write_body(out)

    def _write_body(self, out):
        """The original bytes, removed parts replaced by their notices."""
        written = 0
        with memoryview(self._message) as original:
            pos = 0
            for start, end, notice in self._removed + [(len(original), len(original), b"")]:
                with original[pos:start] as kept:
                    out.write(kept)
                out.write(notice)
                written += (start - pos) + len(notice)
                pos = end
        return written

    def _header(self, newline):
        text = "X-Antivirus: scanned by fp-qmail (" + ", ".join(self.engines) + ")"
        if self.status != "clean":
            items = self.threats + (["removed"] if self.status == "cleaned" else [])
            text += "; infected:"
            text += _fold(items, len(text), newline)
        return text.encode("ascii") + newline


def examine(message, fd, engines, deadline=None) -> Examined:
    """Scan message (bytes-like; fd: a readable descriptor of it, or None) with every
    engine in turn. Raises EngineError if any engine fails: never a verdict then;
    deadline.TimeLimit once the deadline (time.monotonic()) has passed."""
    buf = message if hasattr(message, "find") else bytes(message)
    names = [engine.name for engine in engines]
    found = _find(buf, fd, engines, deadline)
    if not found.whole and not found.parts:
        return Examined(message, names, "clean", [])
    threats = found.threat_list()
    removable = found.removable_parts()
    if removable is None:
        return Examined(message, names, "infected", threats)
    removed = [(p.start, p.end, _notice(found.parts_under(p), p.newline)) for p in removable]
    cleaned = Examined(buf, names, "cleaned", threats, removed)
    # The cleaned message must pass every engine on its own: a threat no part
    # explained (in a header, a preamble, a part the engine could not see alone)
    # is still in it, and then the message cannot be cleaned.
    again = _find(_render_body(cleaned), None, engines, deadline)
    if again.whole_or_parts():
        return Examined(message, names, "infected", list(dict.fromkeys(threats + again.threat_list())))
    return cleaned


class _Findings:
    def __init__(self, tree):
        self.tree = tree
        self.whole = []     # threats found in the message as a whole
        self.parts = {}     # leaf Part -> threats found in its decoded content

    def whole_or_parts(self):
        return bool(self.whole or self.parts)

    def threat_list(self):
        """Threats of the parts ("Name in file"), then those found only in the whole."""
        named = {}
        for part, threats in self.parts.items():
            for threat in threats:
                named[printable(f"{threat} in {part.filename}" if part.filename else threat, MAX_THREAT)] = threat
        seen = set(named.values())
        return list(dict.fromkeys([*named, *(printable(t, MAX_THREAT) for t in self.whole if t not in seen)]))

    def removable_parts(self):
        """The outermost separable parts that hold the infected leaves, in order;
        None if a threat was not tied to a part or a part cannot be separated."""
        if not self.parts:
            return None
        chosen = []
        for leaf in self.parts:
            part = leaf.removable()
            if part is None:
                return None
            chosen.append(part)
        outermost = [p for p in chosen if not any(_inside(p, q) for q in chosen if q is not p)]
        return sorted(dict.fromkeys(outermost), key=lambda p: p.start)

    def parts_under(self, part):
        return {leaf: t for leaf, t in self.parts.items() if leaf is part or _inside(leaf, part)}


def _find(buf, fd, engines, deadline):
    """Every engine's findings for the message as a whole and for its decoded leaves."""
    found = _Findings(None)
    for engine in engines:
        check(deadline)
        whole = engine.scan(buf, fd=fd)
        found.whole += whole
        # An engine that decodes mail itself answered for every part already; only
        # when it found something do we ask it part by part, to know what to remove.
        if engine.decodes_mail and not whole:
            continue
        if found.tree is None:
            found.tree = mime.parse(buf)
            if found.tree.too_deep():
                # Parts below the limit were not decoded: the message cannot be
                # judged whole, and nobody nests MIME that deep for a good reason.
                found.whole.append(NESTING_LIMIT_NAME)
        for leaf in found.tree.leaves():
            check(deadline)
            threats = engine.scan(leaf.decoded(buf), filename=leaf.filename)
            if threats:
                found.parts.setdefault(leaf, []).extend(threats)
    return found


def _render_body(examined):
    import io
    out = io.BytesIO()
    examined._write_body(out)
    return out.getvalue()


def _inside(part, container):
    p = part.parent
    while p is not None:
        if p is container:
            return True
        p = p.parent
    return False


def _notice(infected_leaves, newline):
    """The text/plain part put in place of a removed one."""
    lines = []
    for leaf, threats in infected_leaves.items():
        what = f'the attachment "{leaf.filename}"' if leaf.filename else "a part of this message"
        lines.append(f"fp-qmail removed {what}: it contained {', '.join(threats)}.")
    text = newline.decode().join(lines)  # the line break before the delimiter ends it
    body = text.encode("utf-8")
    encoding = "7bit" if body.isascii() else "8bit"
    header = (f"Content-Type: text/plain; charset=utf-8{newline.decode()}"
              f"Content-Transfer-Encoding: {encoding}{newline.decode()}"
              f"Content-Disposition: inline{newline.decode()}{newline.decode()}")
    return header.encode("ascii") + body


def _fold(items, column, newline):
    """ " item1, item2, ..." folded (newline + tab) before an item that would pass
    HEADER_WIDTH, so no header line grows long however many threats there are."""
    out = ""
    for k, item in enumerate(items):
        token = item + ("," if k + 1 < len(items) else "")
        if column + 1 + len(token) > HEADER_WIDTH:
            out += newline.decode() + "\t" + token
            column = 1 + len(token)
        else:
            out += " " + token
            column += 1 + len(token)
    return out
