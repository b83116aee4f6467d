"""The fpscand engine against the strict fpscand test double (a real TCP server)."""

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fpqmail.scand.deadline import TimeLimit
from fpqmail.scand.engines import EngineError, make_engine
from fpqmail.scand.engines.fpscand import parse_reply
from fpqmail.scand.examine import examine
from fpscand_double import IOERROR_MARK, SUSPICIOUS_MARK
from mime_corpus import (CRLF, EICAR, check_output, corpus, leaf, message, multipart, realistic, rfc822,
                         text_and_attachment, zip_of)

DOUBLE = Path(__file__).with_name("fpscand_double.py")


class Double:
    def __init__(self, tmp_path, mode):
        self.violations = tmp_path / f"violations-{mode}"
        self.sessions = tmp_path / f"sessions-{mode}"
        self.process = subprocess.Popen(
            [sys.executable, str(DOUBLE), "--mode", mode, "--max-size", str(1 << 20),
             "--violations", str(self.violations), "--sessions", str(self.sessions)],
            stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        assert line.startswith("PORT "), line
        self.address = f"127.0.0.1:{int(line.split()[1])}"

    def violation_lines(self):
        return self.violations.read_text().splitlines() if self.violations.exists() else []

    def session_lines(self):
        """One line per connection ended: the stream names it scanned."""
        return self.sessions.read_text().splitlines() if self.sessions.exists() else []

    def stop(self):
        self.process.terminate()
        self.process.wait(10)
        self.process.stdout.close()


@pytest.fixture(scope="module")
def doubles(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fpscand")
    started = {mode: Double(tmp, mode) for mode in ("normal", "garbage", "silent", "close")}
    yield started
    for double in started.values():
        double.stop()
    assert started["normal"].violation_lines() == [], "the engine broke the protocol"


@pytest.fixture
def engine(doubles):
    return make_engine(f"fpscand:{doubles['normal'].address}", {})


def test_verdicts(engine):
    engine.ping()
    assert engine.scan(b"harmless") == []
    assert engine.scan(b"") == []
    assert engine.scan(b"x" + EICAR, filename="odd name;.com") == ["EICAR_Test_File"]
    assert engine.scan(SUSPICIOUS_MARK) == ["Heuristic_Test"]
    assert engine.scan(zip_of({"ok.txt": b"fine", "bad.com": EICAR}), filename="a.zip") == ["EICAR_Test_File"]


def test_error_bits_are_engine_errors(engine):
    with pytest.raises(EngineError, match="not scanned: 16 <I/O error>"):
        engine.scan(IOERROR_MARK)


def test_size_limit_is_an_engine_error_before_sending(doubles):
    engine = make_engine(f"fpscand:{doubles['normal'].address}", {"FP_SCAND_FPSCAND_MAX_SIZE": "1000"})
    with pytest.raises(EngineError, match="over FP_SCAND_FPSCAND_MAX_SIZE"):
        engine.scan(b"a" * 1001)
    assert engine.scan(b"a" * 1000) == []


@pytest.mark.parametrize("mode", ["garbage", "silent", "close"])
def test_broken_daemon_is_an_engine_error(doubles, mode):
    engine = make_engine(f"fpscand:{doubles[mode].address}", {"FP_SCAND_FPSCAND_TIMEOUT": "0.5"})
    with pytest.raises(EngineError, match="fpscand: "):
        engine.scan(b"hello")


def test_down_and_failover(doubles):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(EngineError):
        make_engine(f"fpscand:{dead}", {}).ping()
    engine = make_engine(f"fpscand:{dead},{doubles['garbage'].address},{doubles['normal'].address}", {})
    assert engine.scan(EICAR) == ["EICAR_Test_File"]
    with pytest.raises(ValueError):
        make_engine("fpscand:/var/run/fpscand.sock", {})


def test_double_is_strict(tmp_path):
    """The double must refuse what fpscand would not take, or it proves nothing."""
    double = Double(tmp_path, "normal")
    try:
        for request in (b"SCAN STREAM x SIZE 1\r\nA", b"SCAN STREAM x 1\nA", b"SCAN STREAM x SIZE 5\nAB",
                        b"scan stream x size 1\nA", b"SCAN STREAM x SIZE 2000000\n", b"PING\n"):
            with socket.create_connection(("127.0.0.1", int(double.address.split(":")[1]))) as s:
                s.sendall(request)
                s.shutdown(socket.SHUT_WR)
                assert s.recv(100) == b"", request
        assert len(double.violation_lines()) == 6, double.violation_lines()
    finally:
        double.stop()


def test_parse_reply():
    assert parse_reply(["0 <clean> m"], "m") == []
    assert parse_reply(["64 <not scanned, clean> m"], "m") == []
    assert parse_reply(["1 <infected: W32/A> m->x", "1 <infected: W32/A> m"], "m") == ["W32/A"]
    assert parse_reply(["3 <infected: B> m"], "m") == ["B"]
    assert parse_reply(["9 <infected: C> m"], "m") == ["C"], "a threat found stands"
    for lines in (["8 <skipped> m"], ["32 <engine error> m"], ["4 <interrupted> m"], ["128 <disinfected> m"],
                  ["300 <x> m"], ["0 <clean> other"], ["clean m"]):
        with pytest.raises(EngineError):
            parse_reply(lines, "m")


def test_examine_with_fpscand(engine):
    for name, built in corpus().items():
        result = examine(built.data, None, [engine])
        out = io.BytesIO()
        result.write(out)
        assert result.status == built.expected_status, name
        check_output(out.getvalue(), built, result.status)
    result = examine(text_and_attachment(zip_of({"e.com": EICAR}), filename="invoice.zip").data, None, [engine])
    assert result.threats == ["EICAR_Test_File in invoice.zip"]


def test_one_connection_per_message_one_stream_per_object(doubles, engine):
    tag = os.urandom(4).hex()  # names no other test's session has
    built = message(multipart([leaf(b"text" + CRLF),
                               leaf(b"one", CRLF, "application/octet-stream", "base64", f"a{tag}.bin"),
                               leaf(b"two", CRLF, "application/octet-stream", "base64", f"b {tag}.bin")]))
    assert examine(built.data, None, [engine]).status == "clean"
    deadline = time.monotonic() + 10
    while not [line for line in doubles["normal"].session_lines() if tag in line] and time.monotonic() < deadline:
        time.sleep(0.01)
    # the bytes around the parts, the text, the two attachments: one connection
    assert [line for line in doubles["normal"].session_lines() if tag in line] == \
        [f"message message a{tag}.bin b_{tag}.bin"]


@pytest.mark.parametrize("encoding", ["7bit", "base64", "quoted-printable"])
def test_eicar_in_a_forwarded_message_in_any_encoding(encoding, engine):
    inner = message(multipart([leaf(b"inner" + CRLF), leaf(EICAR, CRLF, "application/octet-stream", "base64",
                                                           "inner.com")], boundary="in"), CRLF, b"inner")
    built = message(multipart([leaf(b"forwarding" + CRLF), rfc822(inner, CRLF, encoding)]))
    result = examine(built.data, None, [engine])
    assert result.status == "cleaned" and result.threats == ["EICAR_Test_File in inner.com"]


def test_realistic_corpus(engine):
    for seed in range(100):
        built = realistic(seed)
        result = examine(built.data, None, [engine])
        out = io.BytesIO()
        result.write(out)
        assert result.status == built.expected_status, seed
        check_output(out.getvalue(), built, result.status)


def test_a_silent_engine_never_holds_a_request_past_its_deadline(doubles):
    engine = make_engine(f"fpscand:{doubles['silent'].address}", {"FP_SCAND_FPSCAND_TIMEOUT": "60"})
    started = time.monotonic()
    with pytest.raises(TimeLimit):
        examine(corpus()["plain-lf"].data, None, [engine], deadline=started + 0.5)
    assert time.monotonic() - started < 5  # the engine's 60 s did not count
