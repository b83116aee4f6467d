"""The daemon's side of docs/protocol.md as pure functions: strict parsing with its
limits, whatever the chunking, and replies that stay within the rules; and the pieces
of the daemon that need no process to test: the fair queue, the memory budget, the
throttled log, the deadline."""

import logging
import time

import pytest
from hypothesis import given, settings, strategies as st

from fpqmail.scand import deadline, dispatch, log, protocol
from fpqmail.scand.protocol import Envelope, HeadReader, ProtocolError, Request

HEAD = b"FPQMAIL/1 SCAN\nIn: /tmp/fi1.0123456789abcdef\nOut: /tmp/fo1.0123456789abcdef\nSize: 42\nEnvelope: 12\n\n"
EXPECTED = Request("SCAN", 42, 12, "/tmp/fi1.0123456789abcdef", "/tmp/fo1.0123456789abcdef")


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


def test_a_descriptor_request_has_no_names_and_the_optional_headers_are_read():
    data = (b"FPQMAIL/1 SCAN\nSize: 3512\nEnvelope: 42\nOn-Virus: reject\nCaller: 1002\n"
            b"Client-IP: 192.0.2.7\nClient-Host: mx.example.org\n\n")
    assert feed_all(data)[0] == Request("SCAN", 3512, 42, None, None, "reject", 1002, "192.0.2.7",
                                        "mx.example.org")


def test_ping_needs_nothing_and_its_command_is_known_from_the_first_line():
    reader = HeadReader()
    assert reader.feed(b"FPQMAIL/1 PING\n") is None and reader.command == "PING"
    assert reader.feed(b"X-Later: 1\n\n") == Request("PING")
    reader = HeadReader()
    assert reader.feed(b"FPQMAIL/1 SCAN\nSi") is None and reader.command == "SCAN"


@pytest.mark.parametrize("data, reason", [
    (b"FPQMAIL/2 SCAN\n", "unsupported version"),
    (b"HELO there\n", "malformed request: not FPQMAIL"),
    (b"FPQMAIL/1 PONG\n", "malformed request: unknown command"),
    (HEAD.replace(b"Size: 42", b"Size: -42"), "malformed request: Size is not a decimal number"),
    (HEAD.replace(b"Size: 42", b"Size: 4 2"), "malformed request: Size is not a decimal number"),
    (HEAD.replace(b"Envelope: 12", b"Envelope: 16777217"), "malformed request: envelope too large"),
    (HEAD.replace(b"Size: 42\n", b""), "malformed request: missing Size"),
    (HEAD.replace(b"Size: 42\n", b"Size: 42\nsize: 42\n"), "malformed request: size given twice"),
    (HEAD.replace(b"Size: 42\n", b"Size 42\n"), "malformed request: bad header line"),
    (HEAD.replace(b"In: /tmp/fi1.0123456789abcdef\n", b""), "malformed request: In and Out go together"),
    (HEAD.replace(b"Size: 42\n", b"Size: 42\nOn-Virus: bounce\n"),
     "malformed request: On-Virus is not deliver, reject or drop"),
    (HEAD.replace(b"Size: 42\n", b"Size: 42\nCaller: 4294967296\n"), "malformed request: Caller is not a uid"),
    (HEAD.replace(b"Size: 42\n", b"Size: 42\nCaller: root\n"), "malformed request: Caller is not a uid"),
    (HEAD.replace(b"/tmp/fi1", "/tmp/fï1".encode()), "malformed request: header value not printable ASCII"),
    (HEAD.replace(b"/tmp/fi1", b"/tmp/f\x01i1"), "malformed request: header value not printable ASCII"),
])
def test_malformed_requests_are_refused_with_a_reason(data, reason):
    with pytest.raises(ProtocolError) as e:
        feed_all(data)
    assert str(e.value) == reason


def test_the_envelope_limit_is_16_MiB():
    assert feed_all(HEAD.replace(b"Envelope: 12", b"Envelope: 16777216"))[0].envelope_size == 16 << 20


def test_line_limit_is_4096_bytes_and_enforced_before_the_line_ends():
    longest = b"X-Pad: " + b"a" * (4096 - 7) + b"\n"
    assert feed_all(HEAD.replace(b"\n\n", b"\n" + longest + b"\n"))[0] == EXPECTED
    with pytest.raises(ProtocolError, match="line too long"):
        feed_all(HEAD.replace(b"\n\n", b"\n" + b"a" + longest + b"\n"))
    reader = HeadReader()
    reader.feed(b"FPQMAIL/1 SCAN\n" + b"x" * 4097)  # CR may still come
    with pytest.raises(ProtocolError, match="line too long"):
        reader.feed(b"xx")  # no line end yet, but already too long: never buffered further


def test_at_most_64_header_lines_and_the_reader_lets_go_of_its_buffer():
    padding = b"".join(b"X-Pad-%d: 1\n" % n for n in range(60))  # + the 4 required = 64
    reader = HeadReader()
    assert reader.feed(HEAD.replace(b"\n\n", b"\n" + padding + b"\n")) == EXPECTED
    assert reader.buffered == 0
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
    envelope = protocol.parse_envelope(bytearray(raw))
    assert envelope.sender == sender and list(envelope.recipients) == recipients
    assert envelope.recipient_count == len(recipients)
    assert envelope.raw() == raw and envelope == Envelope(sender, recipients)


def test_a_16_MiB_envelope_stays_one_buffer():
    raw = bytearray(b"F\0" + b"Tx\0" * ((16 * 1024 * 1024 - 3) // 3) + b"\0")
    envelope = protocol.parse_envelope(raw)
    assert envelope._raw is raw  # kept as it came: no copy, no object per recipient
    assert envelope.recipient_count == len(raw) // 3 - 1 and envelope.sender == b""


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
    assert len(protocol.error_reply("x" * 1000).split(b"\n")[1]) == len("Reason: ") + 200


# ---- the fair queue -----------------------------------------------------------------------

class Job:
    def __init__(self, key, n):
        self.key, self.n = key, n

    def __repr__(self):
        return f"{self.key}{self.n}"


def test_a_free_worker_takes_the_oldest_job_of_the_key_with_fewest_in_work():
    queue = dispatch.FairQueue()
    flood = [Job("a", n) for n in range(5)]
    for job in flood:
        assert queue.put(job, capacity=10) is None
    first = queue.take()
    assert first is flood[0]
    newcomer = Job("b", 0)
    queue.put(newcomer, capacity=10)
    assert queue.take() is newcomer  # "a" has one in work, "b" none: b goes first
    queue.done(newcomer)
    assert queue.take() is flood[1]
    queue.done(first)
    assert [queue.take() for _ in range(3)] == flood[2:]


def test_past_its_capacity_the_queue_drops_the_newest_of_the_longest_line():
    queue = dispatch.FairQueue()
    a = [Job("a", n) for n in range(3)]
    for job in a:
        assert queue.put(job, capacity=3) is None
    b = Job("b", 0)
    assert queue.put(b, capacity=3) is a[2]  # a flood makes its own newest wait out, not b
    assert queue.put(Job("a", 9), capacity=3).key == "a"
    assert queue.full(capacity=3)
    assert queue.remove(b) and not queue.remove(b)
    assert not queue.full(capacity=3)


def test_with_no_room_a_request_is_dropped_only_when_no_worker_is_idle():
    import threading
    queue = dispatch.FairQueue()
    taken = []
    worker = threading.Thread(target=lambda: taken.append(queue.take()))
    worker.start()
    while queue._idle == 0:
        time.sleep(0.001)
    job = Job("a", 0)
    assert queue.put(job, capacity=0) is None  # the idle worker takes it
    worker.join(5)
    assert taken == [job]
    assert queue.put(Job("a", 1), capacity=0).n == 1
    queue.close()
    assert queue.take() is None


def test_the_budget_refuses_what_does_not_fit():
    budget = dispatch.Budget(100)
    assert budget.take(60) and not budget.take(41) and budget.take(40)
    budget.give(100)
    assert budget.used == 0 and budget.peak == 100


# ---- the throttled log, the deadline ------------------------------------------------------

def test_a_repeated_line_is_logged_once_per_interval_with_a_count(monkeypatch, caplog):
    monkeypatch.setattr(log, "THROTTLE", 0.2)
    monkeypatch.setattr(log, "_throttle", log._Throttle())
    log.logger.propagate, was = True, log.logger.propagate
    try:
        with caplog.at_level(logging.WARNING, logger="fpqmail.scand"):
            for n in range(1000):
                log.throttled("flood", logging.WARNING, "accept failed: %d", n)
            log.throttled("other", logging.WARNING, "another kind")
            time.sleep(0.25)
            log.flush_throttled()
            log.throttled("flood", logging.WARNING, "accept failed: %d", 1000)
    finally:
        log.logger.propagate = was
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:2] == ["accept failed: 0", "another kind"]
    assert lines[2].startswith('999 more like "accept failed: 0"')
    assert lines[3] == "accept failed: 1000" and len(lines) == 4


def test_deadline_checks():
    deadline.check(None)
    deadline.check(time.monotonic() + 10)
    with pytest.raises(deadline.TimeLimit):
        deadline.check(time.monotonic() - 0.001)
    assert deadline.remaining(time.monotonic() + 100, 5) == 5
    assert deadline.remaining(None, 5) == 5
    with pytest.raises(deadline.TimeLimit):
        deadline.remaining(time.monotonic() - 1, 5)
