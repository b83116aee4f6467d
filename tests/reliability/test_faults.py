"""The fault matrix of issue 6, section 1: the faults tests/test_fpqmail.py and friends
do not already cover (summary.py maps those). One message per fault; each test asserts
the kind of outcome, all-or-nothing at qmail-queue.orig and the logged cause; the rig's
teardown asserts that tmpdir holds nothing of ours afterwards."""
import os
import resource
import signal
import socket
import subprocess
import sys
import time

import pytest

import scanner_double as sd
from conftest import MESSAGE, TESTS, become, envelope, fp_qmail_command, free_port
from fpqmail.queue import ENVELOPE_MAX
from scand_fixtures import Scand, request_bytes, spool

from .checks import PERMANENT, SUCCESS, TEMPORARY, held
from .conftest import dead, predictable_names, remove_all

fault = pytest.mark.fault
BIG_LINE = b"x" * (1 << 20)


def wait_for(predicate, timeout=20, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.01)


def spool_names(rig):
    return sorted(p.name for p in rig.tmpdir.iterdir())


def kill_and_wait(proc, signum=signal.SIGKILL):
    proc.send_signal(signum)
    wait_for(lambda: dead(proc), what="the process to die")


# ---- the scanner ------------------------------------------------------------------------

@fault("scanner: refusing")
def test_scanner_resetting_the_connection_unread(rig, raw_listener):
    listener = raw_listener("reset")
    rig.env["FP_QMAIL_SCANNER"] = listener.address
    r = rig.run()
    held(r, TEMPORARY, "scanner %s: Connection reset by peer" % listener.address)
    assert r.code in (73, 74)  # the reset may come before or after connect() returns


@fault("scanner: refusing")
def test_daemon_refusing_with_busy(rig, start_scand, slow_engine):
    slow = slow_engine(60)
    daemon = start_scand(rig.tmpdir, engines=(slow.spec,), args=("--workers", "1", "--queue", "0"))
    rig.env["FP_QMAIL_SCANNER"] = daemon.address
    holder = spool(rig.tmpdir, MESSAGE)
    stalled = socket.create_connection(("127.0.0.1", daemon.port))
    try:
        stalled.sendall(request_bytes(*holder, len(MESSAGE)))  # holds the only worker in its engine
        time.sleep(0.5)
        r = rig.run()
    finally:
        slow.close()
        stalled.close()
        for name in holder:
            os.unlink(name)
    held(r, TEMPORARY, "scanner error: busy")
    assert r.code == 71


@fault("scanner: not listening")
@pytest.mark.parametrize("what", ["unix path missing", "unix socket without listener", "all of a list"])
def test_scanner_not_listening(rig, tmp_path, what):
    missing = str(tmp_path / "missing.sock")
    stale = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(stale)  # bound, never listening: what a daemon that died leaves
    s.close()
    closed_port = "127.0.0.1:%d" % free_port()
    rig.env["FP_QMAIL_SCANNER"] = {"unix path missing": missing, "unix socket without listener": stale,
                                   "all of a list": ",".join((closed_port, missing, stale))}[what]
    r = rig.run()
    cause = {"unix path missing": "scanner %s: No such file" % missing}.get(
        what, "scanner %s: Connection refused" % stale)
    held(r, TEMPORARY, cause)
    assert r.code == 73


@fault("scanner: not listening")
def test_an_endpoint_whose_socket_cannot_be_made_is_skipped(rig):
    """socket() itself fails for the first endpoint (EAFNOSUPPORT, as for an IPv6
    address on a host without IPv6, injected with strace): the next one is tried."""
    scanner = rig.scan_with(sd.clean)
    rig.env["FP_QMAIL_SCANNER"] = "[::1]:%d,%s" % (free_port(), scanner.address)
    command = ["strace", "-qq", "-o", "/dev/null", "-e", "trace=socket",
               "-e", "inject=socket:error=EAFNOSUPPORT:when=1"] + fp_qmail_command()
    held(rig.run(command=command), SUCCESS, message=sd.HEADER + MESSAGE, envelope=envelope())
    assert len(scanner.requests) == 1


@fault("scanner: accepting, never answering")
def test_scanner_never_accepting_from_its_backlog(rig, raw_listener):
    listener = raw_listener("never_accept")
    rig.env["FP_QMAIL_SCANNER"] = listener.address
    started = time.monotonic()
    r = rig.run(env={"FP_QMAIL_TIMEOUT": "2"})
    held(r, TEMPORARY, "scanner %s: no reply in time" % listener.address)
    assert r.code == 72 and time.monotonic() - started < 10


@fault("scanner: accepting, never answering")
def test_scanner_backlog_full_is_a_connect_timeout(rig, raw_listener):
    listener = raw_listener("never_accept", backlog=0)
    fillers = []
    for _ in range(4):  # past the backlog: further SYNs are dropped, connect() waits
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", listener.port))
        except BlockingIOError:
            pass
        fillers.append(s)
    time.sleep(0.2)
    rig.env["FP_QMAIL_SCANNER"] = listener.address
    try:
        r = rig.run(env={"FP_QMAIL_CONNECT_TIMEOUT": "1"})
    finally:
        for s in fillers:
            s.close()
    held(r, TEMPORARY, "scanner %s: connect timed out" % listener.address)
    assert r.code == 72


@fault("scanner: closing mid-reply")
def test_daemon_killed_mid_scan(rig, raw_listener, tmp_path):
    """The real daemon, its engine (a clamd endpoint that never answers) keeping the
    scan open, is killed with SIGKILL: fp-qmail sees the connection end, no reply."""
    engine = raw_listener("hold")
    (tmp_path / "scand").mkdir()
    daemon = Scand(tmp_path / "scand", rig.tmpdir, engines=("clamd:" + engine.address,))
    daemon.start()
    rig.env["FP_QMAIL_SCANNER"] = daemon.address

    def kill_when_scanning(proc):
        # clamd's protocol: the scan (INSTREAM or FILDES), not a health check (PING)
        wait_for(lambda: any(b"INSTREAM" in r or b"FILDES" in r for r in engine.received),
                 what="the daemon asking its engine")
        daemon.process.kill()

    try:
        r = rig.run(after_start=kill_when_scanning)
    finally:
        daemon.process.kill()
        daemon.process.wait()
        daemon.stderr.close()
    held(r, TEMPORARY, "closed the connection mid-reply")
    assert r.code == 74


@fault("scanner: clean, fo truncated or missing")
def test_scanner_replacing_fo_with_another_file(rig):
    def replace_fo(conn, request):
        substitute = request["out"] + ".new"
        with open(substitute, "wb") as f:
            f.write(sd.HEADER + sd.original(request))
        os.rename(substitute, request["out"])
        conn.sendall(b"FPQMAIL/1 CLEAN\nSize: %d\n\n" % (len(sd.HEADER) + request["size"]))

    rig.scan_with(replace_fo, tcp=True)  # a file replaced under its name
    r = rig.run()
    held(r, TEMPORARY, "fo holds 0 bytes, the scanner announced %d" % (len(sd.HEADER) + len(MESSAGE)))
    assert r.code == 74


# ---- the temp directory ---------------------------------------------------------------------

@fault("tmpdir: full")
def test_tmpdir_full_while_copying_the_message(rig, tmpfs):
    tmpfs(rig.tmpdir, "size=1m")
    rig.scan_with(sd.clean)
    r = rig.run(message=[os.urandom(1 << 16) for _ in range(32)])  # 2 MB into 1 MB
    held(r, TEMPORARY, "No space left on device")
    assert r.code == 53


@fault("tmpdir: full")
def test_tmpdir_already_full(rig, tmpfs):
    tmpfs(rig.tmpdir, "size=1m")
    filler = rig.tmpdir / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    rig.scan_with(sd.clean)
    try:
        r = rig.run()
    finally:
        filler.unlink()
    held(r, TEMPORARY, "No space left on device")
    assert r.code == 53


@fault("tmpdir: full")
def test_tmpdir_full_when_the_daemon_writes_fo(rig, tmpfs, start_scand):
    """fi fits, the daemon's fo does not: the daemon answers ERROR, nothing delivered."""
    tmpfs(rig.tmpdir, "size=1m")
    daemon = start_scand(rig.tmpdir)
    rig.env["FP_QMAIL_SCANNER"] = daemon.address
    r = rig.run(message=b"Subject: big\n\n" + b"y" * (600 << 10))
    held(r, TEMPORARY, "scanner error:")
    assert "No space left on device" in daemon.log()
    assert r.code == 71


@fault("tmpdir: read-only")
@pytest.mark.parametrize("how", ["tmpfs mounted ro", "read-only bind mount"])
def test_tmpdir_read_only(rig, tmpfs, how):
    if how == "tmpfs mounted ro":
        tmpfs(rig.tmpdir, "ro,size=1m")
    else:
        subprocess.run(["mount", "--bind", "-o", "ro", str(rig.tmpdir), str(rig.tmpdir)], check=True)
    rig.scan_with(sd.clean)
    try:
        r = rig.run()
    finally:
        if how != "tmpfs mounted ro":
            subprocess.run(["umount", str(rig.tmpdir)], check=True)
    held(r, TEMPORARY, "Read-only file system")
    assert r.code == 53


@fault("tmpdir: missing")
def test_tmpdir_is_a_regular_file(rig):
    rig.scan_with(sd.clean)
    path = rig.root / "a-file"
    path.write_bytes(b"")
    r = rig.run(env={"FP_QMAIL_TMPDIR": str(path)})
    held(r, TEMPORARY, "Not a directory")
    assert r.code == 53


@fault("tmpdir: planted fi*/fo* names")
def test_names_taken_by_anything_are_never_opened_and_skipped(rig):
    """Each of the first names fp-qmail draws is taken by something else: a symlink to
    a file, a hard link, a FIFO, a directory, a dangling symlink, another user's file,
    a free fi whose fo is taken. It must open none of them and use the first free pair.
    (Named files: a TCP scanner.)"""
    scanner = rig.scan_with(sd.clean, tcp=True)
    command, names = predictable_names(rig, fp_qmail_command())
    victim = rig.root / "victim"
    victim.write_bytes(b"precious")
    hard = rig.root / "hard-linked"
    hard.write_bytes(b"also precious")
    dangling_target = rig.root / "created-through-a-link"
    t = rig.tmpdir
    os.symlink(victim, t / ("fi" + names[0]))
    os.link(hard, t / ("fi" + names[1]))
    os.mkfifo(t / ("fi" + names[2]))
    (t / ("fi" + names[3])).mkdir()
    os.symlink(dangling_target, t / ("fi" + names[4]))
    os.symlink(victim, t / ("fo" + names[5]))
    (t / ("fi" + names[6])).write_bytes(b"planted")
    os.chown(t / ("fi" + names[6]), 65534, 65534)
    planted = {p.name: os.lstat(p) for p in t.iterdir()}
    try:
        r = rig.run(command=command)
    finally:
        after = {p.name: os.lstat(p) for p in t.iterdir()}
        remove_all(t)
    held(r, SUCCESS, message=sd.HEADER + MESSAGE, envelope=envelope())
    assert [req["in"] for req in scanner.requests] == [str(t / ("fi" + names[7]))]
    assert sorted(after) == sorted(planted)  # nothing added, nothing removed
    for name, st in planted.items():
        assert (after[name].st_ino, after[name].st_mtime_ns, after[name].st_size) == \
            (st.st_ino, st.st_mtime_ns, st.st_size), name
    assert victim.read_bytes() == b"precious" and hard.read_bytes() == b"also precious"
    assert not dangling_target.exists()


@fault("tmpdir: planted fi*/fo* names")
def test_every_name_taken_is_a_named_temporary_failure(rig):
    scanner = rig.scan_with(sd.clean, tcp=True)
    command, names = predictable_names(rig, fp_qmail_command())
    victim = rig.root / "victim"
    victim.write_bytes(b"precious")
    for name in names:
        os.symlink(victim, rig.tmpdir / ("fi" + name))
    try:
        r = rig.run(command=command)
    finally:
        after = sorted(p.name for p in rig.tmpdir.iterdir())
        remove_all(rig.tmpdir)
    held(r, TEMPORARY, "no free temp file name in %s after 16 tries" % rig.tmpdir)
    assert r.code == 53 and scanner.requests == []
    assert victim.read_bytes() == b"precious"
    assert after == sorted("fi" + name for name in names)


# ---- qmail-queue.orig --------------------------------------------------------------------------

@fault("queue: not executable")
@pytest.mark.parametrize("what, cause", [
    ("mode 0644", "Permission denied"), ("a directory", "Permission denied"),
    ("not a program", "Exec format error"), ("interpreter missing", "No such file or directory")])
def test_queue_program_that_cannot_be_executed(rig, what, cause):
    rig.scan_with(sd.clean)
    path = rig.root / "broken-queue"
    if what == "a directory":
        path.mkdir()
    else:
        path.write_bytes({"mode 0644": b"#!/bin/sh\nexit 0\n", "not a program": b"\x7fELF garbage\n",
                          "interpreter missing": b"#!/nonexistent/sh\nexit 0\n"}[what])
        path.chmod(0o644 if what == "mode 0644" else 0o755)
    r = rig.run(env={"FP_QMAIL_QUEUE": str(path)})
    held(r, TEMPORARY, "cannot run %s: %s" % (path, cause))
    assert r.code == 71


@fault("queue: killed by a signal")
@pytest.mark.parametrize("signum", [signal.SIGSEGV, signal.SIGTERM, signal.SIGABRT])
def test_queue_program_dying_of_a_signal(rig, signum):
    rig.scan_with(sd.clean)
    r = rig.run(env={"QQ_STANDIN_SIGNAL": str(int(signum))})
    held(r, TEMPORARY)
    assert r.code == -signum


@fault("queue: exits 11, 31 (permanent)")
@pytest.mark.parametrize("code", [11, 31])
def test_queue_program_permanent_exit_is_passed_through(rig, code):
    rig.scan_with(sd.clean)
    r = rig.run(env={"QQ_STANDIN_EXIT": str(code)})
    held(r, PERMANENT)
    assert r.code == code


@fault("queue: hanging")
def test_queue_program_hanging(rig):
    """fp-qmail has exec'd it: the hang is qmail-queue.orig's own (its 24 h alarm), our
    files are already gone, no alarm of ours survives, and a kill is a failure."""
    rig.scan_with(sd.clean)
    seen = {}

    def inspect_then_kill(proc):
        def exec_done():
            try:
                with open("/proc/%d/cmdline" % proc.pid, "rb") as f:
                    return b"qmail_queue_standin" in f.read()
            except FileNotFoundError:
                return False
        wait_for(exec_done, what="the exec of qmail-queue.orig")
        time.sleep(1)
        seen["spool"] = spool_names(rig)
        seen["alive"] = not dead(proc)
        kill_and_wait(proc)
        for partial in rig.queue_dir.glob(".*"):  # the stand-in's own, killed mid-record
            partial.unlink()

    r = rig.run(env={"QQ_STANDIN_HANG": "1"}, after_start=inspect_then_kill)
    held(r, TEMPORARY)
    assert seen == {"spool": [], "alive": True}
    assert r.code == -signal.SIGKILL


# ---- fp-qmail itself ------------------------------------------------------------------------------

@pytest.mark.parametrize("signum, code", [
    pytest.param(signal.SIGTERM, 71, marks=fault("fp-qmail: SIGTERM")),
    pytest.param(signal.SIGHUP, 71, marks=fault("fp-qmail: SIGHUP")),
    pytest.param(signal.SIGALRM, 71, marks=fault("fp-qmail: SIGALRM"))])
def test_signal_while_the_message_arrives(rig, signum, code):
    """A SIGALRM sent by someone is an interruption like the others: only fp-qmail's own
    timer means a timeout."""
    scanner = rig.scan_with(sd.clean, tcp=True)
    arrived = []

    def slow_message():
        yield b"Subject: slow\n\n" + b"z" * 65536
        wait_for(lambda: arrived, what="the signal")
        yield b"never read\n"

    def signal_mid_copy(proc):
        wait_for(lambda: any(n.startswith("fi") and (rig.tmpdir / n).stat().st_size for n in spool_names(rig)),
                 what="fi filling")
        proc.send_signal(signum)
        arrived.append(True)

    r = rig.run(message=slow_message(), after_start=signal_mid_copy)
    held(r, TEMPORARY, "interrupted by signal %d" % signum)
    assert r.code == code and scanner.requests == []


@fault("fp-qmail: SIGKILL, janitor")
def test_sigkill_mid_scan_leaves_nothing_with_nameless_files(rig):
    """The default transport: fi and fo have no names, so even SIGKILL leaves nothing."""
    rig.scan_with(sd.silent)

    def kill_when_scanning(proc):
        wait_for(lambda: rig.scanner.requests, what="the scan request")
        kill_and_wait(proc)

    r = rig.run(after_start=kill_when_scanning)
    held(r, TEMPORARY)
    assert r.code == -signal.SIGKILL and spool_names(rig) == []


@fault("fp-qmail: SIGKILL, janitor")
def test_sigkill_mid_scan_leaves_fi_fo_that_the_janitor_removes(rig, start_scand):
    """Over TCP the files have names: SIGKILL, which nothing can catch, leaves them to
    the daemon's janitor."""
    rig.scan_with(sd.silent, tcp=True)
    left = []

    def kill_when_scanning(proc):
        wait_for(lambda: rig.scanner.requests, what="the scan request")
        kill_and_wait(proc)
        left.extend(spool_names(rig))

    r = rig.run(after_start=kill_when_scanning)
    held(r, TEMPORARY)
    assert r.code == -signal.SIGKILL
    assert [n[:2] for n in left] == ["fi", "fo"] and left[0][2:] == left[1][2:]
    # The daemon serving this tmpdir finds them stale (older than FP_SCAND_STALE_AGE).
    daemon = start_scand(rig.tmpdir, config={"FP_SCAND_TIMEOUT": "1", "FP_QMAIL_TIMEOUT": "1",
                                             "FP_SCAND_STALE_AGE": "1.5", "FP_SCAND_JANITOR_INTERVAL": "0.2"})
    wait_for(lambda: spool_names(rig) == [], timeout=15, what="the janitor")
    for name in left:
        daemon.wait_log("janitor: removed %s" % (rig.tmpdir / name))


# ---- input --------------------------------------------------------------------------------------

@fault("input: message ends early")
def test_caller_dying_mid_message(rig):
    """qmail-smtpd killed while it writes: the message stops, the envelope never comes."""
    scanner = rig.scan_with(sd.clean)
    r = rig.run(message=b"Subject: cut\n\nhalf a mess", env_bytes=b"")
    held(r, TEMPORARY, "bad envelope (ended early)")
    assert r.code == 54 and scanner.requests == []


@fault("input: message ends early")
def test_message_fd_open_write_only(rig, tmp_path):
    rig.scan_with(sd.clean)
    path = tmp_path / "wronly"
    path.write_bytes(b"")
    fd = os.open(str(path), os.O_WRONLY)
    try:
        r = rig.run(stdin=fd)
    finally:
        os.close(fd)
    held(r, TEMPORARY, "cannot read the message: Bad file descriptor")
    assert r.code == 54


@fault("input: envelope over 16 MiB")
def test_envelope_over_the_limit_is_refused_after_reading_it(rig):
    """16 384 recipients of 1 KiB and a few bytes: more than fp-qmail keeps (16 MiB, the
    protocol's limit). It reads up to the limit (in linear time: the whole run has the
    rig's 60 s), then refuses."""
    scanner = rig.scan_with(sd.clean)
    recipient = b"T" + b"r" * 1022 + b"\0"
    env_bytes = b"Fbig@example.org\0" + recipient * (ENVELOPE_MAX // len(recipient)) + b"\0"
    assert len(env_bytes) > ENVELOPE_MAX
    r = rig.run(env_bytes=env_bytes)
    held(r, TEMPORARY, "envelope larger than %d bytes" % ENVELOPE_MAX)
    assert r.code == 51 and scanner.requests == []


@fault("input: lines of 1 MB")
def test_megabyte_lines_through_the_scanner_double(rig):
    rig.scan_with(sd.clean)
    message = b"Subject: long\n\n" + (BIG_LINE + b"\n") * 3 + BIG_LINE  # the last without newline
    held(rig.run(message=message), SUCCESS, message=sd.HEADER + message, envelope=envelope())


@fault("input: lines of 1 MB", "input: NUL bytes and 8-bit")
@pytest.mark.parametrize("what", ["megabyte lines", "every byte value"])
def test_odd_messages_through_the_daemon_and_clamd(rig, start_scand, clamd, what):
    daemon = start_scand(rig.tmpdir, engines=(clamd.unix_spec,))
    rig.env["FP_QMAIL_SCANNER"] = daemon.address
    if what == "megabyte lines":
        message = b"Subject: long\n\n" + BIG_LINE + b"\n" + b"\xff\0" * (1 << 19)
    else:
        message = b"Subject: bytes\n\n" + bytes(range(256)) * 64
    header = b"X-Antivirus: scanned by fp-qmail (clamd)\n"
    held(rig.run(message=message), SUCCESS, message=header + message, envelope=envelope())


# ---- configuration -------------------------------------------------------------------------------

def config_file(rig, text):
    path = rig.root / "f-prot.conf"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    rig.env["FP_QMAIL_CONF"] = str(path)
    rig.env.pop("FP_QMAIL_LOGLEVEL")  # so that the file is read
    return path


@fault("config: unreadable")
def test_config_the_caller_may_not_read(world_rig):
    rig = world_rig
    rig.scan_with(sd.clean)
    path = config_file(rig, "FP_QMAIL_LOGLEVEL=7\n")
    path.chmod(0o600)  # root's; fp-qmail runs as nobody
    r = rig.run(command=rig.command, preexec=become("nobody"), env={"FP_QMAIL_LOG_STDERR": "yes"})
    held(r, TEMPORARY, "cannot read config %s: Permission denied" % path)
    assert r.code == 55


@fault("config: unreadable")
def test_config_that_is_a_fifo_never_blocks(rig):
    rig.scan_with(sd.clean)
    path = rig.root / "fifo.conf"
    os.mkfifo(path)
    rig.env["FP_QMAIL_CONF"] = str(path)
    r = rig.run(env={"FP_QMAIL_LOGLEVEL": None}, timeout=20)
    held(r, SUCCESS, message=sd.HEADER + MESSAGE)


@fault("config: malformed")
def test_config_of_binary_garbage_around_a_good_line(rig):
    scanner = rig.scan_with(sd.infected("Worm.A"))
    garbage = bytes(range(256)) + b"\n\xff\xfe=\0\n=\n'\n\"\n\\\n$(reboot)\n"
    config_file(rig, garbage * 50 + b"FP_QMAIL_ON_VIRUS=drop\nFP_QMAIL_LOGLEVEL=7\nFP_QMAIL_LOG_STDERR=yes\n" + garbage)
    r = rig.run()
    assert r.code == 0 and r.delivered == [], r  # dropped by the policy from the good line
    assert "verdict=dropped" in r.stderr and "skipped" in r.stderr
    assert len(scanner.requests) == 1


@fault("config: huge")
def test_config_of_exactly_the_limit_is_read(rig):
    scanner = rig.scan_with(sd.infected("Worm.A"))
    line = b"FP_QMAIL_ON_VIRUS=drop\nFP_QMAIL_LOGLEVEL=7\nFP_QMAIL_LOG_STDERR=yes\n"
    config_file(rig, b"#" * ((1 << 20) - len(line) - 1) + b"\n" + line)
    r = rig.run()
    assert r.code == 0 and r.delivered == [] and len(scanner.requests) == 1, r
    assert "verdict=dropped" in r.stderr


@fault("config: values out of range")
@pytest.mark.parametrize("key, value", [
    ("FP_QMAIL_TIMEOUT", "inf"), ("FP_QMAIL_TIMEOUT", "86401"), ("FP_QMAIL_CONNECT_TIMEOUT", "-0"),
    ("FP_QMAIL_TIMEOUT", "1e400"), ("FP_QMAIL_SCANNER", "127.0.0.1:\u0663"),
    ("FP_QMAIL_SCANNER", "127.0.0.1:0"), ("FP_QMAIL_SCANNER", "[::1]"),
    ("FP_QMAIL_LOGLEVEL", "\uff17"), ("FP_QMAIL_LOGLEVEL", "-1"), ("FP_QMAIL_TMPDIR", "/tmp/\u00e9"),
    ("FP_QMAIL_LOG_STDERR", "YES"), ("FP_QMAIL_SCANNER", "\xff:11200"), ("FP_QMAIL_SCANNER", "127.0.0.1:\u00b9"),
    ("FP_QMAIL_SCANNER", "127.0.0.1:" + "9" * 5000), ("FP_QMAIL_REJECT_TEXT", ""), ("FP_QMAIL_REJECT_TEXT", "ab"),
], ids=lambda v: repr(v)[:40])
@pytest.mark.parametrize("source", ["environment", "file"])
def test_out_of_range_values_are_configuration_errors(rig, syslog, key, value, source):
    scanner = rig.scan_with(sd.clean)
    if source == "file":
        config_file(rig, "FP_QMAIL_LOGLEVEL=7\n%s='%s'\n" % (key, value))
        rig.env[key] = None  # the environment would win over the file
    else:
        rig.env[key] = value
    r = rig.run(preexec=syslog.enter)
    assert r.code == 55, r
    assert r.delivered == [] and scanner.requests == []
    if key == "FP_QMAIL_LOG_STDERR":  # the line goes to syslog only
        syslog.wait_for("bad setting %s=" % key, priority=syslog.MAIL_ERR)
    else:
        assert "bad setting %s=" % key in r.stderr


# ---- the environment ----------------------------------------------------------------------------------

@fault("env: huge environment")
def test_huge_environment(rig):
    rig.scan_with(sd.clean)
    big = {"FILLER_%04d" % n: "v" * 1000 for n in range(1500)}  # 1.5 MB, near the kernel's limit
    held(rig.run(env=big), SUCCESS, message=sd.HEADER + MESSAGE, envelope=envelope())


@fault("env: garbage FP_QMAIL_*")
@pytest.mark.parametrize("key, value", [
    ("FP_QMAIL_TIMEOUT", b"\xff\xfe"), ("FP_QMAIL_SCANNER", b"127.0.0.1:\xff1"),
    ("FP_QMAIL_ON_VIRUS", b"deliver\xc3"), ("FP_QMAIL_TMPDIR", b"/tmp\x01"),
    ("FP_QMAIL_SCANNER", b"a," * 50000), ("FP_QMAIL_LOGLEVEL", b"7" * 100000)])
def test_garbage_settings_in_the_environment(rig, key, value):
    scanner = rig.scan_with(sd.clean)
    r = rig.run(env={key: value})
    assert r.code == 55, r
    assert r.delivered == [] and scanner.requests == []
    assert "bad setting %s=" % key in r.stderr


@fault("env: garbage FP_QMAIL_*")
def test_garbage_reject_text_becomes_one_printable_line(rig):
    rig.scan_with(sd.infected("Worm.A"))
    r = rig.run(fd6=True, env={"FP_QMAIL_ON_VIRUS": "reject",
                               "FP_QMAIL_REJECT_TEXT": b"\xff\r\n\x1b[31m{threats}\x7f" * 100})
    held(r, PERMANENT)
    assert r.code == 82 and len(r.fd6_text) <= 201 and b"\r" not in r.fd6_text and b"\n" not in r.fd6_text


@pytest.mark.parametrize("variable", [
    pytest.param("PYTHONMALLOC=malloc_debug", marks=fault("env: PYTHONMALLOC=debug")),
    pytest.param("PYTHONMALLOC=pymalloc_debug", marks=fault("env: PYTHONMALLOC=debug")),
    pytest.param("PYTHONDEVMODE=1 PYTHONFAULTHANDLER=1", marks=fault("env: PYTHONDEVMODE=1")),
    pytest.param("PYTHONIOENCODING=undefined", marks=fault("env: PYTHONIOENCODING=rot13")),
    pytest.param("PYTHONIOENCODING=utf-16", marks=fault("env: PYTHONIOENCODING=rot13")),
    *[pytest.param(v, marks=fault("env: PYTHON* (other)")) for v in (
        "PYTHONTRACEMALLOC=25", "PYTHONVERBOSE=3", "PYTHONHASHSEED=0", "PYTHONUTF8=1",
        "PYTHONWARNINGS=error::DeprecationWarning", "PYTHONINSPECT=1 PYTHONSTARTUP=/dev/null")],
])
def test_python_variables_never_make_a_success_without_delivery(rig, variable):
    """A runtime that crashes at start is a temporary failure qmail retries; the rule
    is that exit 0 means delivered, and that a crash leaves nothing behind. Where the
    runtime survives the variable, the message must go through as usual."""
    rig.scan_with(sd.clean)
    r = rig.run(env=dict(v.split("=", 1) for v in variable.split()))
    if r.code == 0:
        held(r, SUCCESS, message=sd.HEADER + MESSAGE, envelope=envelope())
    else:
        held(r, TEMPORARY)


# ---- descriptors and limits -------------------------------------------------------------------------

@fault("fd: 6 a regular file")
@pytest.mark.parametrize("verdict", ["infected", "clean"])
def test_fd6_a_regular_file_open_for_writing(rig, tmp_path, verdict):
    rig.scan_with(sd.infected("Worm.A") if verdict == "infected" else sd.clean)
    path = tmp_path / "fd6"
    path.write_bytes(b"")

    def fd6_file():
        os.dup2(os.open(str(path), os.O_WRONLY | os.O_APPEND), 6)

    r = rig.run(preexec=fd6_file, env={"FP_QMAIL_ON_VIRUS": "reject"})
    if verdict == "infected":
        assert r.code == 82 and r.delivered == [], r
        assert path.read_bytes().startswith(b"DThis message contains a virus (Worm.A)")
    else:
        held(r, SUCCESS, message=sd.HEADER + MESSAGE)
        assert 6 in r.delivered[0][2]["fds"]  # left as the caller gave it
        assert path.read_bytes() == b""


@fault("fd: 2 closed")
def test_fd2_closed(rig):
    rig.scan_with(sd.clean)
    r = rig.run(preexec=lambda: os.close(2))
    held(r, SUCCESS, message=sd.HEADER + MESSAGE)


@fault("fd: ulimit -n 8")
@pytest.mark.parametrize("n", [6, 8])
def test_few_descriptors_are_enough(rig, n):
    """qmail-queue.orig inherits the limit too: here the stand-in runs without the sh
    wrapper (dash needs descriptors above 9), straight from a Python shebang."""
    rig.scan_with(sd.clean)
    queue = rig.root / "qmail-queue-no-sh"
    queue.write_text("#!%s -S\nimport runpy\nrunpy.run_path(%r, run_name='__main__')\n"
                     % (sys.executable, str(TESTS / "qmail_queue_standin.py")))
    queue.chmod(0o755)
    r = rig.run(preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)),
                env={"FP_QMAIL_QUEUE": str(queue), "QQ_SIGIGN": "0"})
    held(r, SUCCESS, message=sd.HEADER + MESSAGE, envelope=envelope())


@fault("fd: ulimit -n 8")
@pytest.mark.parametrize("n, cause", [(3, "Error 24"), (4, "Too many open files"), (5, "Too many open files")])
def test_too_few_descriptors_is_a_named_temporary_failure(rig, n, cause):
    """Below what fp-qmail needs (fi, fo, the socket; the loader needs one to start)."""
    rig.scan_with(sd.clean)
    r = rig.run(preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)))
    held(r, TEMPORARY, cause)
    assert r.code != 81, "running out of descriptors is not a bug of ours: %r" % r


@fault("fd: ulimit -f tiny")
@pytest.mark.parametrize("limit", [1, 4096])
def test_file_size_limit(rig, limit):
    rig.scan_with(sd.clean)
    r = rig.run(message=b"Subject: big\n\n" + b"q" * 65536,
                preexec=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    held(r, TEMPORARY, "File too large")
    assert r.code == 53
