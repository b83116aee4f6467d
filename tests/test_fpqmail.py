"""fp-qmail end to end: a real process with pipes on fd 0 and 1, a real socket to the
scanner double, the strict stand-in as qmail-queue.orig. The `rig` fixture checks
after every test that tmpdir holds nothing of ours."""
import os
import re
import signal
import stat
import time

import pytest

import scanner_double as sd
from conftest import MESSAGE, envelope, free_port

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
    # qmail-queue.orig got fo from offset 0, no signal ignored that its caller did not
    # ignore (Python ignores SIGPIPE and SIGXFSZ), no pending alarm, and no descriptor
    # but 0, 1, 2 (and the one its own listdir used).
    assert state["fd0_offset"] == 0
    assert state["ignored_signals"] == signals_the_caller_ignores()
    assert state["alarm_pending"] == 0
    assert set(state["fds"]) - {0, 1, 2} <= {3}
    [request] = scanner.requests
    assert re.fullmatch(re.escape(str(rig.tmpdir)) + r"/fi(\d+)\.[0-9a-f]{16}", request["in"])
    assert request["out"] == request["in"].replace("/fi", "/fo")
    assert request["size"] == len(MESSAGE)
    assert request["envelope"] == envelope()
    assert "verdict=clean" in r.stderr


def test_temp_files_are_private_by_default_and_group_accessible_on_request(rig):
    modes = []

    def record_modes(conn, request):
        modes.append((stat.S_IMODE(os.stat(request["in"]).st_mode),
                      stat.S_IMODE(os.stat(request["out"]).st_mode)))
        sd.clean(conn, request)

    rig.scan_with(record_modes)
    assert rig.run().code == 0
    assert rig.run(env={"FP_QMAIL_GROUP_ACCESS": "yes"}).code == 0
    assert modes == [(0o600, 0o600), (0o640, 0o660)]


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
    rig.env["FP_QMAIL_SCANNER"] = "127.0.0.1:%d, %s" % (free_port(), scanner.address)
    r = rig.run()
    assert r.code == 0, r
    assert len(scanner.requests) == 1


def test_unix_socket_scanner(rig, tmp_path):
    scanner = rig.scan_with(sd.clean, unix_path=str(tmp_path / "scanner.sock"))
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
    assert "dropped infected message from <alice@example.org>: Worm.A" in r.stderr


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
    assert "delivering unscanned" in r.stderr


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
    r = rig.run(message=(chunk for _ in range(100)), timeout=300, measure_rss=True)
    assert r.code == 0, r
    [(message, _, _)] = r.delivered
    assert len(message) == len(sd.HEADER) + 100 * len(chunk)
    assert message[len(sd.HEADER):len(sd.HEADER) + len(chunk)] == chunk
    # The peak of fp-qmail and, after its exec, of the stand-in: both stream.
    assert r.maxrss_kb < 40 * 1024, r.maxrss_kb


# ---- signals -----------------------------------------------------------------------------------

@pytest.mark.parametrize("signum, code", [
    (signal.SIGTERM, 71), (signal.SIGHUP, 71), (signal.SIGINT, 71), (signal.SIGALRM, 72)])
def test_signal_while_scanning_removes_files_and_exits_temporarily(rig, signum, code):
    scanner = rig.scan_with(sd.silent)

    def kill_when_scanning(proc):
        deadline = time.monotonic() + 20
        while not scanner.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signum)

    r = rig.run(after_start=kill_when_scanning)
    assert r.code == code, r
    assert r.delivered == []
    assert "signal" in r.stderr or "timed out" in r.stderr


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
    still never write through one (here: its pid is known, the random part is not)."""
    rig.scan_with(sd.clean)
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
