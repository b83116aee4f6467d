"""fp-qmail end to end: a real process with pipes on fd 0 and 1, a real socket to the
scanner double (a unix socket taking the files as descriptors unless a test asks for
TCP), the strict stand-in as qmail-queue.orig. The `rig` fixture checks after every test
that tmpdir holds nothing of ours and that the double saw no protocol violation."""
import os
import re
import resource
import signal
import stat
import subprocess
import time

import pytest

import scanner_double as sd
from conftest import MESSAGE, UNDER_TEST, envelope, fp_qmail_command, free_port

TEMPORARY = {51, 52, 53, 54, 55, 71, 72, 73, 74, 81, 91}


def signals_the_caller_ignores():
    """What a child of this test process starts with ignored: whatever our own caller
    passed us, less SIGPIPE and SIGXFSZ, which Python ignores and Popen restores."""
    with open("/proc/self/status") as f:
        mask = int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)
    return [n for n in range(1, 64) if mask >> (n - 1) & 1 and n not in (signal.SIGPIPE, signal.SIGXFSZ)]


# ---- delivery ----------------------------------------------------------------------

def test_clean_message_is_delivered_byte_identical_with_one_header(rig):
    scanner = rig.scan_with(sd.clean)
    r = rig.run()
    assert r.code == 0, r
    [(message, env, state)] = r.delivered
    assert message == sd.HEADER + MESSAGE
    assert env == envelope()
    # qmail-queue.orig got fo from offset 0, no signal ignored or blocked that its caller
    # did not ignore or block (Python ignores SIGPIPE and SIGXFSZ), no pending alarm, and
    # no descriptor but 0, 1, 2 (and the one its own listdir used).
    assert state["fd0_offset"] == 0
    assert state["ignored_signals"] == signals_the_caller_ignores()
    assert state["blocked_signals"] == []
    assert state["alarm_pending"] == 0
    assert set(state["fds"]) - {0, 1, 2} <= {3}
    # The default transport: nameless files passed as descriptors, peer checked.
    [request] = scanner.requests
    assert (request["in_links"], request["out_links"]) == (0, 0)
    assert "in" not in request and "out" not in request
    assert request["size"] == len(MESSAGE)
    assert request["envelope"] == envelope()
    assert (request["on-virus"], request["caller"]) == ("deliver", str(os.getuid()))
    assert request["peer_uid"] == os.geteuid()
    assert "verdict=clean" in r.stderr


def test_over_tcp_the_files_are_named_in_the_request(rig):
    scanner = rig.scan_with(sd.clean, tcp=True)
    r = rig.run()
    assert r.code == 0, r
    assert r.delivered[0][0] == sd.HEADER + MESSAGE
    [request] = scanner.requests
    assert re.fullmatch(re.escape(str(rig.tmpdir)) + r"/fi(\d+)\.[0-9a-f]{16}", request["in"])
    assert request["out"] == request["in"].replace("/fi", "/fo")
    assert request["size"] == len(MESSAGE) and request["envelope"] == envelope()


def test_a_list_with_a_tcp_entry_names_its_files_and_a_unix_entry_still_gets_descriptors(rig):
    unix = rig.scan_with(sd.clean)
    tcp = sd.ScannerDouble(sd.clean, tcp=True)
    try:
        r = rig.run(env={"FP_QMAIL_SCANNER": "%s,%s" % (unix.address, tcp.address)})
    finally:
        tcp.close()
    assert r.code == 0, r
    [request] = unix.requests
    assert (request["in_links"], request["out_links"]) == (1, 1)  # named files, by descriptor
    assert tcp.requests == []


def test_temp_files_are_private_and_group_access_needs_a_setgid_directory(rig):
    modes = []

    def record_modes(conn, request):
        info = [os.stat(request[name]) for name in ("in", "out")]
        modes.append(tuple(stat.S_IMODE(i.st_mode) for i in info) + tuple(i.st_gid for i in info))
        sd.clean(conn, request)

    rig.scan_with(record_modes, tcp=True)
    assert rig.run().code == 0
    # FP_QMAIL_GROUP_ACCESS=yes in a directory that is not setgid: the files would take
    # the caller's group. A configuration error, named.
    r = rig.run(env={"FP_QMAIL_GROUP_ACCESS": "yes"})
    assert r.code == 55, r
    assert "FP_QMAIL_GROUP_ACCESS=yes needs a setgid temp directory" in r.stderr
    os.chown(rig.tmpdir, -1, 65534)
    rig.tmpdir.chmod(0o2770)
    assert rig.run(env={"FP_QMAIL_GROUP_ACCESS": "yes"}).code == 0
    assert modes == [(0o600, 0o600, 0, 0), (0o640, 0o660, 65534, 65534)]


def test_group_access_does_not_matter_for_nameless_files(rig):
    rig.scan_with(sd.clean)
    r = rig.run(env={"FP_QMAIL_GROUP_ACCESS": "yes"})
    assert r.code == 0, r


@pytest.fixture
def no_tmpfile_dir(rig):
    """rig.tmpdir on a file system without O_TMPFILE (bpf's)."""
    subprocess.run(["mount", "-t", "bpf", "fpq-no-tmpfile", str(rig.tmpdir)], check=True)
    yield rig.tmpdir
    subprocess.run(["umount", str(rig.tmpdir)], check=True)


def test_a_tmpdir_without_o_tmpfile_is_a_named_write_failure(rig, no_tmpfile_dir):
    scanner = rig.scan_with(sd.clean)
    r = rig.run()
    assert r.code == 53, r
    assert "cannot create a nameless temp file in %s: its file system does not support O_TMPFILE" \
        % no_tmpfile_dir in r.stderr
    assert scanner.requests == [] and r.delivered == []


def test_envelope_and_message_of_any_bytes_pass_unchanged(rig):
    rig.scan_with(sd.clean)
    message = bytes(range(256)) * 300 + b"\r\n\0\0tail without newline"
    env = envelope(b"", *[b"r%d@ex\xe9mple.org" % i for i in range(10000)])
    r = rig.run(message=message, env_bytes=env)
    assert r.code == 0, r
    [(got, got_env, _)] = r.delivered
    assert got == sd.HEADER + message
    assert got_env == env
    assert "rcpts=10000" in r.stderr


def test_empty_message_is_scanned_and_delivered(rig):
    rig.scan_with(sd.clean)
    r = rig.run(message=b"")
    assert r.code == 0
    assert r.delivered[0][0] == sd.HEADER


def test_failover_to_the_next_scanner_when_a_connection_fails(rig):
    scanner = rig.scan_with(sd.clean)
    rig.env["FP_QMAIL_SCANNER"] = "%s, 127.0.0.1:%d, %s" % (rig.root / "missing.sock", free_port(), scanner.address)
    r = rig.run()
    assert r.code == 0, r
    assert len(scanner.requests) == 1


def test_ipv6_scanner_address_is_parsed(rig):
    rig.env["FP_QMAIL_SCANNER"] = "[::1]:%d" % free_port()
    r = rig.run()
    assert r.code in (73, 72), r  # parsed and tried: nothing listens there


# ---- infected mail ---------------------------------------------------------------------

def test_cleaned_message_is_delivered_under_deliver(rig):
    rig.scan_with(sd.cleaned("EICAR-Test-File in x.zip", body=b"Subject: cleaned\n\nnotice\n"))
    r = rig.run()
    assert r.code == 0, r
    assert r.delivered[0][0] == b"Subject: cleaned\n\nnotice\n"
    assert r.delivered[0][1] == envelope()
    assert "verdict=cleaned threats=EICAR-Test-File in x.zip" in r.stderr


@pytest.mark.parametrize("status", ["cleaned", "infected"])
def test_reject_writes_D_text_on_fd6_and_exits_82(rig, status):
    behaviour = sd.cleaned("Worm.A", "Trojan.B") if status == "cleaned" else sd.infected("Worm.A", "Trojan.B")
    rig.scan_with(behaviour)
    r = rig.run(fd6=True, env={"FP_QMAIL_ON_VIRUS": "reject"})
    assert r.code == 82, r
    assert r.fd6_text == b"DThis message contains a virus (Worm.A, Trojan.B) and was rejected (#5.7.1)"
    assert r.delivered == []


def test_reject_without_fd6_exits_31(rig):
    rig.scan_with(sd.infected("Worm.A"))
    r = rig.run(env={"FP_QMAIL_ON_VIRUS": "reject"})
    assert r.code == 31, r
    assert r.delivered == []


def test_fd6_open_read_only_counts_as_absent(rig, tmp_path):
    rig.scan_with(sd.infected("Worm.A"))
    path = tmp_path / "readonly"
    path.write_bytes(b"")

    def fd6_read_only():
        os.dup2(os.open(str(path), os.O_RDONLY), 6)

    r = rig.run(preexec=fd6_read_only)
    assert r.code == 31, r


def test_reject_text_is_templated_one_line_and_at_most_200_bytes(rig):
    rig.scan_with(sd.infected("Evil.Thing"))
    template = "Virus {threats}\r\nfound " + "x" * 400
    r = rig.run(fd6=True, env={"FP_QMAIL_ON_VIRUS": "reject", "FP_QMAIL_REJECT_TEXT": template})
    assert r.code == 82
    assert r.fd6_text.startswith(b"DVirus Evil.Thingfound xxx")
    assert b"\r" not in r.fd6_text and b"\n" not in r.fd6_text
    assert len(r.fd6_text) == 201


def test_uncleanable_message_is_rejected_even_under_deliver(rig):
    rig.scan_with(sd.infected("EICAR-Test-File"))
    r = rig.run(fd6=True)
    assert r.code == 82 and r.fd6_text.startswith(b"D"), r
    assert r.delivered == []


@pytest.mark.parametrize("behaviour", [sd.infected("Worm.A"), sd.cleaned("Worm.A")])
def test_drop_reads_the_envelope_exits_0_and_logs(rig, behaviour):
    rig.scan_with(behaviour)
    r = rig.run(env={"FP_QMAIL_ON_VIRUS": "drop", "FP_QMAIL_LOGLEVEL": "4"})
    assert r.code == 0, r
    assert r.delivered == []
    assert "sender=<alice@example.org> rcpts=1 size=%d verdict=dropped threats=Worm.A exit 0" % len(MESSAGE) \
        in r.stderr


# ---- the scanner's own refusals -----------------------------------------------------------

@pytest.mark.parametrize("on_error", ["tempfail", "pass"])
@pytest.mark.parametrize("fd6", [True, False])
def test_refused_is_permanent_whatever_the_error_policy(rig, fd6, on_error):
    rig.scan_with(sd.refused("message too large for the scanner (#5.3.4)"))
    r = rig.run(fd6=fd6, env={"FP_QMAIL_ON_ERROR": on_error})
    assert r.delivered == []
    if fd6:
        assert (r.code, r.fd6_text) == (82, b"Dmessage too large for the scanner (#5.3.4)"), r
    else:
        assert r.code == 31, r
    assert "verdict=refused threats=- exit %d" % r.code in r.stderr


@pytest.mark.parametrize("on_error", ["tempfail", "pass"])
@pytest.mark.parametrize("fd6", [True, False])
def test_deferred_is_temporary_whatever_the_error_policy(rig, fd6, on_error):
    rig.scan_with(sd.refused("too many messages from this sender, try later (#4.7.1)", status=b"DEFERRED"))
    r = rig.run(fd6=fd6, env={"FP_QMAIL_ON_ERROR": on_error})
    assert r.delivered == []
    if fd6:
        assert (r.code, r.fd6_text) == (82, b"Ztoo many messages from this sender, try later (#4.7.1)"), r
    else:
        assert r.code == 71, r
    assert "verdict=deferred" in r.stderr


@pytest.mark.parametrize("on_virus", ["deliver", "reject", "drop"])
def test_the_request_says_what_happens_to_an_infected_message(rig, on_virus):
    scanner = rig.scan_with(sd.clean)
    assert rig.run(env={"FP_QMAIL_ON_VIRUS": on_virus}).code == 0
    assert scanner.requests[0]["on-virus"] == on_virus


def test_client_address_and_name_come_from_the_environment_when_usable(rig):
    scanner = rig.scan_with(sd.clean)
    assert rig.run(env={"TCPREMOTEIP": "192.0.2.7", "TCPREMOTEHOST": "mx.example.org"}).code == 0
    for ip, host in (("192.0.2.7 x", "mx\x01.example"), ("a" * 256, "\xe9.example"), ("", "")):
        assert rig.run(env={"TCPREMOTEIP": ip, "TCPREMOTEHOST": host}).code == 0
    assert rig.run().code == 0
    assert [(q.get("client-ip"), q.get("client-host")) for q in scanner.requests] == \
        [("192.0.2.7", "mx.example.org")] + [(None, None)] * 4


# ---- the scanner's policy: Action, Spam, Scanned ----------------------------------------------------

@pytest.mark.parametrize("on_virus, action, outcome", [
    ("deliver", "drop", "dropped"), ("deliver", "reject", "rejected"), ("drop", "drop", "dropped"),
    ("drop", "reject", "rejected"), ("reject", "drop", "rejected"),
])
def test_an_infected_message_gets_the_stricter_of_the_scanners_action_and_on_virus(rig, on_virus, action,
                                                                                 outcome):
    rig.scan_with(sd.answer("INFECTED", ("Threat", "Worm.A"), ("Action", action)))
    r = rig.run(fd6=True, env={"FP_QMAIL_ON_VIRUS": on_virus})
    assert r.delivered == []
    if outcome == "dropped":
        assert (r.code, r.fd6_text) == (0, b""), r
    else:
        assert (r.code, r.fd6_text) == (82, b"DThis message contains a virus (Worm.A) and was rejected (#5.7.1)"), r
    assert "verdict=%s threats=Worm.A exit %d" % (outcome, r.code) in r.stderr


@pytest.mark.parametrize("headers", [
    ("INFECTED", ("Threat", "Worm.A"), ("Action", "deliver")),
    ("INFECTED", ("Threat", "Worm.A"), ("Action", "quarantine")),
    ("INFECTED", ("Threat", "Worm.A"), ("Action", "drop"), ("Action", "reject")),
    ("CLEAN", ("Action", "drop")),
], ids=["deliver", "unknown", "twice", "on CLEAN"])
def test_an_action_other_than_one_reject_or_drop_on_infected_is_garbage(rig, headers):
    rig.scan_with(sd.answer(*headers))
    r = rig.run(env={"FP_QMAIL_ON_VIRUS": "drop"})
    assert (r.code, r.delivered) == (74, []), r
    assert "with Action" in r.stderr


@pytest.mark.parametrize("status, outcome", [("CLEAN", "clean threats=- spam=%s to "),
                                             ("REFUSED", "refused threats=- spam=%s exit 31 ")])
def test_the_scanners_spam_header_is_in_the_log_line(rig, status, outcome):
    spam = "score=17.5 required=5.0 action=" + ("deliver" if status == "CLEAN" else "reject")
    rig.scan_with(sd.answer(status, ("Spam", spam), *([("Reason", "spam")] if status == "REFUSED" else [])))
    r = rig.run()
    assert r.code == (0 if status == "CLEAN" else 31), r
    assert "verdict=" + outcome % spam in r.stderr


def test_a_message_the_scanners_policy_does_not_scan_is_delivered_and_logged_unscanned_at_info(rig):
    rig.scan_with(sd.answer("CLEAN", ("Scanned", "no (policy)")))
    r = rig.run(env={"FP_QMAIL_LOGLEVEL": "6"})
    assert r.code == 0 and r.delivered[0][0] == sd.HEADER + MESSAGE, r
    assert re.search(r"verdict=unscanned threats=- to \S+ ms=\d+: not scanned \(policy\)$", r.stderr, re.M), r.stderr
    r = rig.run(env={"FP_QMAIL_LOGLEVEL": "5"})  # not a warning: the administrator chose it
    assert r.code == 0 and "verdict=" not in r.stderr, r


# ---- the log: one line per message ---------------------------------------------------------------

@pytest.mark.parametrize("case", ["scanner down, fd 6", "scanner down", "clean", "infected, reject, fd 6",
                                  "bad envelope", "bad setting"])
def test_one_log_line_per_message_with_the_true_exit_code(rig, case):
    env = {"FP_QMAIL_LOGLEVEL": "6"}
    if case.startswith("scanner down"):
        rig.env["FP_QMAIL_SCANNER"] = "127.0.0.1:%d" % free_port()
    elif case == "infected, reject, fd 6":
        rig.scan_with(sd.infected("Worm.A"))
        env["FP_QMAIL_ON_VIRUS"] = "reject"
    else:
        rig.scan_with(sd.clean)
    if case == "bad setting":
        env["FP_QMAIL_TIMEOUT"] = "soon"
    r = rig.run(fd6=case.endswith("fd 6"), env=env,
                env_bytes=b"Xnot an envelope\0\0" if case == "bad envelope" else None)
    lines = [line for line in r.stderr.splitlines() if line.startswith("fp-qmail[")]
    assert len(lines) == 1, lines
    expected = {"scanner down, fd 6": 82, "scanner down": 73, "infected, reject, fd 6": 82,
                "bad envelope": 91, "bad setting": 55}.get(case)
    if expected is None:
        assert r.code == 0 and " to %s ms=" % rig.queue in lines[0], lines
    else:
        assert r.code == expected and " exit %d ms=" % expected in lines[0], (r, lines)
        assert "exit" not in lines[0].split(" ms=", 1)[1], lines  # the cause names no other code


# ---- scanner trouble -----------------------------------------------------------------------

def test_scanner_not_listening_is_a_temporary_failure_and_queue_never_runs(rig):
    rig.env["FP_QMAIL_SCANNER"] = "127.0.0.1:%d" % free_port()
    r = rig.run()
    assert r.code == 73, r
    assert r.delivered == []
    assert "connection refused" in r.stderr.lower()


def test_scanner_not_listening_with_fd6_gives_Z_text(rig):
    rig.env["FP_QMAIL_SCANNER"] = "127.0.0.1:%d" % free_port()
    r = rig.run(fd6=True)
    assert r.code == 82, r
    assert r.fd6_text.startswith(b"Z") and b"\n" not in r.fd6_text


@pytest.mark.parametrize("behaviour, code, logged", [
    (sd.error("clamd is down"), 71, "scanner error: clamd is down"),
    (sd.raw(b"HTTP/1.0 400 Bad Request\n\n"), 74, "reply starts with"),
    (sd.raw(b"FPQMAIL/1 CLEAN\n\n"), 74, "CLEAN without Size"),
    (sd.raw(b"FPQMAIL/1 CLEANED\nSize: 5\n\n"), 74, "without Threat"),
    (sd.raw(b"FPQMAIL/1 INFECTED\n\n"), 74, "without Threat"),
    (sd.raw(b"FPQMAIL/1 CLEAN\nSize: 12\n\ntrailing"), 74, "not one header block"),
    (sd.raw(b"FPQMAIL/2 CLEAN\nSize: 1\n\n"), 74, "reply starts with"),
    (sd.raw(b"FPQMAIL/1 CLEAN\nSize: \xff\n\n"), 74, "not ASCII"),
    (sd.raw(b""), 74, "closed the connection mid-reply"),
    (sd.close_mid_reply, 74, "closed the connection mid-reply"),
    (sd.endless, 74, "reply longer than"),
    (sd.announce(size_delta=-1), 74, "the scanner announced"),
    (sd.announce(size_delta=+1), 74, "the scanner announced"),
    (sd.announce(write=False), 74, "fo holds 0 bytes"),
])
def test_scanner_failures_are_temporary_and_deliver_nothing(rig, behaviour, code, logged):
    rig.scan_with(behaviour)
    r = rig.run()
    assert r.code == code, r
    assert r.delivered == []
    assert logged in r.stderr


def test_scanner_that_never_answers_times_out_within_the_setting(rig):
    rig.scan_with(sd.silent)
    started = time.monotonic()
    r = rig.run(env={"FP_QMAIL_TIMEOUT": "2"})
    elapsed = time.monotonic() - started
    assert r.code == 72, r
    assert elapsed < 4, elapsed  # the acceptance bound, not a speed target
    assert r.delivered == []


def test_scanner_answering_one_byte_a_second_times_out(rig):
    rig.scan_with(sd.drip(interval=1.0))
    r = rig.run(env={"FP_QMAIL_TIMEOUT": "2"})
    assert r.code == 72, r
    assert r.delivered == []


def test_on_error_pass_delivers_the_original_with_a_not_scanned_header(rig):
    rig.env["FP_QMAIL_SCANNER"] = "127.0.0.1:%d" % free_port()
    r = rig.run(env={"FP_QMAIL_ON_ERROR": "pass"})
    assert r.code == 0, r
    [(message, env, _)] = r.delivered
    assert re.fullmatch(rb"X-Antivirus: not scanned \(scanner 127\.0\.0\.1:\d+: Connection refused\)\n",
                        message[:-len(MESSAGE)])
    assert message.endswith(MESSAGE)
    assert env == envelope()
    assert re.search(r"verdict=unscanned threats=- to \S+ ms=\d+: not scanned: scanner 127\.0\.0\.1:\d+: "
                     r"Connection refused", r.stderr), r.stderr


def test_on_error_pass_after_a_timeout_does_not_use_fo(rig):
    def write_late(conn, request):
        time.sleep(3)
        sd.write_out(request, b"garbage the scanner wrote after fp-qmail gave up")

    rig.scan_with(write_late)
    r = rig.run(env={"FP_QMAIL_ON_ERROR": "pass", "FP_QMAIL_TIMEOUT": "1"})
    assert r.code == 0, r
    assert r.delivered[0][0].endswith(MESSAGE)
    time.sleep(2.5)  # let the double finish writing into the (unlinked) fo


# ---- the envelope ----------------------------------------------------------------------------

@pytest.mark.parametrize("env_bytes, code", [
    (b"Xalice@example.org\0Tbob@example.net\0\0", 91),
    (b"Falice@example.org\0Xbob@example.net\0\0", 91),
    (b"Falice@example.org\0Tbob@example.net\0", 54),
    (b"Falice@example.org\0Tbob@example.net", 54),
    (b"", 54),
    (b"F" + b"a" * 1003 + b"\0Tbob@example.net\0\0", 11),
    (b"Falice@example.org\0T" + b"b" * 1003 + b"\0\0", 11),
])
def test_bad_envelope_gets_qmail_queues_exit_code_and_is_not_scanned(rig, env_bytes, code):
    scanner = rig.scan_with(sd.clean)
    r = rig.run(env_bytes=env_bytes)
    assert r.code == code, r
    assert r.delivered == [] and scanner.requests == []
    assert "bad envelope" in r.stderr


def test_longest_allowed_address_and_empty_sender_pass(rig):
    rig.scan_with(sd.clean)
    env = b"F\0T" + b"b" * 1002 + b"\0\0"
    r = rig.run(env_bytes=env)
    assert r.code == 0, r
    assert r.delivered[0][1] == env


def test_envelope_fd_closed_is_a_read_error(rig):
    rig.scan_with(sd.clean)
    r = rig.run(preexec=lambda: os.close(1))
    assert r.code == 54, r


def test_message_fd_a_directory_is_a_read_error(rig, tmp_path):
    rig.scan_with(sd.clean)
    fd = os.open(str(tmp_path), os.O_RDONLY)
    try:
        r = rig.run(stdin=fd)
    finally:
        os.close(fd)
    # CPython itself refuses to start with a directory on fd 0 (init_sys_streams); what
    # matters is that qmail sees a temporary failure with the cause on stderr.
    assert r.code in (1, 54), r
    assert "is a directory" in r.stderr.lower()


# ---- big messages ------------------------------------------------------------------------------

def test_100MB_message_streams_with_bounded_memory(rig):
    rig.scan_with(sd.clean)
    chunk = os.urandom(1 << 20)
    r = rig.run(message=(chunk for _ in range(100)), timeout=300, measure_rss=True,
                env={"FP_QMAIL_MAX_SIZE": "0"})  # no limit of its own: the daemon's counts
    assert r.code == 0, r
    [(message, _, _)] = r.delivered
    assert len(message) == len(sd.HEADER) + 100 * len(chunk)
    assert message[len(sd.HEADER):len(sd.HEADER) + len(chunk)] == chunk
    # The peak of fp-qmail and, after its exec, of the stand-in: both stream.
    assert r.maxrss_kb < 40 * 1024, r.maxrss_kb


def _fed(chunks, sent):
    """chunks, noting each one the reader took (its write went through) in sent."""
    for chunk in chunks:
        yield chunk
        sent.append(len(chunk))


@pytest.mark.parametrize("fd6", [True, False])
def test_a_message_over_the_size_limit_is_refused_after_reading_it_without_keeping_it(rig, fd6):
    """Past FP_QMAIL_MAX_SIZE the rest is read (the caller's writes go through and it hears
    the exit code) but never written: a file size limit of 3 MiB on fp-qmail holds for a
    64 MiB message, which a copy to the end would break (EFBIG)."""
    scanner = rig.scan_with(sd.clean)
    sent = []
    chunks = [os.urandom(1 << 20) for _ in range(64)]

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (3 << 20, 3 << 20))

    r = rig.run(message=_fed(chunks, sent), env={"FP_QMAIL_MAX_SIZE": str(1 << 20)}, fd6=fd6,
                preexec=small_files, timeout=120)
    assert sum(sent) == 64 << 20, "fp-qmail stopped reading the message"
    if fd6:
        assert (r.code, r.fd6_text) == (82, b"Dmessage size exceeds the limit of 1048576 bytes (#5.3.4)"), r
    else:
        assert r.code == 31, r
    assert r.delivered == [] and scanner.requests == []
    assert "size=%d verdict=refused" % (64 << 20) in r.stderr


def test_a_message_of_exactly_the_size_limit_is_scanned(rig):
    scanner = rig.scan_with(sd.clean)
    r = rig.run(message=b"x" * 4096, env={"FP_QMAIL_MAX_SIZE": "4096"})
    assert r.code == 0 and len(r.delivered) == 1 and len(scanner.requests) == 1, r


# ---- signals -----------------------------------------------------------------------------------

def wait_for_request(scanner, timeout=20):
    deadline = time.monotonic() + timeout
    while not scanner.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scanner.requests, "no request reached the scanner"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGALRM])
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_signal_while_scanning_removes_files_and_exits_temporarily(rig, signum, transport):
    """Named files (TCP) are removed, nameless ones need nothing. A SIGALRM that is not
    our own timer's is an interruption, never taken for the scanner's timeout."""
    scanner = rig.scan_with(sd.silent, tcp=transport == "tcp")

    def kill_when_scanning(proc):
        wait_for_request(scanner)
        proc.send_signal(signum)

    r = rig.run(after_start=kill_when_scanning, env={"FP_QMAIL_ON_ERROR": "pass"})
    assert r.code == 71, r
    assert r.delivered == []
    assert "interrupted by signal %d" % signum in r.stderr


def test_a_caller_that_ignores_signals_keeps_them_ignored_and_blocked_for_qmail_queue(rig):
    """What the caller ignores stays ignored (SIGINT, SIGQUIT of a background job) and
    qmail-queue.orig inherits it; so with a blocked signal. SIGPIPE and SIGXFSZ: exactly
    as given where the interpreter's start did not change them first, else at their
    defaults (fp-qmail says so at debug level)."""
    scanner = rig.scan_with(sd.delayed(0.5))
    ignored = [signal.SIGINT, signal.SIGQUIT, signal.SIGPIPE, signal.SIGUSR1]

    def caller():
        for signum in ignored:
            signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2, signal.SIGWINCH])

    def interrupt(proc):
        wait_for_request(scanner)
        proc.send_signal(signal.SIGINT)  # ignored: the message goes through

    r = rig.run(preexec=caller, after_start=interrupt)
    assert r.code == 0, r
    state = r.delivered[0][2]
    standard_start = "the interpreter's start ignored SIGPIPE and SIGXFSZ" in r.stderr
    assert standard_start or UNDER_TEST == "binary"  # python -m fpqmail: always the standard start
    expected = set(signals_the_caller_ignores()) | set(ignored)
    if standard_start:
        expected.discard(signal.SIGPIPE)
    assert set(state["ignored_signals"]) == expected
    assert state["blocked_signals"] == [signal.SIGUSR2, signal.SIGWINCH]


def test_no_descriptor_of_the_callers_reaches_qmail_queue_not_even_above_the_limit(rig):
    """Descriptors from 7 up are closed, however high: here one at 900 while the soft
    limit is 64 (a caller can lower its limit after opening). fd 6 stays as given."""
    rig.scan_with(sd.clean)

    def caller():
        fd = os.open("/dev/null", os.O_RDONLY)
        for number in (7, 8, 63, 900):
            os.dup2(fd, number)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    trace = rig.root / "trace"
    r = rig.run(preexec=caller, fd6=True,
                command=["strace", "-f", "-qq", "-e", "trace=close_range", "-o", str(trace)] + fp_qmail_command())
    assert r.code == 0, r
    fds = set(r.delivered[0][2]["fds"])
    assert 6 in fds and fds - {0, 1, 2, 3, 6} == set(), fds
    assert re.search(r"close_range\(7, 2147483646, 0\) += 0", trace.read_text())


# ---- qmail-queue.orig ----------------------------------------------------------------------------

def test_queue_program_missing_is_a_temporary_failure(rig):
    rig.scan_with(sd.clean)
    r = rig.run(env={"FP_QMAIL_QUEUE": str(rig.root / "no-such-program")})
    assert r.code == 71, r
    assert "cannot run" in r.stderr


@pytest.mark.parametrize("code", [53, 71, 91])
def test_queue_program_exit_code_is_passed_through(rig, code):
    rig.scan_with(sd.clean)
    r = rig.run(env={"QQ_STANDIN_EXIT": str(code)})
    assert r.code == code, r
    assert r.delivered == []


def test_queue_program_killed_is_seen_as_killed(rig):
    rig.scan_with(sd.clean)
    r = rig.run(env={"QQ_STANDIN_SIGNAL": str(int(signal.SIGKILL))})
    assert r.code == -signal.SIGKILL, r


# ---- temp directory --------------------------------------------------------------------------------

def test_missing_tmpdir_is_a_write_failure(rig):
    rig.scan_with(sd.clean)
    r = rig.run(env={"FP_QMAIL_TMPDIR": str(rig.root / "missing")})
    assert r.code == 53, r
    assert "cannot create a temp file" in r.stderr


def test_planted_names_are_never_opened(rig):
    """Every name fp-qmail could pick is taken by a symlink to a file we watch: it must
    still never write through one (here: its pid is known, the random part is not).
    Named files: a TCP scanner (on the unix socket they have no names at all)."""
    rig.scan_with(sd.clean, tcp=True)
    target = rig.root / "victim"
    target.write_bytes(b"precious")
    for i in range(200):
        os.symlink(target, rig.tmpdir / ("fi%d.%016x" % (i, i)))
    r = rig.run()
    assert r.code == 0, r
    assert target.read_bytes() == b"precious"
    for link in list(rig.tmpdir.iterdir()):
        assert link.is_symlink()
        link.unlink()
