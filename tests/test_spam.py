"""The spam engines (fpqmail/scand/spam/) against real, private rspamd and spamd
(tests/spam_fixtures.py): verdicts, what reaches the engine, the outcomes when the
engine is down, silent, garbled or skipped, the headers of a scored message, and the
load spread over three rspamd with one killed mid-run."""

import re
import signal
import threading
import time
from collections import Counter

import pytest

from fpqmail.scand.engines import EngineError
from fpqmail.scand.spam import (DELIVER, MAX_SIZE, NO, REJECT, TAG, UNKNOWN, UNSCORED, YES, Client,
                                SpamResult, header_block, make_spam_engine)
from fpqmail.scand.spam import rspamd as rspamd_module
from fpqmail.scand.spam import spamd as spamd_module

pytest.register_assert_rewrite("spam_fixtures")  # a plugin (below) imported here first
from spam_fixtures import HAM, SPAM  # noqa: E402

pytest_plugins = ["spam_fixtures"]

SENDER = b"alice@example.org"
RCPTS = [b"bob@example.net"]


def closed_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["rspamd-tcp", "rspamd-unix", "spamd-tcp", "spamd-unix"])
def engine(request):
    kind, transport = request.param.split("-")
    instance = request.getfixturevalue(kind)
    spec = instance.tcp_spec if transport == "tcp" else instance.unix_spec
    return make_spam_engine(spec), spec


def test_gtube_is_spam(engine):
    engine, spec = engine
    engine.ping()
    result = engine.score(SPAM, SENDER, RCPTS)
    assert "GTUBE" in result.symbols
    assert result.endpoint == spec.partition(":")[2]
    if engine.name == "rspamd":
        assert (result.action, result.score, result.required) == (REJECT, 15.0, 15.0)
    else:
        assert result.action == TAG and result.score >= 1000 and result.required == 5.0


def test_an_ordinary_message_is_ham_with_a_score(engine):
    engine, spec = engine
    result = engine.score(HAM, SENDER, RCPTS, client=Client.of("93.184.216.34", "mx.example.org"),
                          queue_id="4242.0123456789abcdef")
    assert result.action == DELIVER and result.known
    assert 0 <= result.score < 3 < result.required, result
    block = header_block(result, NO, result.required, b"\r\n")
    assert block.startswith(b"X-Spam-Status: No, score=%.1f required=%.1f" % (result.score, result.required))
    assert b"X-Spam-Score: %.1f\r\n" % result.score in block
    assert b"X-Spam-Flag" not in block


def test_the_envelope_and_the_client_reach_rspamd(rspamd):
    engine = make_spam_engine(rspamd.tcp_spec)
    queue_id = "4242.%d" % time.monotonic_ns()
    rcpts = [b"bob@example.net", b"carol@example.com", b"evil@example.com\r\nX-Injected: 1"]
    result = engine.score(HAM, SENDER, rcpts, client=Client.of("93.184.216.34", "mx.example.org"),
                          queue_id=queue_id)
    assert result.known, result
    line = _rspamd_task_line(rspamd, queue_id)
    assert "ip: 93.184.216.34" in line and "from: <alice@example.org>" in line
    # Every recipient as its own Rcpt header; one with CR LF in it is left out, never
    # allowed to end the header line and start one of its own.
    assert "rcpts: <bob@example.net,carol@example.com>" in line
    assert "evil" not in line and "Injected" not in line
    # The recipient for per-user settings (Deliver-To) is a header rspamd takes.
    assert engine.score(HAM, SENDER, RCPTS, user=b"bob@example.net").known


def _rspamd_task_line(rspamd, queue_id):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in rspamd.log().splitlines():
            if f"qid: <{queue_id}>" in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"rspamd did not log {queue_id}: {rspamd.log()[-5000:]}")


def test_the_recipient_as_spamd_user(spamd):
    engine = make_spam_engine(spamd.tcp_spec)
    before = spamd.log().count("user=carol@example.com,")
    assert engine.score(HAM, SENDER, [b"carol@example.com"], user=b"carol@example.com").known
    deadline = time.monotonic() + 10
    while spamd.log().count("user=carol@example.com,") == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert spamd.log().count("user=carol@example.com,") == before + 1, spamd.log()[-5000:]
    # A name that would break the request line is not sent: site-wide scores instead.
    assert engine.score(HAM, SENDER, RCPTS, user=b"bob@example.net\r\nUser: root").known


@pytest.mark.parametrize("kind", ["rspamd", "spamd"])
def test_an_engine_stopped_gives_unknown(kind, request):
    instance = request.getfixturevalue(f"start_{kind}")()
    engine = make_spam_engine(instance.unix_spec + "," + instance.tcp_spec.partition(":")[2])
    assert engine.score(SPAM, SENDER, RCPTS).known
    instance.stop()
    result = engine.score(SPAM, SENDER, RCPTS)
    assert result.action == UNKNOWN and not result.skipped
    assert result.reason.startswith(f"{kind}: ") and instance.socket_path in result.reason, result.reason
    with pytest.raises(EngineError):
        engine.ping()
    assert header_block(result, UNSCORED, 0.0) == b"X-Spam-Status: Unknown\n"


@pytest.mark.parametrize("kind", ["rspamd", "spamd"])
def test_a_silent_engine_gives_unknown_within_its_timeout_and_the_deadline(kind, request):
    instance = request.getfixturevalue(kind)
    instance.signal(signal.SIGSTOP)  # accepts (the kernel does) and never answers
    try:
        engine = make_spam_engine(instance.tcp_spec, timeout=0.5)
        start = time.monotonic()
        result = engine.score(HAM, SENDER, RCPTS)
        assert time.monotonic() - start < 10
        assert result.action == UNKNOWN and "timed out" in result.reason, result
        engine = make_spam_engine(instance.tcp_spec, timeout=60)
        start = time.monotonic()
        result = engine.score(HAM, SENDER, RCPTS, deadline=start + 0.5)
        assert time.monotonic() - start < 10, "the deadline, not the 60 s timeout"
        assert result.action == UNKNOWN and "time limit reached" in result.reason, result
    finally:
        instance.signal(signal.SIGCONT)


def test_over_the_size_limit_is_skipped_before_connecting(spamd):
    assert MAX_SIZE == 512_000, "spamc's default, as documented"
    nowhere = make_spam_engine(f"spamd:127.0.0.1:{closed_port()}", max_size=len(HAM) - 1)
    result = nowhere.score(HAM, SENDER, RCPTS)
    assert result.action == UNKNOWN and result.skipped
    assert result.reason == f"not scored: {len(HAM)} bytes, over the limit of {len(HAM) - 1}"
    exact = make_spam_engine(spamd.tcp_spec, max_size=len(HAM))
    assert exact.score(memoryview(HAM), SENDER, RCPTS).known, "the limit is inclusive; a memoryview is fine"


def test_a_garbled_reply_gives_unknown(clamd, spamd):
    # Each protocol spoken to a daemon that speaks another: real garbage from real daemons.
    # (rspamd understands spamd's protocol too, so it cannot serve as spamd's garbage.)
    wrong = make_spam_engine(f"spamd:{clamd.unix_socket}").score(HAM, SENDER, RCPTS)
    assert wrong.action == UNKNOWN and "UNKNOWN COMMAND" in wrong.reason, wrong
    wrong = make_spam_engine("rspamd:127.0.0.1:%d" % spamd.port).score(HAM, SENDER, RCPTS)
    assert wrong.action == UNKNOWN and "SPAMD/1.0 76 " in wrong.reason, wrong


def test_a_large_message_is_streamed_whole(rspamd):
    # Both transports; spamd shares the sending code, and takes seconds over this much text.
    body = b"".join(b"line %06d of a long and boring but perfectly ordinary letter\n" % n for n in range(7500))
    big = HAM + body.replace(b"\n", b"\r\n")
    assert 450_000 < len(big) < MAX_SIZE
    for spec in (rspamd.tcp_spec, rspamd.unix_spec):
        result = make_spam_engine(spec).score(big, SENDER, RCPTS)
        assert result.known, result


def test_three_rspamd_share_the_load_one_killed_mid_run_is_skipped_then_retried(start_rspamd):
    farm = [start_rspamd() for _ in range(3)]
    names = [f"127.0.0.1:{r.port}" for r in farm]
    engine = make_spam_engine("rspamd:" + ",".join(names), backoff=(1.0, 1.0))
    # One daemon's requests, one after another: an equal share each.
    assert Counter(engine.score(HAM, SENDER, RCPTS).endpoint for _ in range(30)) == {n: 10 for n in names}

    # Four workers at once; one engine host dies (SIGKILL) while they run, and they go
    # on for 1.5 s more: past the killed one's back-off, so it is retried (and fails over).
    done = []  # (monotonic time the answer came, result)
    lock = threading.Lock()
    stop = threading.Event()

    def worker():
        for _ in range(2000):
            if stop.is_set():
                return
            result = engine.score(HAM, SENDER, RCPTS)
            with lock:
                done.append((time.monotonic(), result))

    workers = [threading.Thread(target=worker) for _ in range(4)]
    for t in workers:
        t.start()
    deadline = time.monotonic() + 60
    while len(done) < 40 and time.monotonic() < deadline:
        time.sleep(0.005)
    farm[1].kill()
    killed_at = time.monotonic()  # the killed rspamd's processes are gone (waited for)
    time.sleep(1.5)
    stop.set()
    for t in workers:
        t.join(120)
    assert all(result.known for _, result in done), "failover: no message went unscored"
    # An answer received just before the kill may be counted by its worker just after.
    before = Counter(r.endpoint for t, r in done if t < killed_at)
    after = Counter(r.endpoint for t, r in done if t > killed_at + 0.5)
    assert set(before) == set(names), before
    assert set(after) == {names[0], names[2]} and sum(after.values()) >= 20, after

    # It comes back on the same address: after its back-off it gets its share again.
    start_rspamd(port=farm[1].port)
    time.sleep(1.2)
    served = Counter(engine.score(HAM, SENDER, RCPTS).endpoint for _ in range(30))
    assert set(served) == set(names) and served[names[1]] >= 5, served


def test_parse_replies():
    ok = b'{"action": "add header", "score": 7.5, "required_score": 15, "symbols": {"A": {}, "B\\u0007": {}}}'
    result = rspamd_module.parse_reply("HTTP/1.1 200 OK", ok)
    assert (result.action, result.score, result.required, result.symbols) == (TAG, 7.5, 15.0, ("A", "B?"))
    soft = b'{"action": "soft reject", "score": 5, "required_score": 15, "messages": {"smtp_message": "Try again later"}}'
    assert rspamd_module.parse_reply("HTTP/1.1 200 OK", soft).reason == "Try again later"
    assert rspamd_module.parse_reply("HTTP/1.1 200 OK", ok.replace(b"add header", b"future action")).action == TAG
    for status, body in (("HTTP/1.1 500 Internal", b"{}"), ("HTTP/1.1 200 OK", b"not json"),
                         ("HTTP/1.1 200 OK", b'{"action": "reject", "score": "15", "required_score": 15}'),
                         ("HTTP/1.1 200 OK", b'{"action": "reject", "score": true, "required_score": 15}'),
                         ("HTTP/1.1 200 OK", b'{"action": 1, "score": 1, "required_score": 15}'),
                         ("HTTP/1.1 200 OK", b'[1, 2]'), ("SPAMD/1.1 0 EX_OK", b"{}")):
        with pytest.raises(EngineError):
            rspamd_module.parse_reply(status, body)
    result = spamd_module.parse_reply("SPAMD/1.1 0 EX_OK", {"spam": "False ; -0.5 / 5.0"}, b"A,B")
    assert (result.action, result.score, result.symbols) == (DELIVER, -0.5, ("A", "B"))
    for status, fields in (("SPAMD/1.0 76 Bad header line", {}), ("SPAMD/1.1 0 EX_OK", {}),
                           ("SPAMD/1.1 0 EX_OK", {"spam": "Maybe ; 1 / 5"}), ("HTTP/1.1 200 OK", {})):
        with pytest.raises(EngineError):
            spamd_module.parse_reply(status, fields, b"")


def test_bad_specs():
    for spec in ("rspamd", "rspamd:", "spamd:localhost", "spamc:127.0.0.1:783", "rspamd:relative.sock",
                 "clamd:/run/clamav/clamd.ctl"):
        with pytest.raises(ValueError):
            make_spam_engine(spec)
    assert make_spam_engine("rspamd:[::1]:11333,/run/rspamd/normal.sock").name == "rspamd"


def test_client_values_are_checked():
    assert Client.of("93.184.216.34", "mx.example.org") == Client("93.184.216.34", "mx.example.org")
    assert Client.of("2001:db8::1").ip == "2001:db8::1"
    assert Client.of("not an ip", "bad host\r\nX: y", "-dash.example") == Client()


# ---- the header block ----------------------------------------------------------------

def scored(score=7.25, required=5.0, symbols=()):
    return SpamResult("spamd", TAG, score, required, tuple(symbols))


def test_header_block_forms():
    assert header_block(scored(), YES, 5.0) == (b"X-Spam-Status: Yes, score=7.2 required=5.0\n"
                                                b"X-Spam-Score: 7.2\nX-Spam-Flag: YES\n")
    assert header_block(scored(1.0), NO, 6.0, b"\r\n") == (b"X-Spam-Status: No, score=1.0 required=6.0\r\n"
                                                           b"X-Spam-Score: 1.0\r\n")
    assert header_block(None, UNSCORED, 0.0, b"\r\n") == b"X-Spam-Status: Unknown\r\n"
    unknown = SpamResult("rspamd", UNKNOWN, reason="rspamd: 127.0.0.1:11333: Connection refused")
    assert header_block(unknown, NO, 5.0) == b"X-Spam-Status: Unknown\n", "the reason stays in the log"


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_header_block_folds_long_lists(newline):
    symbols = [f"RULE_NUMBER_{n:03d}_WITH_A_LONG_NAME" for n in range(100)]
    block = header_block(scored(symbols=symbols), YES, 5.0, newline)
    assert block.endswith(newline) and block.isascii()
    lines = block[:-len(newline)].split(newline)
    assert all(len(line) <= 78 for line in lines), max(map(len, lines))
    assert all(line.startswith(b"\t") for line in lines[1:-2]), "continuations of X-Spam-Status"
    unfolded = re.sub(rb"\r?\n(?=\t)", b"", block.split(b"\nX-Spam-Score")[0]).rstrip(b"\r")
    tests = re.split(rb"[ \t]tests=", unfolded)[1].decode()
    assert [name.strip() for name in tests.split(",")] == symbols
    if newline == b"\n":
        assert b"\r" not in block
