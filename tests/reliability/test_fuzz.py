"""Fuzzing (issue 6, section 3): hypothesis on every parser that takes bytes from
outside, with a budget of FPQMAIL_FUZZ_CASES cases per test (CI: a few hundred;
`make fuzz`: 100 000). No crash, no hang (each case has FUZZ_HANG_SECONDS), and:

- envelope: fp-qmail's read_envelope + check_envelope decide exactly as the strict
  stand-in of qmail-queue does (exit code and envelope bytes), whatever the chunking;
- config: shconf.parse never raises, reads generated sh-quoted values exactly, and
  agrees with /bin/sh on every line it accepts;
- protocol, client end: queue.parse_reply either raises its garbage failure (74) or
  returns a reply that has what docs/protocol.md requires; the daemon's replies parse
  back to what it meant;
- protocol, server end: scand's HeadReader gives the same result whatever the
  chunking, parses requests of the grammar to their values, and its envelope parser
  agrees with fp-qmail's check;
- rewriting: scand's examine() never drops or changes a part that was not infected
  (mime_corpus's ground truth and oracle, over generated hostile MIME).

The existing property tests (test_config.py, test_scand_protocol.py, test_examine.py)
keep their small fixed budgets; these are the ones that scale.
"""
import contextlib
import io
import os
import signal
import subprocess
import tempfile
import types

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import mime_corpus as mc
import qmail_queue_standin as standin
from conftest import become
from fpqmail import queue, shconf
from fpqmail.scand import protocol
from fpqmail.scand.engines import make_engine
from fpqmail.scand.examine import examine

CASES = int(os.environ.get("FPQMAIL_FUZZ_CASES", "300"))
FUZZ_HANG_SECONDS = 10
fuzz = pytest.mark.fuzz


class Hang(Exception):
    pass


@contextlib.contextmanager
def no_hang(seconds):
    def on_alarm(signum, frame):
        raise Hang("a case ran longer than %d s" % seconds)
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_cases(request, *strategies):
    """Decorator: run the property over CASES generated cases, each under no_hang, and
    record how many ran (user property fuzz_cases, for the summary table)."""
    def decorate(prop):
        count = [0]

        @settings(max_examples=CASES, deadline=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                         HealthCheck.data_too_large, HealthCheck.large_base_example])
        @given(st.tuples(*strategies))
        def case(args):
            count[0] += 1
            with no_hang(FUZZ_HANG_SECONDS):
                prop(*args)
        try:
            case()
        finally:
            request.node.user_properties.append(("fuzz_cases", count[0]))
    return decorate


def chunked(data, sizes):
    """data cut into pieces of the given sizes (cycled), the rest in one last piece."""
    pieces, pos = [], 0
    for size in sizes:
        if pos >= len(data):
            break
        pieces.append(data[pos:pos + size])
        pos += size
    if pos < len(data):
        pieces.append(data[pos:])
    return pieces


# ---- envelope ---------------------------------------------------------------------------

class Exit(Exception):
    def __init__(self, code):
        super().__init__(code)
        self.code = code


class Reader:
    """read(fd, n) over a list of chunks, as a pipe gives them; then end of file."""

    def __init__(self, pieces):
        self.pieces = list(pieces)

    def read(self, fd, n):
        if not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        if len(piece) > n:
            self.pieces.insert(0, piece[n:])
        return piece[:n]


def standin_verdict(pieces):
    """(exit code, envelope) of the stand-in's reader (qmail-queue.c's rules)."""
    saved = standin.os, standin.die
    reader = Reader(pieces)

    def die(code):
        raise Exit(code)
    standin.os = types.SimpleNamespace(read=reader.read)
    standin.die = die
    try:
        return 0, standin.read_envelope(1)
    except Exit as e:
        return e.code, None
    finally:
        standin.os, standin.die = saved


def fp_qmail_verdict(pieces):
    saved = queue.posix
    queue.posix = types.SimpleNamespace(read=Reader(pieces).read)
    try:
        data = queue.read_envelope()
    finally:
        queue.posix = saved
    code, length = queue.check_envelope(data)
    return code, (data[:length] if code == 0 else None)


ADDRESS = st.one_of(
    st.binary(max_size=12).map(lambda b: b.replace(b"\0", b"")),
    st.integers(1000, 1006).map(lambda n: b"a" * n))  # around qmail's 1003-byte limit
VALID_ENVELOPE = st.builds(lambda s, rs: b"F" + s + b"\0" + b"".join(b"T" + r + b"\0" for r in rs) + b"\0",
                           ADDRESS, st.lists(ADDRESS, max_size=4))
ENVELOPE_BYTES = st.one_of(
    VALID_ENVELOPE,
    st.tuples(VALID_ENVELOPE, st.integers(0, 2000)).map(lambda t: t[0][:t[1]]),           # cut short
    st.tuples(VALID_ENVELOPE, st.integers(0, 2000), st.binary(min_size=1, max_size=1))    # one byte changed
      .map(lambda t: t[0][:t[1]] + t[2] + t[0][t[1] + 1:]),
    st.tuples(VALID_ENVELOPE, st.binary(max_size=20)).map(lambda t: t[0] + t[1]),          # bytes after it
    st.lists(st.sampled_from([b"F", b"T", b"\0", b"x", b"X", b"a" * 1002, b"a" * 1003]), max_size=12)
      .map(b"".join),
    st.binary(max_size=64))


@fuzz("envelope: fp-qmail vs qmail-queue's rules")
def test_envelope_checks_agree_with_qmail_queue(request):
    @run_cases(request, ENVELOPE_BYTES, st.lists(st.integers(1, 700), max_size=8))
    def prop(data, sizes):
        pieces = chunked(data, sizes)
        assert fp_qmail_verdict(pieces) == standin_verdict(pieces), data


# ---- config -------------------------------------------------------------------------------

NAME = st.from_regex(r"K[A-Z0-9_]{0,6}", fullmatch=True)  # never one of sh's own variables
VALUE = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0\n"), max_size=24)
SH_SPECIAL = set(" \t\n'\"\\$`;&|<>()*?[]{}~#!=%^,:")


def quote(value, style):
    if style == "single":
        return "'" + value.replace("'", "'\\''") + "'"
    if style == "double":
        return '"' + "".join("\\" + c if c in '"\\$`' else c for c in value) + '"'
    return "".join("\\" + c if c in SH_SPECIAL else c for c in value) or "''"  # bare


@st.composite
def sh_quoted_file(draw):
    """An sh assignment file and the values it assigns (the later assignment wins)."""
    expected, lines = {}, []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["assign", "assign", "assign", "comment", "blank"]))
        if kind == "comment":
            lines.append(draw(st.sampled_from(["", " ", "\t"])) + "#" + draw(VALUE))
            continue
        if kind == "blank":
            lines.append(draw(st.sampled_from(["", " ", "\t \t"])))
            continue
        words = []
        for _ in range(draw(st.integers(1, 3))):
            name, value = draw(NAME), draw(VALUE)
            pieces = draw(st.lists(st.sampled_from(["single", "double", "bare"]), min_size=1, max_size=3))
            cuts = sorted(draw(st.lists(st.integers(0, len(value)), min_size=len(pieces) - 1,
                                        max_size=len(pieces) - 1)))
            bounds = [0] + cuts + [len(value)]
            words.append(name + "=" + "".join(quote(value[a:b], style)
                                              for style, a, b in zip(pieces, bounds, bounds[1:])))
            expected[name] = value
        line = draw(st.sampled_from(["", " ", "\t"])) + draw(st.sampled_from(["", "export "]))
        line += draw(st.sampled_from([" ", "\t", "  "])).join(words)
        line += draw(st.sampled_from(["", " ", " # a comment", "\t#x"]))
        lines.append(line)
    return "\n".join(lines) + draw(st.sampled_from(["", "\n"])), expected


class Shell:
    """A persistent /bin/sh, as nobody, in an empty directory, with no PATH: evaluates
    a text in a subshell and reports the values it assigned."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="fpq-sh-")
        os.chmod(self.dir, 0o755)
        self.proc = subprocess.Popen(["/bin/sh"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, cwd=self.dir, preexec_fn=become("nobody"),
                                     env={"PATH": "/nonexistent", "HOME": "/nonexistent"})

    def assigns(self, text, names):
        quoted = "'" + text.replace("'", "'\\''") + "'"
        script = "(eval %s >/dev/null 2>&1 || exit 9; printf 'ok\\0'; %s); printf 'END\\0'\n" % (
            quoted, "; ".join("printf '%%s\\0' \"${%s-}\"" % n for n in names) or ":")
        self.proc.stdin.write(script.encode("utf-8", "surrogateescape"))
        self.proc.stdin.flush()
        out = b""
        while not out.endswith(b"END\0"):
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            assert chunk, "sh died"
            out += chunk
        fields = out[:-4].split(b"\0")[:-1]
        if fields[:1] != [b"ok"]:
            return None
        return dict(zip(names, (f.decode("utf-8", "surrogateescape") for f in fields[1:])))

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()
        os.rmdir(self.dir)


@pytest.fixture(scope="module")
def shell():
    s = Shell()
    yield s
    s.close()


@fuzz("config: sh-quoted values")
def test_config_reads_sh_quoted_values_exactly_as_sh(request, shell):
    @run_cases(request, sh_quoted_file())
    def prop(case):
        text, expected = case
        values, problems = shconf.parse(text)
        assert problems == [] and values == expected, (text, values, problems)
        assert shell.assigns(text, sorted(expected)) == expected, text


SH_LINE = st.lists(st.one_of(
    st.sampled_from(["K", "KA", "KB_1", "=", "'", '"', "\\", "$", "`", "#", " ", "\t", ";", "&", "|",
                     "<", ">", "(", ")", "~", "*", "?", "[", "]", "{", "}", "!", ":", "export ", "$(", "${",
                     "\\'", "'\\''", "\u00e9", "\r"]),
    VALUE.map(lambda v: v[:4])), max_size=14).map("".join)


@fuzz("config: any text")
def test_config_never_raises_and_agrees_with_sh_on_what_it_accepts(request, shell):
    @run_cases(request, st.lists(SH_LINE, max_size=4).map("\n".join))
    def prop(text):
        values, problems = shconf.parse(text)
        assert all(isinstance(n, int) and isinstance(p, str) for n, p in problems)
        if not problems:  # only assignments: sh runs nothing else
            assert shell.assigns(text, sorted(values)) == values, (text, values)


# ---- protocol: fp-qmail's end --------------------------------------------------------------

STATUS = st.sampled_from(["CLEAN", "CLEANED", "INFECTED", "ERROR", "clean", "BUSY", ""])
HEADER_NAME = st.sampled_from(["Size", "Threat", "Reason", "Engines", "Id", "X-Later", "size", "SIZE",
                               "Bad Name", "", "Size:"])
HEADER_VALUE = st.one_of(st.integers(0, 10 ** 6).map(str), st.text(max_size=20),
                         st.sampled_from(["", " ", "12 ", " 7", "0", "-1", "1e3", "\u0663"]))
REPLY_BYTES = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda status, headers, end, tail: (
        "FPQMAIL/1 " + status + "\n" + "".join("%s: %s\n" % h for h in headers) + end
    ).encode("utf-8", "surrogateescape") + tail,
        STATUS, st.lists(st.tuples(HEADER_NAME, HEADER_VALUE), max_size=5),
        st.sampled_from(["\n", "", "\r\n"]), st.sampled_from([b"", b"x", b"\n"])))


@fuzz("protocol: fp-qmail's reply parser")
def test_reply_parser_accepts_only_what_the_protocol_allows(request):
    @run_cases(request, REPLY_BYTES, st.integers(0, 70))
    def prop(reply, fo_size):
        try:
            status, fields = queue.parse_reply(reply)
        except queue.Fail as e:
            assert e.code == queue.SCANNER_GARBLED and e.scanner
            return
        assert reply.startswith(b"FPQMAIL/1 ") and reply.endswith(b"\n\n") and reply.count(b"\n\n") == 1
        assert status in queue.STATUSES
        for key in queue.STATUSES[status]:
            assert fields[key] and all(fields[key])
        if "size" in fields:  # the size check against the fo fp-qmail holds
            fd = os.memfd_create("fo")
            try:
                os.ftruncate(fd, fo_size)
                try:
                    size = queue.announced_size(fields, fd)
                except queue.Fail as e:
                    assert e.code == queue.SCANNER_GARBLED
                else:
                    assert size == fo_size > 0 and fields["size"] == [str(fo_size)]
            finally:
                os.close(fd)


@fuzz("protocol: daemon's replies, both ends")
def test_replies_the_daemon_formats_parse_back(request):
    @run_cases(request, st.sampled_from(["CLEAN", "CLEANED", "INFECTED", "ERROR"]),
               st.lists(st.tuples(st.sampled_from(["Size", "Threat", "Reason", "Engines", "Id", "X-Later"]),
                                  st.text(max_size=30)), max_size=6))
    def prop(status, headers):
        reply = protocol.format_reply(status, headers)
        sent = {}
        for name, value in headers:
            if name != "Threat" or len(sent.get("threat", [])) < protocol.MAX_THREATS:
                sent.setdefault(name.lower(), []).append(protocol.printable(value)[:protocol.MAX_VALUE].strip())
        complete = all(sent.get(key) and all(sent[key]) for key in queue.STATUSES[status])
        try:
            got_status, fields = queue.parse_reply(reply)
        except queue.Fail:
            assert not complete, reply
        else:
            assert complete and got_status == status and fields == sent


# ---- protocol: the daemon's end ---------------------------------------------------------------

def feed(data, sizes):
    """The daemon's HeadReader over the pieces: ("request", Request, rest) or
    ("error", reason) or ("incomplete",)."""
    reader = protocol.HeadReader()
    pieces = chunked(data, sizes)
    try:
        for n, piece in enumerate(pieces):
            result = reader.feed(piece)
            if result is not None:
                return "request", result, reader.rest + b"".join(pieces[n + 1:])
    except protocol.ProtocolError as e:
        return "error", str(e)
    return ("incomplete",)


@fuzz("protocol: daemon's request parser")
def test_request_parser_is_the_same_in_any_chunking(request):
    head = st.lists(st.sampled_from([b"FPQMAIL/1 SCAN", b"FPQMAIL/1 PING", b"In: /tmp/fi1.0123456789abcdef",
                                     b"Out: /tmp/fo1.0123456789abcdef", b"Size: 5", b"Envelope: 3",
                                     b"X-Later: x", b"size: 05", b"In:", b"Size: -1", b"a" * 4097, b"",
                                     b"FPQMAIL/2 SCAN", b"\xff", b"Caller: 1002", b"Caller: -1",
                                     b"On-Virus: drop", b"On-Virus: x", b"Client-IP: 192.0.2.1"]), max_size=10)
    data = st.one_of(st.binary(max_size=400),
                     st.tuples(head, st.sampled_from([b"\n", b"\r\n"]), st.binary(max_size=8))
                     .map(lambda t: t[1].join(t[0]) + t[1] + t[2]))

    @run_cases(request, data, st.lists(st.integers(1, 64), max_size=12))
    def prop(data, sizes):
        whole = feed(data, [])
        assert feed(data, sizes) == whole
        if whole[0] == "error":
            assert protocol.printable(whole[1]) == whole[1]


SPOOL_SUFFIX = st.builds("{}.{}".format, st.integers(1, 4 * 10 ** 6), st.binary(min_size=8, max_size=8).map(bytes.hex))


@fuzz("protocol: daemon's request parser")
def test_requests_of_the_grammar_parse_to_their_values(request):
    @run_cases(request, SPOOL_SUFFIX, st.integers(0, 10 ** 12), VALID_ENVELOPE,
               st.sampled_from([b"\n", b"\r\n"]), st.permutations(range(4)),
               st.lists(st.sampled_from([b"X-Later: 1", b"Engines-Wanted: all"]), max_size=2),
               st.lists(st.integers(1, 64), max_size=8))
    def prop(suffix, size, envelope, newline, order, extra, sizes):
        fields = [b"In: /tmp/fi" + suffix.encode(), b"Out: /tmp/fo" + suffix.encode(),
                  b"Size: %d" % size, b"Envelope: %d" % len(envelope)]
        lines = [b"FPQMAIL/1 SCAN"] + [fields[k] for k in order] + extra
        data = newline.join(lines) + newline + newline + envelope
        result = feed(data, sizes)
        assert result[:2] == ("request", protocol.Request("SCAN", size, len(envelope), "/tmp/fi" + suffix,
                                                          "/tmp/fo" + suffix)), result
        assert result[2] == envelope


@fuzz("protocol: envelope, both ends")
def test_daemon_envelope_parser_agrees_with_qmail_queue(request):
    # The daemon takes exactly the envelopes qmail-queue takes whole, and keeps every byte.
    @run_cases(request, ENVELOPE_BYTES)
    def prop(data):
        code, envelope = standin_verdict([data])
        try:
            parsed = protocol.parse_envelope(data)
        except protocol.ProtocolError:
            assert not (code == 0 and envelope == data), data
        else:
            assert (code, envelope) == (0, data), data
            assert parsed.raw() == data


# ---- message rewriting --------------------------------------------------------------------------

BODY = st.binary(max_size=200).map(lambda b: bytes(c for c in b if c not in b"-\r\n") or b"x")
NEWLINE = st.sampled_from([mc.CRLF, mc.LF])


@st.composite
def entity(draw, nl, depth=0):
    """A MIME entity: leaves of every encoding, zips, multiparts (nested, unclosed, with
    preamble and epilogue), message/rfc822 parts, digests; EICAR in some leaves."""
    shape = draw(st.sampled_from(["leaf", "leaf", "multipart", "rfc822"] if depth < 3 else ["leaf"]))
    if shape == "multipart":
        children = draw(st.lists(entity(nl, depth + 1), min_size=1, max_size=4))
        subtype = draw(st.sampled_from(["mixed", "alternative", "related", "digest"]))
        if subtype == "digest":
            children = [mc.message(c, nl) for c in children]
        boundary = draw(st.sampled_from(["b", "=_%d" % depth, "x" * 70, "a'b(c)+_,-./:=?", "==" * 5]))
        boundary += "_%d_%d" % (depth, draw(st.integers(0, 99)))
        return mc.multipart(children, nl, subtype, boundary,
                            preamble=draw(st.sampled_from([b"", b"preamble", b"--not-a-boundary"])),
                            epilogue=draw(st.sampled_from([b"", b"epilogue" + nl])),
                            close=draw(st.booleans()) if depth == 0 else True)
    if shape == "rfc822":
        return mc.rfc822(mc.message(draw(entity(nl, depth + 1)), nl, b"forwarded"), nl)
    body = draw(BODY)
    if draw(st.integers(0, 3)) == 0:
        cut = draw(st.integers(0, len(body)))
        body = body[:cut] + mc.EICAR + body[cut:]
    if draw(st.integers(0, 4)) == 0:
        members = {"m%d.bin" % k: draw(BODY) for k in range(draw(st.integers(1, 3)))}
        if mc.EICAR in body:
            members["in.com"] = body
        return mc.leaf(mc.zip_of(members), nl, "application/zip", "base64", "archive.zip")
    encoding = draw(st.sampled_from(["7bit", "8bit", "base64", "quoted-printable"]))
    ctype = draw(st.sampled_from(["text/plain; charset=us-ascii", "application/octet-stream",
                                  "text/html; charset=\"iso-8859-1\"", "image/png; name=x.png"]))
    filename = draw(st.sampled_from([None, "file.bin", "r\u00e9sum\u00e9.com", "a b;c.txt"]))
    return mc.leaf(body, nl, ctype, encoding, filename)


@st.composite
def hostile_message(draw):
    nl = draw(NEWLINE)
    return mc.message(draw(entity(nl)), nl, extra=draw(st.sampled_from(
        [(), (b"X-Spam: " + b"y" * 900,), (b"X-Folded: a" + nl + b"\tb",)])))


@pytest.fixture(scope="module")
def builtin():
    return make_engine("builtin", {})


@fuzz("rewriting: examine()")
def test_rewriting_changes_only_infected_parts(request, builtin):
    @run_cases(request, hostile_message())
    def prop(built):
        result = examine(built.data, None, [builtin])
        out = io.BytesIO()
        assert result.write(out) == len(out.getvalue())
        assert result.status == built.expected_status, built.data
        mc.check_output(out.getvalue(), built, result.status)
        if result.status == "cleaned":
            assert mc.EICAR not in out.getvalue()
