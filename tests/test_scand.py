"""fpqmail-scand as a real process on a real socket, driven by real fp-qmail processes
(the `rig` of conftest.py) and by raw protocol clients for what fp-qmail never sends:
over TCP with file names, over the unix socket with descriptors."""

import os
import signal
import socket
import stat
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import MESSAGE, envelope
from scand_fixtures import (ATTACHED, EICAR, HEADER, TEMPORARY, Files, Scand, ask, ask_unix, connect,
                            daemon_descriptors, exchange, exchange_unix, parse_reply, read_all,
                            request_bytes, send_with_fds, socket_directory, spool, unix_request)


# ---- through fp-qmail ----------------------------------------------------------------

@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_clean_message_reaches_the_queue_with_one_added_header(rig, start_scand, tcp):
    connect(rig, start_scand(rig.tmpdir), tcp)
    r = rig.run()
    assert r.code == 0, r
    [(message, env, _)] = r.delivered
    assert message == HEADER + MESSAGE
    assert env == envelope()


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_eicar_under_reject_exits_82_with_a_D_text_and_never_starts_the_queue(rig, start_scand, tcp):
    connect(rig, start_scand(rig.tmpdir), tcp)
    r = rig.run(ATTACHED, env={"FP_QMAIL_ON_VIRUS": "reject"}, fd6=True)
    assert r.code == 82, r
    assert r.fd6_text.startswith(b"D") and b"EICAR-Test-File in tool.com" in r.fd6_text
    r = rig.run(ATTACHED, env={"FP_QMAIL_ON_VIRUS": "reject"})
    assert r.code == 31, r
    assert r.delivered == []


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_eicar_attachment_under_deliver_is_replaced_and_the_original_quarantined(rig, start_scand, tmp_path, tcp):
    daemon = connect(rig, start_scand(rig.tmpdir, quarantine=tmp_path / "q"), tcp)
    r = rig.run(ATTACHED)
    assert r.code == 0, r
    [(message, _, _)] = r.delivered
    head, _, rest = ATTACHED.partition(b"--b1\nContent-Type: application/octet-stream")
    assert message.startswith(b"X-Antivirus: scanned by fp-qmail (builtin); infected:\n"
                              b"\tEICAR-Test-File in tool.com, removed\n" + head)
    assert EICAR not in message and message.endswith(b"\n--b1--\n")
    assert b'removed the attachment "tool.com": it contained EICAR-Test-File' in message
    entry = daemon.log().split(" id=")[1].split()[0]
    from fpqmail.scand.quarantine import Store
    assert Store(str(tmp_path / "q")).original(entry) == ATTACHED


def test_engine_down_means_error_reply_and_fp_qmail_tempfails(rig, start_scand, tmp_path):
    daemon = connect(rig, start_scand(rig.tmpdir, engines=("builtin", f"clamd:{tmp_path}/no-clamd.sock")))
    r = rig.run()
    assert r.code in TEMPORARY, r
    assert r.delivered == []
    assert "engine failure" in daemon.log()


def test_fifty_concurrent_requests_are_all_served(start_scand, tmp_path):
    daemon = start_scand(tmp_path)
    messages = [b"Subject: %d\n\nbody %d\n" % (n, n) * (n + 1) for n in range(50)]
    pairs = [spool(tmp_path, m) for m in messages]
    barrier = threading.Barrier(50)

    def one(pair):
        fi, fo = pair
        barrier.wait()
        return ask(daemon.port, fi, fo)

    with ThreadPoolExecutor(50) as pool:
        replies = list(pool.map(one, pairs))
    for (status, headers), (fi, fo), message in zip(replies, pairs, messages):
        assert status == "CLEAN", headers
        with open(fo, "rb") as f:
            assert f.read() == HEADER + message
        assert headers["Size"] == [str(len(HEADER + message))]


# ---- connections: nothing a client does before its request is complete holds a worker ----

def _idle(port, n, source="127.0.0.1"):
    conns = []
    for _ in range(n):
        s = socket.socket()
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        conns.append(s)
    return conns


def test_idle_and_dribbling_connections_hold_no_worker_and_get_10_seconds_in_all(rig, start_scand):
    daemon = connect(rig, start_scand(rig.tmpdir, args=["--workers", "1", "--queue", "0"]))
    idle = _idle(daemon.port, 20)
    dribbling = _idle(daemon.port, 20)
    started = time.monotonic()
    head = request_bytes("/x/fi1.0123456789abcdef", "/x/fo1.0123456789abcdef", 5)
    sent = 0
    while time.monotonic() - started < 3:  # one byte every 1.5 s: never "idle" for long
        for s in dribbling:
            s.sendall(head[sent:sent + 1])
        sent += 1
        r = rig.run()  # meanwhile, real mail goes through the single worker
        assert r.code == 0 and r.delivered[-1][0] == HEADER + MESSAGE, r
        time.sleep(1.5)
    # The whole request has 10 seconds from accept, however it dribbles in.
    for s in idle + dribbling:
        s.settimeout(20)
        assert parse_reply(read_all(s)) == ("ERROR", {"Reason": ["request not received in time"]})
        s.close()
    assert 9 < time.monotonic() - started < 15
    assert "request not received in time" in daemon.log()
    assert daemon.log().count("WARNING") <= 2  # one line per kind, counting the rest


def test_past_the_connection_limits_the_oldest_pending_connection_is_closed(rig, start_scand):
    daemon = connect(rig, start_scand(rig.tmpdir, config={"FP_SCAND_PEER_CONNECTIONS": "5",
                                                          "FP_SCAND_CONNECTIONS": "8"}))
    first = _idle(daemon.port, 5)
    others = _idle(daemon.port, 3, source="127.0.0.2")
    newer = _idle(daemon.port, 1)  # a sixth from 127.0.0.1: its oldest goes
    first[0].settimeout(10)
    assert parse_reply(read_all(first[0])) == ("ERROR", {"Reason": ["busy"]})
    newest = _idle(daemon.port, 1, source="127.0.0.3")  # a ninth in all: the oldest of all goes
    first[1].settimeout(10)
    assert parse_reply(read_all(first[1])) == ("ERROR", {"Reason": ["busy"]})
    r = rig.run()  # a real client always gets in: it is the newest, and sends at once
    assert r.code == 0, r
    first[2].settimeout(10)  # the ninth again: the oldest left went for it
    assert parse_reply(read_all(first[2])) == ("ERROR", {"Reason": ["busy"]})
    for s in first[3:] + others + newer + newest:  # all still open, unanswered
        s.setblocking(False)
        with pytest.raises(BlockingIOError):
            s.recv(1)
        s.close()
    daemon.wait_log(r"closed the oldest pending connection \(127.0.0.1:\d+, reading\): more than 5 from 127.0.0.1")


def test_requests_past_the_memory_budget_are_answered_busy(start_scand, tmp_path):
    daemon = start_scand(tmp_path, config={"FP_SCAND_REQUEST_MEMORY": "1"})
    big = b"F\0" + b"".join(b"Trecipient%d@example.org\0" % n for n in range(60000)) + b"\0"  # 1.6 MB
    fi, fo = spool(tmp_path, MESSAGE)
    assert ask(daemon.port, fi, fo, envelope=big) == ("ERROR", {"Reason": ["busy"]})
    assert os.path.getsize(fo) == 0
    smaller = b"F\0" + b"".join(b"Trecipient%d@example.org\0" % n for n in range(20000)) + b"\0"
    status, headers = ask(daemon.port, fi, fo, envelope=smaller)
    assert status == "CLEAN", headers
    assert "the most FP_SCAND_REQUEST_MEMORY allows: answered ERROR busy" in daemon.log()
    assert "rcpts=20000 " in daemon.log()


# ---- the workers: busy, fair shares, time limits ------------------------------------------

def _in_thread(results, name, daemon, tmp_path, message=MESSAGE, headers=b""):
    def run():
        fi, fo = spool(tmp_path, message)
        results.append((name, ask(daemon.port, fi, fo, headers=headers), time.monotonic()))
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_past_the_queue_the_newest_request_of_the_longest_line_is_busy(start_scand, slow_engine, tmp_path):
    slow = slow_engine(0.75)  # two objects per message: 1.5 s a request
    daemon = start_scand(tmp_path, engines=(slow.spec,), args=["--workers", "1", "--queue", "1"])
    results = []
    threads = [_in_thread(results, "a1", daemon, tmp_path, headers=b"Caller: 1001\n")]
    time.sleep(0.3)  # a1 in work
    threads.append(_in_thread(results, "a2", daemon, tmp_path, headers=b"Caller: 1001\n"))
    time.sleep(0.3)  # a2 waits
    threads.append(_in_thread(results, "a3", daemon, tmp_path, headers=b"Caller: 1001\n"))
    time.sleep(0.3)  # a3: no room, and a has the longest line: busy at once
    assert [(n, r) for n, r, _ in results] == [("a3", ("ERROR", {"Reason": ["busy"]}))]
    threads.append(_in_thread(results, "b1", daemon, tmp_path, headers=b"Caller: 1002\n"))
    for thread in threads:
        thread.join(30)
    outcomes = {name: reply[0] for name, reply, _ in results}
    # b1 needed the room: a2, the newest of the caller with the most in line, made it
    assert outcomes == {"a1": "CLEAN", "a2": "ERROR", "a3": "ERROR", "b1": "CLEAN"}
    assert [n for n, _, _ in results][:3] == ["a3", "a2", "a1"]


def test_one_callers_flood_does_not_make_another_caller_wait_behind_it(start_scand, slow_engine, tmp_path):
    slow = slow_engine(0.5)  # two objects per message: 1 s a request
    daemon = start_scand(tmp_path, engines=(slow.spec,), args=["--workers", "2", "--queue", "20"])
    results = []
    threads = [_in_thread(results, "flood", daemon, tmp_path, headers=b"Caller: 1001\nClient-IP: 192.0.2.1\n")
               for _ in range(8)]
    time.sleep(0.4)
    threads.append(_in_thread(results, "other", daemon, tmp_path, headers=b"Caller: 1001\nClient-IP: 192.0.2.2\n"))
    for thread in threads:
        thread.join(60)
    order = [name for name, _, _ in results]
    assert all(reply[0] == "CLEAN" for _, reply, _ in results) and len(order) == 9
    # first come, first served would put it last; a fair share serves it next
    assert order.index("other") <= 3, order
    assert "client=192.0.2.2" in daemon.log()


def test_past_the_time_limit_the_request_is_answered_and_its_worker_stops(start_scand, slow_engine, tmp_path):
    slow = slow_engine(0.3)
    daemon = start_scand(tmp_path, engines=(slow.spec,), args=["--workers", "1", "--timeout", "2"],
                         config={"FP_QMAIL_TIMEOUT": "1", "FP_SCAND_STALE_AGE": "5"})
    parts = b"".join(b"--b\nContent-Type: text/plain\n\npart %d\n" % n for n in range(40))
    long_one = b"Content-Type: multipart/mixed; boundary=b\n\n" + parts + b"--b--\n"  # 41 objects: 12 s
    results = []
    threads = [_in_thread(results, "long", daemon, tmp_path, message=long_one)]
    time.sleep(0.3)
    threads.append(_in_thread(results, "queued", daemon, tmp_path))
    for thread in threads:
        thread.join(30)
    assert [r for _, r, _ in results] == [("ERROR", {"Reason": ["time limit"]})] * 2
    answered = max(t for _, _, t in results)
    time.sleep(2)
    # the worker gave up at its next check: nothing asked of the engine after that
    assert not [t for t in slow.arrivals if t > answered + 1.0], (answered, slow.arrivals)
    assert len(slow.arrivals) < 15
    daemon.wait_log("abandoned at its time limit")
    fi, fo = spool(tmp_path, MESSAGE)
    assert ask(daemon.port, fi, fo)[0] == "CLEAN"  # the daemon serves on


# ---- the unix socket: descriptors and peers -----------------------------------------------

@pytest.fixture
def unix_scand(start_scand, tmp_path):
    """A daemon on a unix socket in a directory every user can reach."""
    directory = socket_directory()
    path = os.path.join(directory, "scand.sock")

    def start(**options):
        return start_scand(tmp_path, listen=path, **options)
    yield start
    if os.path.exists(path):
        os.unlink(path)
    os.rmdir(directory)


def test_descriptors_are_scanned_without_moving_the_clients_offsets(unix_scand):
    daemon = unix_scand()
    assert ask_unix(daemon.unix_path, MESSAGE) == ("CLEAN", {"Size": [str(len(HEADER + MESSAGE))],
                                                             "Engines": ["builtin"]}, HEADER + MESSAGE)
    for owner in (0, 65534):  # mapped, or (someone else's file) read with pread
        files = Files(ATTACHED)
        os.fchown(files.inp, owner, owner)
        files.passed = [os.dup(files.inp), os.dup(files.out)]  # sharing the client's offsets
        os.lseek(files.inp, 7, os.SEEK_SET)
        os.lseek(files.out, 100, os.SEEK_SET)
        status, headers, delivered = ask_unix(daemon.unix_path, ATTACHED, files=files)
        assert status == "CLEANED" and headers["Threat"] == ["EICAR-Test-File in tool.com"]
        assert delivered.startswith(b"X-Antivirus: ") and EICAR not in delivered
        assert int(headers["Size"][0]) == len(delivered)
        assert (os.lseek(files.inp, 0, os.SEEK_CUR), os.lseek(files.out, 0, os.SEEK_CUR)) == (7, 100)
        files.close()
    infected = b"Subject: x\n\n" + EICAR + b"\n"
    status, headers, delivered = ask_unix(daemon.unix_path, infected, headers=b"On-Virus: reject\n")
    assert (status, delivered) == ("INFECTED", b"")
    status, headers, _ = ask_unix(daemon.unix_path, ATTACHED, headers=b"On-Virus: drop\nCaller: 1002\n")
    assert status == "INFECTED" and "Size" not in headers  # cut out or not, it will not be delivered
    assert "caller=1002" in daemon.log()


def _refusal(path, request, fds):
    reply = exchange_unix(path, request, fds)
    status, headers = parse_reply(reply)
    assert status == "ERROR", reply
    return headers["Reason"][0]


def test_descriptors_that_are_not_in_and_out_are_refused_and_every_one_is_closed(unix_scand):
    daemon = unix_scand()
    path = daemon.unix_path
    assert ask_unix(path, MESSAGE)[0] == "CLEAN"
    baseline = daemon_descriptors(daemon)
    request = unix_request(len(MESSAGE))
    files = Files(MESSAGE)
    inp, out = files.passed
    memfd = os.memfd_create("x")
    os.write(memfd, MESSAGE)
    r, w = os.pipe()
    o_path = os.open("/etc/hostname", os.O_PATH)
    full = Files(MESSAGE)
    os.write(full.out, b"someone's")
    sparse = os.memfd_create("sparse")
    os.ftruncate(sparse, 1 << 30)
    rss = _rss_kb(daemon)
    cases = [
        (request, [], "no descriptors: In and Out come with the request's first byte"),
        (request, [inp], "1 descriptors, not 2 (In and Out)"),
        (request, [inp, out, memfd], "3 descriptors, not 2 (In and Out)"),
        (request, [inp, out] + [memfd] * 8, "more descriptors than In and Out"),
        (unix_request(len(MESSAGE), headers=b"In: /tmp/fi1.0123456789abcdef\nOut: /tmp/fo1.0123456789abcdef\n"),
         [inp, out], "In and Out are named: on a unix socket they are passed as descriptors"),
        (request, [out, out], "In is not open for reading"),
        (request, [inp, inp], "Out is not open for writing"),
        (request, [o_path, out], "In is not open for reading"),
        (request, [r, out], "In is not a regular file"),
        (request, [memfd, memfd], "In and Out are the same file"),
        (request, [full.passed[0], full.passed[1]], "Out is not empty"),
        (unix_request(len(MESSAGE) + 1), [inp, out], f"In holds {len(MESSAGE)} bytes, not Size {len(MESSAGE) + 1}"),
        (unix_request(1 << 30), [sparse, out], f"In is sparse: 0 bytes allocated for {1 << 30}"),
    ]
    for data, fds, reason in cases:
        assert _refusal(path, data, fds) == reason, reason
    # descriptors that come after the first byte
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.sendall(request[:5])
        time.sleep(0.2)
        send_with_fds(s, request[5:], [inp, out])
        assert parse_reply(read_all(s))[1]["Reason"] == ["descriptors that did not come with the request's first byte"]
    assert os.path.getsize(f"/proc/self/fd/{files.out}") == 0
    assert _rss_kb(daemon) < rss + 50_000  # the sparse GiB was never read
    for fd in (memfd, r, w, o_path, sparse):
        os.close(fd)
    files.close()
    full.close()
    deadline = time.monotonic() + 5
    while daemon_descriptors(daemon) != baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon_descriptors(daemon) == baseline  # none kept, in any case
    assert ask_unix(path, MESSAGE)[0] == "CLEAN"


def _rss_kb(daemon):
    with open(f"/proc/{daemon.process.pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


NOBODY_CLIENT = """
import array, os, socket, sys
path, command = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX)
s.connect(path)
if command == "PING":
    s.sendall(b"FPQMAIL/1 PING\\n\\n")
else:
    message = b"Subject: hi\\n\\nhello\\n"
    inp, out = os.memfd_create("In"), os.memfd_create("Out")
    os.write(inp, message)
    data = b"FPQMAIL/1 SCAN\\nSize: %d\\nEnvelope: 3\\n\\nF\\0\\0" % len(message)
    s.sendmsg([data[:1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [inp, out]))])
    s.sendall(data[1:])
sys.stdout.buffer.write(b"".join(iter(lambda: s.recv(4096), b"")))
"""


def _as_nobody(path, command):
    from conftest import become
    return subprocess.run(["/usr/bin/python3", "-c", NOBODY_CLIENT, path, command], capture_output=True,
                          preexec_fn=become("nobody"), timeout=30, check=True).stdout


def test_only_the_configured_users_may_ask_for_scans_and_anyone_may_ping(unix_scand):
    daemon = unix_scand()
    assert parse_reply(_as_nobody(daemon.unix_path, "SCAN")) == \
        ("ERROR", {"Reason": ["uid 65534 may not ask for scans"]})
    assert parse_reply(_as_nobody(daemon.unix_path, "PING")) == ("PONG", {"Engines": ["builtin"]})
    assert daemon.stop() == 0
    daemon = unix_scand(config={"FP_SCAND_CLIENTS": "root nobody nosuchuser"})
    assert parse_reply(_as_nobody(daemon.unix_path, "SCAN"))[0] == "CLEAN"
    assert "FP_SCAND_CLIENTS: no user 'nosuchuser' on this system: skipped" in daemon.log()


def test_ping_answers_pong_or_the_engine_problem_and_probes_stay_quiet(start_scand, tmp_path):
    path = str(tmp_path / "s.sock")
    daemon = start_scand(tmp_path, listen=f"127.0.0.1:0 {path}")
    assert parse_reply(exchange(daemon.port, b"FPQMAIL/1 PING\n\n")) == ("PONG", {"Engines": ["builtin"]})
    assert parse_reply(exchange_unix(path, b"FPQMAIL/1 PING\r\n\r\n")) == ("PONG", {"Engines": ["builtin"]})
    for _ in range(20):  # a monitor's port probe: connect and close
        socket.create_connection(("127.0.0.1", daemon.port)).close()
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
    assert daemon.stop() == 0
    assert "WARNING" not in daemon.log() and "ERROR" not in daemon.log()
    down = start_scand(tmp_path, engines=("builtin", f"clamd:{tmp_path}/no-clamd.sock"))
    status, headers = parse_reply(exchange(down.port, b"FPQMAIL/1 PING\n\n"))
    assert status == "ERROR" and headers["Reason"][0].startswith("engine clamd: clamd: ")
    assert "No such file or directory" in headers["Reason"][0]


# ---- signals ---------------------------------------------------------------------------

def test_sigterm_stops_accepting_finishes_in_flight_requests_and_exits_0(start_scand, tmp_path):
    daemon = start_scand(tmp_path, args=["--workers", "2"])
    pairs = [spool(tmp_path, MESSAGE) for _ in range(3)]
    in_flight = [socket.create_connection(("127.0.0.1", daemon.port), timeout=30) for _ in pairs]
    for sock, (fi, fo) in zip(in_flight, pairs):
        data = request_bytes(fi, fo, len(MESSAGE))
        sock.sendall(data[:20])  # three requests being read when SIGTERM comes
    time.sleep(0.3)
    daemon.signal(signal.SIGTERM)
    daemon.wait_log("SIGTERM: no new requests")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
    assert daemon.process.poll() is None  # still finishing
    for sock, (fi, fo) in zip(in_flight, pairs):
        sock.sendall(request_bytes(fi, fo, len(MESSAGE))[20:])
        assert parse_reply(b"".join(iter(lambda: sock.recv(4096), b"")))[0] == "CLEAN"
        sock.close()
    assert daemon.process.wait(20) == 0


def test_sighup_reloads_settings_and_signatures_without_dropping_requests(start_scand, tmp_path):
    import hashlib
    digests = tmp_path / "bad.sha256"
    digests.write_text("")
    daemon = start_scand(tmp_path, config={"FP_SCAND_SHA256_FILE": str(digests)})
    banned = ATTACHED.replace(EICAR, b"harmless").replace(b"tool.com", b"tool.exe")
    known_bad = ATTACHED.replace(EICAR, b"known bad bytes")
    assert ask(daemon.port, *spool(tmp_path, banned))[0] == "CLEAN"
    assert ask(daemon.port, *spool(tmp_path, known_bad))[0] == "CLEAN"
    # a request in flight across the reload is answered
    fi, fo = spool(tmp_path, MESSAGE)
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=30)
    sock.sendall(request_bytes(fi, fo, len(MESSAGE))[:30])
    # 1: a new signature in the unchanged settings' digest file: the engine reloads it
    digests.write_text(hashlib.sha256(b"known bad bytes").hexdigest() + "\n")
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("SIGHUP: configuration and signatures reloaded")
    status, headers = ask(daemon.port, *spool(tmp_path, known_bad))
    assert status == "CLEANED" and headers["Threat"] == ["Known-Bad-SHA256 in tool.com"]
    # 2: a changed setting: the engines are built anew
    daemon.write_config({"FP_SCAND_SHA256_FILE": str(digests), "FP_SCAND_BANNED_NAMES": "*.exe"})
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("SIGHUP: configuration and signatures reloaded", count=2)
    status, headers = ask(daemon.port, *spool(tmp_path, banned))
    assert status == "CLEANED" and "tool.exe" in headers["Threat"][0]
    sock.sendall(request_bytes(fi, fo, len(MESSAGE))[30:])
    assert parse_reply(b"".join(iter(lambda: sock.recv(4096), b"")))[0] == "CLEAN"
    sock.close()
    # 3: a broken config is refused; the running one stays
    daemon.write_config({"FP_SCAND_WORKERS": "many"})
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("reload failed, the running configuration stays: FP_SCAND_WORKERS='many'")
    assert ask(daemon.port, *spool(tmp_path, banned))[0] == "CLEANED"


# ---- what a request may name -------------------------------------------------------------

def _attack(tmp_path, daemon, fi, fo, size=None):
    status, headers = ask(daemon.port, fi, fo, size=size if size is not None else len(MESSAGE))
    assert status == "ERROR", headers
    return headers["Reason"][0]


def test_files_outside_the_tmpdir_or_misnamed_are_refused(start_scand, tmp_path):
    tmpdir = tmp_path / "spool"
    tmpdir.mkdir()
    daemon = start_scand(tmpdir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    fi, fo = spool(elsewhere, MESSAGE)
    assert "not a fi<pid>.<random> file in" in _attack(tmp_path, daemon, fi, fo)
    inside_fi, inside_fo = spool(tmpdir, MESSAGE)
    # through .. and through a doubled slash: only the directory as configured counts
    dotted = f"{tmpdir}/../spool/{os.path.basename(inside_fi)}"
    assert "not a fi" in _attack(tmp_path, daemon, dotted, inside_fo)
    assert "not a fi" in _attack(tmp_path, daemon, "/etc/passwd", inside_fo)
    assert "not a fo" in _attack(tmp_path, daemon, inside_fi, inside_fi)
    other_fi, _ = spool(tmpdir, MESSAGE)
    assert "not a pair" in _attack(tmp_path, daemon, other_fi, inside_fo)
    assert os.path.getsize(inside_fo) == 0
    assert "Traceback" not in daemon.log()


def test_symlinks_fifos_hard_links_and_foreign_files_are_refused(start_scand, tmp_path):
    daemon = start_scand(tmp_path)
    secret = tmp_path / "secret"
    secret.write_bytes(MESSAGE)
    target = tmp_path / "target"
    target.write_bytes(b"")
    # symlinked In: O_NOFOLLOW
    fi, fo = spool(tmp_path, MESSAGE)
    os.unlink(fi)
    os.symlink(secret, fi)
    assert "In: cannot open" in _attack(tmp_path, daemon, fi, fo)
    # symlinked Out: nothing written through it
    fi, fo = spool(tmp_path, MESSAGE)
    os.unlink(fo)
    os.symlink(target, fo)
    assert "Out: cannot open" in _attack(tmp_path, daemon, fi, fo)
    assert target.read_bytes() == b""
    # a FIFO planted as In must not hang the worker
    fi, fo = spool(tmp_path, MESSAGE)
    os.unlink(fi)
    os.mkfifo(fi)
    assert "not a regular file" in _attack(tmp_path, daemon, fi, fo)
    # In hard-linked to a file elsewhere
    fi, fo = spool(tmp_path, MESSAGE)
    os.unlink(fi)
    os.link(secret, fi)
    assert "not a regular file with a single link" in _attack(tmp_path, daemon, fi, fo)
    # Out not empty: never written over
    fi, fo = spool(tmp_path, MESSAGE)
    with open(fo, "wb") as f:
        f.write(b"someone else's")
    assert _attack(tmp_path, daemon, fi, fo) == "Out is not empty"
    with open(fo, "rb") as f:
        assert f.read() == b"someone else's"
    # In and Out of different owners
    fi, fo = spool(tmp_path, MESSAGE)
    os.chown(fo, 65534, 65534)
    assert _attack(tmp_path, daemon, fi, fo) == "In and Out have different owners"
    # Size not the size of In
    fi, fo = spool(tmp_path, MESSAGE)
    assert _attack(tmp_path, daemon, fi, fo, size=len(MESSAGE) + 1) == \
        f"In holds {len(MESSAGE)} bytes, not Size {len(MESSAGE) + 1}"
    assert os.path.getsize(fo) == 0
    # a sparse In: never read, whatever its size says
    fi, fo = spool(tmp_path, b"")
    os.truncate(fi, 1 << 30)
    assert _attack(tmp_path, daemon, fi, fo, size=1 << 30) == f"In is sparse: 0 bytes allocated for {1 << 30}"
    # a directory named like a spool file
    fi, fo = spool(tmp_path, MESSAGE)
    os.unlink(fo)
    os.mkdir(fo)
    assert "Out: cannot open" in _attack(tmp_path, daemon, fi, fo)
    assert daemon.process.poll() is None and "Traceback" not in daemon.log()


def test_files_of_other_users_are_read_not_mapped_and_scanned_alike(start_scand, tmp_path):
    daemon = start_scand(tmp_path)
    fi, fo = spool(tmp_path, ATTACHED)
    for path in (fi, fo):
        os.chown(path, 65534, 65534)
    status, headers = ask(daemon.port, fi, fo)
    assert status == "CLEANED" and headers["Threat"] == ["EICAR-Test-File in tool.com"]


def test_a_message_over_the_size_limit_is_refused_before_it_is_read(start_scand, tmp_path):
    # Another user's file would be read into memory, not mapped: past FP_SCAND_MAX_SIZE
    # (1 MiB here) the daemon refuses it without reading it.
    daemon = start_scand(tmp_path, config={"FP_SCAND_MAX_SIZE": str(1 << 20)})
    fi, fo = spool(tmp_path, os.urandom(64 << 20))
    for path in (fi, fo):
        os.chown(path, 65534, 65534)
    before = peak_rss_mb(daemon.process.pid)
    status, headers = ask(daemon.port, fi, fo)
    assert status == "REFUSED" and headers["Reason"] == ["message too large to be scanned (#5.3.4)"]
    assert peak_rss_mb(daemon.process.pid) - before < 32


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 1024


@pytest.mark.parametrize("data, reason", [
    (b"FPQMAIL/2 SCAN\n\n", "unsupported version"),
    (b"GET / HTTP/1.0\r\n\r\n", "malformed request: not FPQMAIL"),
    (b"FPQMAIL/1 SCAN\n" + b"X" * 5000, "malformed request: line too long"),
    (b"FPQMAIL/1 SCAN\nIn: /a\nOut: /b\nSize: 1\nEnvelope: 3\n\nFa\0", "malformed envelope"),
    (b"FPQMAIL/1 SCAN\nIn: /a\nOut: /b\nSize: 1\nEnvelope: 2\n\nF\0\0", "malformed request: more bytes than Envelope announced"),
])
def test_malformed_requests_get_error_with_a_reason_and_the_daemon_serves_on(start_scand, tmp_path, data, reason):
    daemon = start_scand(tmp_path)
    assert parse_reply(exchange(daemon.port, data)) == ("ERROR", {"Reason": [reason]})
    assert ask(daemon.port, *spool(tmp_path, MESSAGE))[0] == "CLEAN"


# ---- janitor, unix socket, configuration -----------------------------------------------

def test_janitor_removes_stale_spool_files_and_nothing_else(start_scand, tmp_path):
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    stale = spool(spool_dir, MESSAGE, pid=1)
    elsewhere = tmp_path / "keep"
    elsewhere.write_bytes(b"x")
    os.symlink(elsewhere, spool_dir / "fi2.0123456789abcdef")
    (spool_dir / "fi3.notours!").write_bytes(b"x")
    (spool_dir / "other").write_bytes(b"x")
    start_scand(spool_dir, config={"FP_SCAND_TIMEOUT": "1", "FP_QMAIL_TIMEOUT": "1",
                                   "FP_SCAND_STALE_AGE": "2", "FP_SCAND_JANITOR_INTERVAL": "0.2"})
    time.sleep(1)
    fresh = spool(spool_dir, MESSAGE, pid=4)
    deadline = time.monotonic() + 10
    while any(os.path.exists(p) for p in stale) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = sorted(os.listdir(spool_dir))
    assert not any(os.path.exists(p) for p in stale), left
    assert all(os.path.exists(p) for p in fresh)  # changed 1 s ago: not stale yet
    assert {"fi2.0123456789abcdef", "fi3.notours!", "other"} <= set(left)
    assert elsewhere.read_bytes() == b"x"


def test_unix_socket_listener_is_made_checked_and_removed_on_exit(start_scand, tmp_path):
    path = tmp_path / "scand.sock"
    path.write_bytes(b"")  # not a socket: never removed, the daemon refuses to start
    with pytest.raises(RuntimeError, match="exists and is not a socket"):
        Scand(tmp_path, tmp_path, listen=str(path)).start()
    path.unlink()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # a socket nobody listens on: left by a daemon that died
    stale.close()
    daemon = start_scand(tmp_path, listen=f"{path} 127.0.0.1:0")
    assert daemon.addresses[0] == str(path) and daemon.port
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
    assert ask_unix(str(path), MESSAGE)[::2] == ("CLEAN", HEADER + MESSAGE)
    assert ask(daemon.port, *spool(tmp_path, MESSAGE))[0] == "CLEAN"
    with pytest.raises(RuntimeError, match="another daemon is listening there"):
        Scand(tmp_path, tmp_path, listen=str(path)).start()
    assert daemon.stop() == 0
    assert not path.exists()


@pytest.mark.parametrize("config, args, code, text", [
    ({"FP_SCAND_WORKERS": "0"}, [], 2, "FP_SCAND_WORKERS='0': must be between 1 and 1024"),
    ({}, ["--engine", "nosuch"], 2, "engine nosuch: unknown engine"),
    ({"FP_SCAND_STALE_AGE": "100"}, [], 2, "FP_SCAND_STALE_AGE=100 must exceed the longest scan"),
    ({}, ["--listen", "localhost"], 2, "FP_SCAND_LISTEN='localhost': expected host:port"),
])
def test_configuration_mistakes_exit_2_with_a_clear_line(tmp_path, config, args, code, text):
    daemon = Scand(tmp_path, tmp_path, config=config, args=args)
    with pytest.raises(RuntimeError) as e:
        daemon.start()
    assert daemon.process.returncode == code
    assert text in str(e.value) and "Traceback" not in str(e.value)


def test_a_port_in_use_exits_1(start_scand, tmp_path):
    first = start_scand(tmp_path)
    (tmp_path / "second").mkdir()
    second = Scand(tmp_path / "second", tmp_path, listen=first.address)
    with pytest.raises(RuntimeError) as e:
        second.start()
    assert second.process.returncode == 1 and f"cannot listen on {first.address}" in str(e.value)


def test_tcp_warns_when_others_can_list_the_temp_directory(start_scand, tmp_path):
    private, listable = tmp_path / "private", tmp_path / "listable"
    private.mkdir(mode=0o2770)
    listable.mkdir(mode=0o755)
    assert "can be listed by every user" not in start_scand(private).log()
    assert f"FP_SCAND_TMPDIR={listable} can be listed by every user" in start_scand(listable).log()
    assert "can be listed" not in start_scand(listable, listen=str(tmp_path / "s.sock")).log()


def test_the_descriptor_limit_is_raised_to_the_hard_limit(start_scand, tmp_path):
    import resource
    daemon = start_scand(tmp_path, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096)))
    assert resource.prlimit(daemon.process.pid, resource.RLIMIT_NOFILE) == (4096, 4096)


def test_docs_table_shows_the_defaults_of_the_settings_table():
    import re
    from conftest import REPO
    from fpqmail.scand.settings import DEFAULTS
    text = (REPO / "docs" / "scand.md").read_text()
    documented = {}
    for key, default in re.findall(r"^\| `(FP_SCAND_\w+)` \|[^|]*\| ([^|]+) \|", text, re.M):
        documented[key] = default.strip().strip("`") if default.strip().startswith("`") else ""
    assert documented == DEFAULTS
