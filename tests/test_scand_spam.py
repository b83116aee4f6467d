"""Spam scoring and the policy file in the request flow, end to end: fp-qmail (the module
or the binary, as FPQMAIL_UNDER_TEST says) + fpqmail-scand + a real, private rspamd or
spamd (tests/spam_fixtures.py), the message on fd 0 and the envelope on fd 1 as qmail
gives them, and the stand-in qmail-queue.orig recording what it received."""

import signal
import socket
import threading
import time

import pytest

from fpqmail.scand.quarantine import Store
from scand_fixtures import ATTACHED, EICAR, exchange, parse_reply

pytest.register_assert_rewrite("spam_fixtures")
from spam_fixtures import GTUBE, HAM, SPAM, message  # noqa: E402

pytest_plugins = ["spam_fixtures"]

A, B = b"joe@a.example", b"ann@b.example"
# Domain A refuses spam (and waits when the engine is down); domain B tags it.
TWO_DOMAINS = """
[a.example]
spam-reject = 15
spam-reject-text = 5.7.1 refused as spam, score {score}
spam-down = tempfail
[b.example]
spam-tag = 5
"""


def envelope(*recipients, sender=b"alice@example.org"):
    return b"F" + sender + b"\0" + b"".join(b"T" + r + b"\0" for r in recipients or (B,)) + b"\0"


def policy_file(tmp_path, text, name="policy"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def spam_scand(rig, start_scand, tmp_path):
    """spam_scand(engine spec, policy text, config=..., engines=...) -> the daemon, on a
    unix socket (the default transport), the rig's fp-qmail pointed at it."""
    def start(spec, policy="", config=None, engines=("builtin",), **options):
        settings = {"FP_SCAND_POLICY": str(policy_file(tmp_path, policy))} if policy else {}
        settings.update(config or {})
        daemon = start_scand(rig.tmpdir, engines=(*engines, spec), config=settings,
                             listen=str(tmp_path / f"scand{len(started)}.sock"), **options)
        started.append(daemon)
        rig.env["FP_QMAIL_SCANNER"] = daemon.address
        return daemon
    started = []
    return start


def split(delivered, newline=b"\r\n"):
    """(the header block fp-qmail's scanner added, the rest): the added lines are the
    X-Antivirus and X-Spam-* fields at the top, continuation lines included."""
    lines = delivered.split(newline)
    k = 0
    while lines[k].startswith((b"X-Antivirus:", b"X-Spam-", b"\t")):
        k += 1
    block = newline.join(lines[:k]) + newline
    return block, delivered[len(block):]


def fp_qmail_line(r):
    [line] = [line for line in r.stderr.splitlines() if " verdict=" in line]
    return line


# ---- the acceptance cases ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["rspamd", "spamd"])
def test_gtube_with_reject_from_15_exits_82_with_a_D_text_and_queues_nothing(kind, request, rig, spam_scand):
    engine = request.getfixturevalue(kind)
    daemon = spam_scand(engine.unix_spec, "[*]\nspam-reject = 15\nspam-reject-text = 5.7.1 spam ({score})\n")
    r = rig.run(SPAM, envelope(B), fd6=True)
    assert r.code == 82, r
    assert r.fd6_text.startswith(b"D5.7.1 spam (1") and r.fd6_text.endswith(b")"), r.fd6_text
    assert r.delivered == [], "qmail-queue.orig was not run"
    line = fp_qmail_line(r)
    assert " verdict=refused " in line and " action=reject " in line and "spam=score=" in line, line
    assert f"status=refused spam={kind}:{'reject' if kind == 'rspamd' else 'tag'} score=" in daemon.log()
    assert " reason=5.7.1 spam (1" in daemon.log()
    # Without fd 6, qmail-queue's plain permanent code.
    r = rig.run(SPAM, envelope(B))
    assert (r.code, r.delivered) == (31, [])


@pytest.mark.parametrize("kind, newline", [("rspamd", b"\r\n"), ("rspamd", b"\n"), ("spamd", b"\r\n")])
def test_an_ordinary_message_is_delivered_with_its_score_and_every_byte_below_unchanged(
        kind, newline, request, rig, spam_scand):
    engine = request.getfixturevalue(kind)
    spam_scand(engine.tcp_spec, "[*]\nspam-reject = 15\n")
    ham = HAM if newline == b"\r\n" else message(HAM.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n"),
                                                 newline=b"\n")
    r = rig.run(ham, envelope(B))
    assert r.code == 0, r
    [(delivered, env, _)] = r.delivered
    assert env == envelope(B)
    block, rest = split(delivered, newline)
    assert rest == ham, "every original byte unchanged below the added headers"
    lines = block.split(newline)
    assert lines[0] == b"X-Antivirus: scanned by fp-qmail (builtin)"
    assert lines[1].startswith(b"X-Spam-Status: No, score=")
    score = lines[1].split(b"score=")[1].split()[0]
    required = b"5.0" if kind == "spamd" else b"15.0"  # the engine's own threshold (spam-tag = engine)
    assert b" required=" + required in lines[1]
    assert b"X-Spam-Score: " + score + newline in block and b"X-Spam-Flag" not in block
    assert (b"\r" in block) == (newline == b"\r\n"), "the message's own line ending"
    assert all(len(line) <= 78 for line in lines)
    line = fp_qmail_line(r)
    assert " verdict=clean threats=- spam=score=%s required=%s action=deliver to " % (
        score.decode(), required.decode()) in line, line


# ---- the policy: two domains, and a message to both ------------------------------------

def test_domain_a_rejects_spam_domain_b_tags_it_and_a_message_to_both_is_refused(rspamd, rig, spam_scand):
    spam_scand(rspamd.unix_spec, TWO_DOMAINS)
    # B tags it: delivered, marked.
    r = rig.run(SPAM, envelope(B), fd6=True)
    assert r.code == 0, r
    [(delivered, _, _)] = r.delivered
    block, rest = split(delivered)
    assert rest == SPAM
    assert block.startswith(b"X-Antivirus: scanned by fp-qmail (builtin)\r\n"
                            b"X-Spam-Status: Yes, score=15.0 required=5.0")
    assert b"GTUBE" in block and block.endswith(b"X-Spam-Score: 15.0\r\nX-Spam-Flag: YES\r\n")
    assert "spam=score=15.0 required=5.0 action=tag" in fp_qmail_line(r)
    # A refuses it, with its own text.
    r = rig.run(SPAM, envelope(A), fd6=True)
    assert (r.code, r.fd6_text) == (82, b"D5.7.1 refused as spam, score 15.0"), r
    # To both, in either order: the strictest wins, refused for both (the rule of
    # fpqmail-policy(5), SEVERAL RECIPIENTS). Nothing reaches the queue.
    for recipients in ((A, B), (B, A)):
        r = rig.run(SPAM, envelope(*recipients), fd6=True)
        assert (r.code, r.fd6_text) == (82, b"D5.7.1 refused as spam, score 15.0"), r
    assert len(r.delivered) == 1, "only B's own copy above"
    # An ordinary message to both: delivered once, for both, with its score.
    r = rig.run(HAM, envelope(A, B))
    assert r.code == 0, r
    delivered, env, _ = r.delivered[-1]
    assert env == envelope(A, B) and split(delivered)[1] == HAM
    assert b"X-Spam-Status: No, score=" in delivered and b"X-Spam-Flag" not in delivered


def test_a_stopped_engine_gives_unknown_by_default_and_tempfail_where_the_policy_says(start_spamd, rig,
                                                                                      spam_scand):
    engine = start_spamd()
    daemon = spam_scand(engine.unix_spec, TWO_DOMAINS)
    assert b"X-Spam-Status: No" in rig.run(HAM, envelope(B)).delivered[-1][0]
    engine.stop()
    # B (spam-down = deliver, the default): delivered with X-Spam-Status: Unknown, logged.
    r = rig.run(HAM, envelope(B))
    assert r.code == 0, r
    delivered = r.delivered[-1][0]
    assert split(delivered) == (b"X-Antivirus: scanned by fp-qmail (builtin)\r\nX-Spam-Status: Unknown\r\n", HAM)
    assert f"spam=unknown (spamd: {engine.socket_path}: " in fp_qmail_line(r)
    assert f"status=clean spam=spamd:unknown (spamd: {engine.socket_path}: " in daemon.log()
    assert f"engine spamd: endpoint {engine.socket_path} failed" in daemon.log()
    # A (spam-down = tempfail): refused for now; and so is a message to A and B.
    for recipients in ((A,), (A, B)):
        r = rig.run(HAM, envelope(*recipients), fd6=True)
        assert (r.code, r.fd6_text) == (82, b"Zspam filter unavailable, try again later"), r
        assert " verdict=deferred " in fp_qmail_line(r)
    r = rig.run(HAM, envelope(A))
    assert (r.code, len(r.delivered)) == (71, 2), r


def test_a_silent_engine_gives_unknown_within_the_spam_timeout(rspamd, rig, spam_scand):
    spam_scand(rspamd.tcp_spec, config={"FP_SCAND_SPAM_TIMEOUT": "0.5"})
    rspamd.signal(signal.SIGSTOP)  # the kernel still accepts; nothing answers
    try:
        started = time.monotonic()
        r = rig.run(HAM, envelope(B))
        assert time.monotonic() - started < 20
    finally:
        rspamd.signal(signal.SIGCONT)
    assert r.code == 0, r
    assert b"\r\nX-Spam-Status: Unknown\r\n" in r.delivered[0][0]
    assert "spam=unknown (rspamd: 127.0.0.1:%d: timed out)" % rspamd.port in fp_qmail_line(r)


def test_the_virus_verdict_wins_and_the_policy_chooses_the_virus_action(rspamd, rig, spam_scand):
    daemon = spam_scand(rspamd.unix_spec, "[*]\nspam-tag = 5\n[drop.example]\nvirus = drop\n"
                                          "[reject.example]\nvirus = reject\n")
    infected = ATTACHED.replace(b"Caf\xe9, see the attachment.", GTUBE)
    # Cleaned (the default action): delivered without the attachment, and never scored.
    r = rig.run(infected, envelope(B))
    assert r.code == 0, r
    assert b"X-Spam" not in r.delivered[0][0] and EICAR not in r.delivered[0][0]
    assert "spam=" not in fp_qmail_line(r) and "spam=" not in daemon.log()
    # The policy drops it for drop.example: fp-qmail (FP_QMAIL_ON_VIRUS=deliver) takes the
    # stricter of the daemon's Action and its own.
    r = rig.run(infected, envelope(b"x@drop.example"), fd6=True)
    assert (r.code, r.fd6_text, len(r.delivered)) == (0, b"", 1), r
    assert " verdict=dropped threats=EICAR-Test-File in tool.com exit 0" in fp_qmail_line(r)
    # ... and refuses it for reject.example, and for a message to both (reject over drop).
    for recipients in ((b"x@reject.example",), (b"x@drop.example", b"x@reject.example")):
        r = rig.run(infected, envelope(*recipients), fd6=True)
        assert r.code == 82 and r.fd6_text.startswith(b"DThis message contains a virus (EICAR"), r
    assert "status=infected threats=EICAR-Test-File in tool.com action=reject" in daemon.log()
    # fp-qmail's own FP_QMAIL_ON_VIRUS=drop still drops a message that cannot be cleaned.
    bare = b"Subject: bare\n\n" + EICAR + b"\n"
    r = rig.run(bare, envelope(B), env={"FP_QMAIL_ON_VIRUS": "drop"})
    assert (r.code, len(r.delivered)) == (0, 1), r
    assert " verdict=dropped " in fp_qmail_line(r)


def test_a_recipient_whose_policy_says_scan_no_gets_the_message_unscanned(rspamd, rig, spam_scand):
    spam_scand(rspamd.unix_spec, "[*]\nspam-reject = 15\n[abuse@b.example]\nscan = no\n")
    for message_ in (SPAM, ATTACHED):
        r = rig.run(message_, envelope(b"Abuse@B.example"), env={"FP_QMAIL_LOGLEVEL": "6"})
        assert r.code == 0, r
        assert r.delivered[-1][0] == b"X-Antivirus: not scanned (policy)" + (
            b"\r\n" if message_ == SPAM else b"\n") + message_
        line = fp_qmail_line(r)
        assert " verdict=unscanned threats=- to " in line and line.endswith(": not scanned (policy)"), line
    # At info, as the administrator chose it (unscanned by scanner trouble is a warning).
    assert " verdict=" not in rig.run(SPAM, envelope(b"abuse@b.example"), env={"FP_QMAIL_LOGLEVEL": "5"}).stderr
    # With another recipient who is scanned, the message is scanned for both.
    r = rig.run(SPAM, envelope(b"abuse@b.example", B), fd6=True)
    assert r.code == 82, r


class Silent:
    """A unix socket that accepts connections (the kernel does) and never answers;
    connections() counts those made so far."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(self.path)
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.kept = []

    def connections(self):
        while True:
            try:
                self.kept.append(self.sock.accept()[0])
            except BlockingIOError:
                return len(self.kept)

    def close(self):
        for sock in self.kept + [self.sock]:
            sock.close()


def test_the_size_limit_skips_scoring_without_contacting_the_engine(rig, spam_scand, tmp_path):
    silent = Silent(tmp_path / "silent.sock")
    try:
        daemon = spam_scand(f"spamd:{silent.path}", TWO_DOMAINS,
                            config={"FP_SCAND_SPAM_MAX_SIZE": "1000", "FP_SCAND_SPAM_TIMEOUT": "0.5"})
        daemon.wait_log("spam engine spamd:.* does not answer now")  # the health check at start
        before = silent.connections()
        r = rig.run(HAM + b"x" * 1000 + b"\r\n", envelope(A), fd6=True)
        assert r.code == 0, "a retry would be as large: never a tempfail for the size, not even for A"
        assert b"\r\nX-Spam-Status: Unknown\r\n" in r.delivered[0][0]
        assert "spam=unknown (not scored: %d bytes, over the limit of 1000)" % (len(HAM) + 1002) in fp_qmail_line(r)
        assert silent.connections() == before, "not sent"
        # Under it, the engine is asked; it says nothing, and A waits.
        assert rig.run(HAM, envelope(A)).code == 71
        assert silent.connections() == before + 1
    finally:
        silent.close()


# ---- one round trip ------------------------------------------------------------------

class CountingProxy:
    """Forwards TCP connections to a real engine, counting the connections and the bytes
    the daemon sent on each."""

    def __init__(self, port):
        self.target = ("127.0.0.1", port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent = []  # bytes from the daemon, one entry per connection
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.sent.append(0)
            threading.Thread(target=self._serve, args=(client, len(self.sent) - 1), daemon=True).start()

    def _serve(self, client, k):
        with client, socket.create_connection(self.target) as engine:
            def back():
                for chunk in iter(lambda: engine.recv(65536), b""):
                    client.sendall(chunk)
                client.shutdown(socket.SHUT_WR)
            answer = threading.Thread(target=back)
            answer.start()
            for chunk in iter(lambda: client.recv(65536), b""):
                self.sent[k] += len(chunk)
                engine.sendall(chunk)
            try:
                engine.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            answer.join(30)

    def close(self):
        self.listener.close()


@pytest.mark.parametrize("kind", ["rspamd", "spamd"])
def test_scoring_is_one_round_trip_with_the_message_sent_once(kind, request, rig, spam_scand):
    engine = request.getfixturevalue(kind)
    proxy = CountingProxy(engine.port)
    try:
        spam_scand(f"{kind}:127.0.0.1:{proxy.port}")
        deadline = time.monotonic() + 10
        while not proxy.sent and time.monotonic() < deadline:  # the health check at start
            time.sleep(0.01)
        for n in range(3):
            r = rig.run(HAM, envelope(A, B))
            assert r.code == 0 and b"X-Spam-Status: No" in r.delivered[-1][0], r
            assert len(proxy.sent) == n + 2, "one connection per message"
            head = proxy.sent[-1] - len(HAM)
            assert 0 < head < 600, f"the message once, behind a request head of {head} bytes"
    finally:
        proxy.close()


# ---- what the client's environment may do ----------------------------------------------

def test_the_client_address_reaches_rspamd_and_chooses_no_policy(rspamd, rig, spam_scand):
    daemon = spam_scand(rspamd.unix_spec, TWO_DOMAINS)
    r = rig.run(HAM, envelope(B), env={"TCPREMOTEIP": "93.184.216.34", "TCPREMOTEHOST": "mx.example.org"})
    assert r.code == 0, r
    scan_id = daemon.log().split("INFO: scan ")[-1].split()[0]
    deadline = time.monotonic() + 10
    while f"qid: <{scan_id}>" not in rspamd.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    [line] = [line for line in rspamd.log().splitlines() if f"qid: <{scan_id}>" in line]
    assert "ip: 93.184.216.34" in line and "rcpts: <ann@b.example>" in line, line
    # The same spam from any address, to A: refused all the same.
    for ip in ("127.0.0.1", "93.184.216.34"):
        assert rig.run(SPAM, envelope(A), env={"TCPREMOTEIP": ip}).code == 31


# ---- the policy file: at start, on SIGHUP ---------------------------------------------

def test_sighup_reads_the_policy_again_and_a_broken_one_keeps_the_old(rspamd, rig, spam_scand, tmp_path):
    daemon = spam_scand(rspamd.unix_spec, "[*]\nspam-tag = 5\n")
    path = tmp_path / "policy"
    assert rig.run(SPAM, envelope(B)).code == 0
    path.write_text("[*]\nspam-reject = 15\n")
    daemon.signal(signal.SIGHUP)
    daemon.wait_log(f"SIGHUP: configuration and signatures reloaded; engines builtin, rspamd \\(spam\\); "
                    f"policy {path}")
    assert rig.run(SPAM, envelope(B)).code == 31
    path.write_text("[*]\nspam-reject = 15\nspam-tagg = 5\n")
    daemon.signal(signal.SIGHUP)
    daemon.wait_log(f"SIGHUP: reload failed, the running configuration stays: FP_SCAND_POLICY: {path} line 3: "
                    "unknown key 'spam-tagg'")
    assert rig.run(SPAM, envelope(B)).code == 31, "the old policy stays"
    assert len(rig.run(HAM, envelope(B)).delivered) == 2


def test_a_broken_policy_stops_the_start_with_its_line(tmp_path):
    from scand_fixtures import Scand
    path = policy_file(tmp_path, "[*]\nspam-reject = lots\n")
    daemon = Scand(tmp_path, tmp_path, config={"FP_SCAND_POLICY": str(path)})
    with pytest.raises(RuntimeError) as e:
        daemon.start()
    assert daemon.process.returncode == 2
    assert f"configuration: FP_SCAND_POLICY: {path} line 2: spam-reject = lots: must be a score" in str(e.value)
    assert "Traceback" not in str(e.value)


@pytest.mark.parametrize("engines, text", [
    (("rspamd:127.0.0.1:1", "spamd:127.0.0.1:2"), "FP_SCAND_ENGINES: two spam engines"),
    (("rspamd:127.0.0.1:1",), "FP_SCAND_ENGINES: no virus engine"),
    (("builtin", "rspamd:relative.sock"), "engine rspamd:relative.sock: "),
])
def test_engine_lists_that_make_no_sense_stop_the_start(tmp_path, engines, text):
    from scand_fixtures import Scand
    daemon = Scand(tmp_path, tmp_path, engines=engines)
    with pytest.raises(RuntimeError) as e:
        daemon.start()
    assert daemon.process.returncode == 2 and text in str(e.value), str(e.value)


# ---- PING, --check, the quarantine --------------------------------------------------------

def test_ping_reports_the_spam_engine_and_pongs_while_it_is_down(start_spamd, start_scand, tmp_path):
    engine = start_spamd()
    daemon = start_scand(tmp_path, engines=("builtin", engine.tcp_spec))
    assert parse_reply(exchange(daemon.port, b"FPQMAIL/1 PING\n\n")) == \
        ("PONG", {"Engines": ["builtin"], "Spam": ["ok (spamd)"]})
    engine.stop()
    time.sleep(1.1)  # past the health check's one second of reuse
    status, headers = parse_reply(exchange(daemon.port, b"FPQMAIL/1 PING\n\n"))
    assert status == "PONG", "mail still flows"
    assert headers["Spam"] == ["unknown (spamd: 127.0.0.1:%d: Connection refused)" % engine.port], headers


def test_check_asks_the_spam_engine_too(rspamd, tmp_path):
    from test_scand_admin import scand
    code, out, err = scand(tmp_path, "--check", "--engine", "builtin", "--engine", rspamd.tcp_spec)
    assert code == 0 and "does not answer" not in err, err
    dead = tmp_path / "no-rspamd.sock"
    code, out, err = scand(tmp_path, "--check", "--engine", "builtin", "--engine", f"rspamd:{dead}")
    assert code == 3, (out, err)
    assert f"--check: engine rspamd:{dead} does not answer: rspamd: {dead}: No such file or directory" in err
    assert "FP_SCAND_POLICY=\n" in out and "FP_SCAND_QUARANTINE_SPAM=no\n" in out


@pytest.mark.parametrize("keep", [False, True])
def test_the_quarantine_keeps_spam_refusals_only_when_asked(keep, rspamd, rig, spam_scand, tmp_path):
    store = tmp_path / "q"
    spam_scand(rspamd.unix_spec, "[*]\nspam-reject = 15\n", quarantine=store,
               config={"FP_SCAND_QUARANTINE_SPAM": "yes" if keep else "no"})
    assert rig.run(SPAM, envelope(B)).code == 31
    assert rig.run(HAM, envelope(B)).code == 0
    ids = list(Store(str(store)).ids())
    if not keep:
        assert ids == []
        return
    [entry] = ids
    meta = Store(str(store)).meta(entry)
    assert (meta["status"], meta["fate"], meta["threats"]) == ("spam", "rejected", ["Spam (rspamd score 15.0)"])
    assert Store(str(store)).original(entry) == SPAM
