"""What the scanner does to a message: take it apart, let every engine judge every piece,
then deliver it unchanged (with one added header), cut out the parts that carry a
threat, declare it infected, or refuse it when it is past a limit.

The daemon's own MIME decomposition (mime.Decomposed) decides what every engine sees:
each decoded leaf, the inside of forwarded messages whatever their encoding, and the
bytes around them. No engine is trusted to find parts by itself.

Byte-exactness is the rule: the output is the added header block (X-Antivirus, then
the spam headers of a scored message) followed by the original bytes, except that each
removed part's bytes (between its delimiter lines) are replaced by a short text/plain
notice. Nothing else is re-encoded or refolded.
"""

import bisect

from fpqmail.values import printable

from . import mime
from .deadline import check as check_deadline
from .engines import EngineError, ScanObject
from .headers import fold, listed
from .mime import Limits, LimitExceeded  # noqa: F401 (examine's callers catch it)

DEFAULT_LIMITS = Limits.from_settings({})
UNSCANNED = "unscanned"  # the status of a message the policy says not to scan
MAX_THREAT = 200  # characters; file names can be long, header lines must not be


class Examined:
    """The verdict on one message and the means to write the message to deliver."""

    def __init__(self, message, engines, status, threats, removed=()):
        self.status = status        # "clean" | "cleaned" | "infected" | "unscanned"
        self.threats = threats      # printable ASCII, "Name" or "Name in file.zip"
        self.engines = engines      # names of the engines that looked
        self._message = message
        self._removed = list(removed)  # [(start, end, replacement bytes)], sorted, disjoint

    def write(self, out, extra=b"") -> int:
        """Write the message to deliver to the binary file object out; return the
        number of bytes written. extra: more header lines (the spam headers, in the
        message's own line ending), right below X-Antivirus, in the same block. For
        "infected" it is the original with the header naming the threats: not to be
        delivered, but useful to look at."""
        header = self.header() + extra
        out.write(header)
        written = len(header)
        with memoryview(self._message) as original:
            pos = 0
            for start, end, notice in self._removed + [(len(original), len(original), b"")]:
                with original[pos:start] as kept:
                    out.write(kept)
                out.write(notice)
                written += (start - pos) + len(notice)
                pos = end
        return written

    def header(self):
        """The X-Antivirus header, in the message's own line ending."""
        newline = self.newline()
        if self.status == UNSCANNED:
            return b"X-Antivirus: not scanned (policy)" + newline
        text = "X-Antivirus: scanned by fp-qmail (" + ", ".join(self.engines) + ")"
        if self.status != "clean":
            items = self.threats + (["removed"] if self.status == "cleaned" else [])
            text += "; infected:"
            text += fold(listed(items), len(text), newline.decode())
        return text.encode("ascii") + newline

    def newline(self):
        """The message's own line ending (CRLF if its first line ends in one)."""
        return mime.newline_of(self._message)

    def notices(self):
        return [notice for _, _, notice in self._removed]


def not_scanned(message) -> Examined:
    """A message the policy says not to scan: delivered as it is, under a header that
    says so."""
    return Examined(message, [], UNSCANNED, [])


def examine(message, fd, engines, deadline=None, limits=None) -> Examined:
    """Judge message (bytes-like) with every engine. fd: a readable descriptor of it, or
    None, for an engine that also judges the whole message. limits: mime.Limits, by
    default the daemon's defaults. Raises LimitExceeded (the message must be refused),
    EngineError (no verdict) and deadline.TimeLimit."""
    limits = limits or DEFAULT_LIMITS
    limits.check_size(len(message))
    buf = message if hasattr(message, "find") else bytes(message)
    names = [engine.name for engine in engines]
    with mime.Decomposed(buf, limits, deadline) as parts:
        # unplaced: threats in what belongs to no separable part (the message's header,
        # a preamble, the body of a single-part message; the whole message)
        found, unplaced = _ask(engines, parts.objects, deadline, ScanObject(buf, fd))
        by_owner = {}
        for obj, threats in zip(parts.objects, found):
            if not threats:
                continue
            if obj.owner is None:
                unplaced += threats
            else:
                by_owner.setdefault(obj.owner, {}).setdefault(obj.filename, []).extend(threats)
    if not unplaced and not by_owner:
        return Examined(buf, names, "clean", [])
    threats = _threat_list(by_owner, unplaced)
    removable = _removable(by_owner)
    if unplaced or removable is None:
        return Examined(buf, names, "infected", threats)
    removed = [(part.start, part.end, _notice(findings, part.newline)) for part, findings in removable]
    cleaned = Examined(buf, names, "cleaned", threats, removed)
    # What the cleaned message holds that no engine has seen is what we wrote into
    # it: the header and the notices, which quote file names from the message.
    added = [ScanObject(piece) for piece in [cleaned.header(), *cleaned.notices()]]
    again = [t for verdicts in _ask(engines, added, deadline)[0] for t in verdicts]
    if again:
        return Examined(buf, names, "infected", list(dict.fromkeys(threats + again)))
    return cleaned


def _ask(engines, objects, deadline, whole=None):
    """([threats of each object], threats of the whole message), every engine's
    findings together; the whole message goes to the engines that want it too."""
    found = [[] for _ in objects]
    in_whole = []
    for engine in engines:
        check_deadline(deadline)
        extra = [whole] if whole is not None and engine.whole_message else []
        try:
            verdicts = engine.scan_objects(objects + extra, deadline)
        except EngineError:
            check_deadline(deadline)  # the request's time ran out, not the engine
            raise
        for k, threats in enumerate(verdicts[:len(objects)]):
            found[k] += threats
        for threats in verdicts[len(objects):]:
            in_whole += threats
    return found, in_whole


def _threat_list(by_owner, unplaced):
    """"Name in file" for what was found in a named part, then the bare names."""
    named = []
    for findings in by_owner.values():
        for filename, threats in findings.items():
            named += [printable(f"{t} in {filename}" if filename else t, MAX_THREAT) for t in threats]
    return list(dict.fromkeys(named + [printable(t, MAX_THREAT) for t in unplaced]))


def _removable(by_owner):
    """[(part to cut out, {file name: threats} found inside it)], outermost parts in
    message order; None if a threat sits in a part that cannot be separated."""
    chosen = {}
    for owner in by_owner:
        part = owner.removable
        if part is None:
            return None
        chosen[part] = {}
    outermost = []
    for part in sorted(chosen, key=lambda p: p.seq):
        if not (outermost and outermost[-1].contains(part)):
            outermost.append(part)
    starts = [part.seq for part in outermost]
    for owner, findings in sorted(by_owner.items(), key=lambda item: item[0].seq):
        holder = outermost[bisect.bisect_right(starts, owner.seq) - 1]
        for filename, threats in findings.items():
            chosen[holder].setdefault(filename, []).extend(threats)
    return [(part, chosen[part]) for part in outermost]


def _notice(findings, newline):
    """The text/plain part put in place of a removed one: printable ASCII only, so a
    file name can never bring a line break or a MIME part of its own."""
    nl = newline.decode()
    lines = []
    for filename, threats in findings.items():
        what = f'the attachment "{printable(filename, MAX_THREAT)}"' if filename else "a part of this message"
        lines.append(f"fp-qmail removed {what}: it contained "
                     f"{printable(', '.join(dict.fromkeys(threats)), 2 * MAX_THREAT)}.")
    header = (f"Content-Type: text/plain; charset=us-ascii{nl}"
              f"Content-Transfer-Encoding: 7bit{nl}"
              f"Content-Disposition: inline{nl}{nl}")
    return (header + nl.join(lines)).encode("ascii")  # the line break before the delimiter ends it

