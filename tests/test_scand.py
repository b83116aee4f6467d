"""fpqmail-scand as a real process on a real socket, driven by real fp-qmail processes
(the `rig` of conftest.py) and by a raw protocol client for what fp-qmail never sends."""

import os
import signal
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import MESSAGE, envelope
from scand_fixtures import EICAR, Scand, ask, exchange, parse_reply, request_bytes, spool, start_scand  # noqa: F401

TEMPORARY = {51, 52, 53, 54, 55, 71, 72, 73, 74, 81, 91}
HEADER = b"X-Antivirus: scanned by fp-qmail (builtin)\n"
ATTACHED = (b"Received: from mx.example.org by example.net\nFrom: alice@example.org\n"
            b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"b1\"\n\n"
            b"--b1\nContent-Type: text/plain; charset=iso-8859-1\nContent-Transfer-Encoding: 8bit\n\n"
            b"Caf\xe9, see the attachment.\n"
            b"--b1\nContent-Type: application/octet-stream\n"
            b"Content-Disposition: attachment; filename=\"tool.com\"\n\n" + EICAR + b"\n"
            b"--b1--\n")


def connect(rig, daemon):
    rig.env["FP_QMAIL_SCANNER"] = daemon.address
    return daemon


# ---- through fp-qmail ----------------------------------------------------------------

def test_clean_message_reaches_the_queue_with_one_added_header(rig, start_scand):
    connect(rig, start_scand(rig.tmpdir))
    r = rig.run()
    assert r.code == 0, r
    [(message, env, _)] = r.delivered
    assert message == HEADER + MESSAGE
    assert env == envelope()


def test_eicar_under_reject_exits_82_with_a_D_text_and_never_starts_the_queue(rig, start_scand):
    connect(rig, start_scand(rig.tmpdir))
    r = rig.run(ATTACHED, env={"FP_QMAIL_ON_VIRUS": "reject"}, fd6=True)
    assert r.code == 82, r
    assert r.fd6_text.startswith(b"D") and b"EICAR-Test-File in tool.com" in r.fd6_text
    r = rig.run(ATTACHED, env={"FP_QMAIL_ON_VIRUS": "reject"})
    assert r.code == 31, r
    assert r.delivered == []


def test_eicar_attachment_under_deliver_is_replaced_and_the_original_quarantined(rig, start_scand, tmp_path):
    daemon = connect(rig, start_scand(rig.tmpdir, quarantine=tmp_path / "q"))
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


# ---- limits: busy, time limit -----------------------------------------------------------

def test_past_workers_and_queue_the_answer_is_busy_at_once(start_scand, tmp_path):
    daemon = start_scand(tmp_path, args=["--workers", "1", "--queue", "1", "--timeout", "60"])
    holder = socket.create_connection(("127.0.0.1", daemon.port))   # occupies the worker
    waiting = socket.create_connection(("127.0.0.1", daemon.port))  # waits in the queue
    time.sleep(0.3)
    fi, fo = spool(tmp_path, MESSAGE)
    status, headers = parse_reply(exchange(daemon.port, request_bytes(fi, fo, len(MESSAGE)), timeout=30))
    assert (status, headers) == ("ERROR", {"Reason": ["busy"]})  # within 30 s, not after 60
    assert os.path.getsize(fo) == 0
    # the two accepted ones are still served, in order, once they speak
    for sock in (holder, waiting):
        fi, fo = spool(tmp_path, MESSAGE)
        sock.sendall(request_bytes(fi, fo, len(MESSAGE)))
        reply = b"".join(iter(lambda: sock.recv(4096), b""))
        sock.close()
        assert parse_reply(reply)[0] == "CLEAN"


def test_a_request_past_its_time_limit_gets_error_even_while_queued(start_scand, tmp_path):
    daemon = start_scand(tmp_path, args=["--workers", "1", "--timeout", "1"],
                         config={"FP_QMAIL_TIMEOUT": "1", "FP_SCAND_STALE_AGE": "5"})
    silent = [socket.create_connection(("127.0.0.1", daemon.port), timeout=30) for _ in range(2)]
    for sock in silent:  # the first holds the worker, the second waits in the queue
        reply = b"".join(iter(lambda: sock.recv(4096), b""))
        assert parse_reply(reply) == ("ERROR", {"Reason": ["time limit"]})
        sock.close()
    fi, fo = spool(tmp_path, MESSAGE)
    assert ask(daemon.port, fi, fo)[0] == "CLEAN"  # the daemon serves on


# ---- signals ---------------------------------------------------------------------------

def test_sigterm_stops_accepting_finishes_in_flight_requests_and_exits_0(start_scand, tmp_path):
    daemon = start_scand(tmp_path, args=["--workers", "2"])
    pairs = [spool(tmp_path, MESSAGE) for _ in range(3)]
    in_flight = [socket.create_connection(("127.0.0.1", daemon.port), timeout=30) for _ in pairs]
    for sock, (fi, fo) in zip(in_flight, pairs):
        data = request_bytes(fi, fo, len(MESSAGE))
        sock.sendall(data[:20])  # two being read by workers, one queued
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


def test_unix_socket_listener_serves_fp_qmail_and_is_removed_on_exit(rig, start_scand, tmp_path):
    path = tmp_path / "scand.sock"
    path.write_bytes(b"")  # not a socket: never removed, the daemon refuses to start
    with pytest.raises(RuntimeError, match="exists and is not a socket"):
        Scand(tmp_path, rig.tmpdir, listen=str(path)).start()
    path.unlink()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # a socket nobody listens on: left by a daemon that died
    stale.close()
    daemon = connect(rig, start_scand(rig.tmpdir, listen=str(path)))
    assert daemon.address == str(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
    r = rig.run()
    assert r.code == 0 and r.delivered[0][0] == HEADER + MESSAGE, r
    with pytest.raises(RuntimeError, match="another daemon is listening there"):
        Scand(tmp_path, rig.tmpdir, listen=str(path)).start()
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


def test_docs_table_shows_the_defaults_of_the_settings_table():
    import re
    from conftest import REPO
    from fpqmail.scand.settings import DEFAULTS
    text = (REPO / "docs" / "scand.md").read_text()
    documented = {}
    for key, default in re.findall(r"^\| `(FP_SCAND_\w+)` \|[^|]*\| ([^|]+) \|", text, re.M):
        documented[key] = default.strip().strip("`") if default.strip().startswith("`") else ""
    assert documented == DEFAULTS
