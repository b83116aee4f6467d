"""The daemon's side of docs/protocol.md as pure functions: strict parsing with its
limits, whatever the chunking, and replies that stay within the rules."""

import pytest
from hypothesis import given, settings, strategies as st

from fpqmail.scand import protocol
from fpqmail.scand.protocol import HeadReader, ProtocolError, Request

HEAD = b"FPQMAIL/1 SCAN\nIn: /tmp/fi1.0123456789abcdef\nOut: /tmp/fo1.0123456789abcdef\nSize: 42\nEnvelope: 12\n\n"
EXPECTED = Request("/tmp/fi1.0123456789abcdef", "/tmp/fo1.0123456789abcdef", 42, 12)


def feed_all(data, chunks=None):
    reader = HeadReader()
    pieces = chunks or [data]
    for n, piece in enumerate(pieces):
        result = reader.feed(piece)
        if result is not None:  # what the envelope reader gets: rest, then what follows
            return result, reader.rest + b"".join(pieces[n + 1:])
    return None, b""


def split(data, cuts):
    cuts = sorted(set(c % (len(data) + 1) for c in cuts))
    bounds = [0] + cuts + [len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=20))
def test_request_parses_the_same_in_any_chunking(cuts):
    data = HEAD + b"Fa\0Tb\0\0"
    request, rest = feed_all(data, split(data, cuts))
    assert request == EXPECTED
    assert rest == b"Fa\0Tb\0\0"


def test_crlf_lines_unknown_headers_and_any_header_case_are_accepted():
    data = (b"FPQMAIL/1 SCAN\r\nIN: /tmp/fi1.0123456789abcdef\r\nX-Later: 1\r\nout:/tmp/fo1.0123456789abcdef\r\n"
            b"size:   42  \r\nEnvelope: 12\r\n\r\nFa")
    request, rest = feed_all(data)
    assert request == EXPECTED and rest == b"Fa"


@pytest.mark.parametrize("data, reason", [
    (b"FPQMAIL/2 SCAN\n", "unsupported version"),
    (b"HELO there\n", "malformed request: not FPQMAIL"),
    (b"FPQMAIL/1 PING\n", "malformed request: unknown command"),
    (HEAD.replace(b"Size: 42", b"Size: -42"), "malformed request: Size is not a decimal number"),
    (HEAD.replace(b"Size: 42", b"Size: 4 2"), "malformed request: Size is not a decimal number"),
    (HEAD.replace(b"Envelope: 12", b"Envelope: 67108865"), "malformed request: envelope too large"),
    (HEAD.replace(b"Size: 42\n", b""), "malformed request: missing Size"),
    (HEAD.replace(b"Size: 42\n", b"Size: 42\nsize: 42\n"), "malformed request: size given twice"),
    (HEAD.replace(b"Size: 42\n", b"Size 42\n"), "malformed request: bad header line"),
    (HEAD.replace(b"/tmp/fi1", "/tmp/fï1".encode()), "malformed request: header value not printable ASCII"),
    (HEAD.replace(b"/tmp/fi1", b"/tmp/f\x01i1"), "malformed request: header value not printable ASCII"),
])
def test_malformed_requests_are_refused_with_a_reason(data, reason):
    with pytest.raises(ProtocolError) as e:
        feed_all(data)
    assert str(e.value) == reason


def test_line_limit_is_4096_bytes_and_enforced_before_the_line_ends():
    longest = b"X-Pad: " + b"a" * (4096 - 7) + b"\n"
    assert feed_all(HEAD.replace(b"\n\n", b"\n" + longest + b"\n"))[0] == EXPECTED
    with pytest.raises(ProtocolError, match="line too long"):
        feed_all(HEAD.replace(b"\n\n", b"\n" + b"a" + longest + b"\n"))
    reader = HeadReader()
    reader.feed(b"FPQMAIL/1 SCAN\n" + b"x" * 4097)  # CR may still come
    with pytest.raises(ProtocolError, match="line too long"):
        reader.feed(b"xx")  # no line end yet, but already too long: never buffered further


def test_at_most_64_header_lines():
    padding = b"".join(b"X-Pad-%d: 1\n" % n for n in range(60))  # + the 4 required = 64
    assert feed_all(HEAD.replace(b"\n\n", b"\n" + padding + b"\n"))[0] == EXPECTED
    with pytest.raises(ProtocolError, match="too many header lines"):
        feed_all(HEAD.replace(b"\n\n", b"\n" + padding + b"X-One-More: 1\n\n"))


@settings(max_examples=300)
@given(st.binary(max_size=600), st.lists(st.integers(min_value=0, max_value=600), max_size=8))
def test_arbitrary_bytes_give_a_request_none_or_a_protocol_error(data, cuts):
    try:
        request, _ = feed_all(data, split(data, cuts))
    except ProtocolError as e:
        assert protocol.printable(str(e)) == str(e)
    else:
        assert request is None or isinstance(request, Request)


@given(st.binary(max_size=40).filter(lambda b: b"\0" not in b),
       st.lists(st.binary(max_size=40).filter(lambda b: b"\0" not in b), max_size=5))
def test_envelope_round_trips_byte_for_byte(sender, recipients):
    raw = b"F" + sender + b"\0" + b"".join(b"T" + r + b"\0" for r in recipients) + b"\0"
    envelope = protocol.parse_envelope(raw)
    assert envelope.sender == sender and list(envelope.recipients) == recipients
    assert envelope.raw() == raw


@pytest.mark.parametrize("raw", [b"", b"\0", b"Fa\0", b"Fa\0Tb\0", b"Fa\0Xb\0\0", b"Fa\0\0Tb\0\0", b"Ta\0\0",
                                 b"Fa\0Tb\0\0\0"])
def test_malformed_envelopes_are_refused(raw):
    with pytest.raises(ProtocolError, match="malformed envelope"):
        protocol.parse_envelope(raw)


def test_replies_are_printable_one_line_values_within_64_KiB():
    reply = protocol.format_reply("CLEANED", [("Size", "10")] + [("Threat", "Evil\r\nX: y\x00" + "z" * 2000)] * 500)
    assert len(reply) <= protocol.MAX_REPLY
    lines = reply.decode("ascii").split("\n")
    assert lines[0] == "FPQMAIL/1 CLEANED" and lines[1] == "Size: 10" and reply.endswith(b"\n\n")
    threats = [line for line in lines if line.startswith("Threat: ")]
    assert len(threats) == protocol.MAX_THREATS
    assert threats[0] == "Threat: Evil??X: y?" + "z" * (protocol.MAX_VALUE - len("Evil??X: y?"))
    assert protocol.error_reply("busy") == b"FPQMAIL/1 ERROR\nReason: busy\n\n"
