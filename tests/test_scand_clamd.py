"""Issue 3's acceptance with a real clamd (Debian's, private signatures): fp-qmail
processes -> fpqmail-scand -> clamd, into the strict qmail-queue stand-in."""

import base64
import io
import os
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from clamd_fixtures import EICAR, Clamd
from conftest import REPO, read_deliveries
from scand_fixtures import TEMPORARY, connect

HEADER = b"X-Antivirus: scanned by fp-qmail (clamd)\n"


def zipped(name, data):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, data)
    return out.getvalue()


# The message in three pieces: the zip attachment's part (between its delimiter lines)
# and what comes before and after it, which must come out byte-identical.
BEFORE = (b"Received: from mx.example.org (1.2.3.4) by example.net\r\n"
          b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: invoice\r\n"
          b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"=-outer\"\r\n\r\n"
          b"preamble\r\n--=-outer\r\n"
          b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
          b"Hello Bob, the invoice =E2=82=AC 12.\r\n"
          b"--=-outer\r\n")
ZIP_PART = (b"Content-Type: application/zip; name=\"invoice.zip\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n"
            b"Content-Disposition: attachment; filename=\"invoice.zip\"\r\n\r\n"
            + base64.encodebytes(zipped("invoice.com", EICAR)).replace(b"\n", b"\r\n"))
AFTER = (b"--=-outer\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
         b"Gr\xfc\xdfe, 8-bit kept as is\r\n--=-outer--\r\nepilogue\r\n")
INFECTED = BEFORE + ZIP_PART + AFTER


def quarantine_tool(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fpqmail.scand.quarantine_tool", *map(str, args)],
                          capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})))


def test_eicar_in_a_zip_attachment_is_cut_out_quarantined_and_released_intact(rig, start_scand, clamd, tmp_path):
    qdir = tmp_path / "q"
    connect(rig, start_scand(rig.tmpdir, engines=(clamd.unix_spec,), quarantine=qdir))
    r = rig.run(INFECTED)
    assert r.code == 0, r
    [(delivered, _, _)] = r.delivered
    # the added header, then every byte but the zip part's as it was
    header, _, rest = delivered.partition(b"\r\nReceived: ")
    assert header.startswith(b"X-Antivirus: scanned by fp-qmail (clamd); infected:")
    assert b"in invoice.zip" in header and header.endswith(b"removed")
    rest = b"Received: " + rest
    assert rest.startswith(BEFORE) and rest.endswith(AFTER)
    notice = rest[len(BEFORE):-len(AFTER)]
    assert notice.startswith(b"Content-Type: text/plain; charset=us-ascii\r\n")
    assert b'removed the attachment "invoice.zip"' in notice and b"UEsDB" not in notice
    # the quarantine holds the original; release hands it back byte for byte
    listing = quarantine_tool("--dir", qdir, "list").stdout.decode()
    [entry] = [line.split("\t")[0] for line in listing.splitlines()]
    assert quarantine_tool("--dir", qdir, "export", entry).stdout == INFECTED
    for f in rig.queue_dir.iterdir():
        f.unlink()
    released = quarantine_tool("--dir", qdir, "release", entry,
                               env={"FP_QMAIL_QUEUE": str(rig.queue), "QQ_STANDIN_DIR": str(rig.queue_dir)})
    assert released.returncode == 0, released.stderr
    [(message, envelope, _)] = read_deliveries(rig.queue_dir)
    assert message == INFECTED and envelope == b"Falice@example.org\0Tbob@example.net\0\0"


def test_clamd_stopped_means_temporary_failure_nothing_delivered_tmpdir_empty(rig, start_scand, tmp_path):
    own = Clamd(str(tmp_path / "clamd"))
    os.mkdir(own.dir)
    own.start()
    try:
        daemon = connect(rig, start_scand(rig.tmpdir, engines=(own.unix_spec,)))
        assert rig.run(INFECTED).code == 0  # it works while clamd runs
        for f in rig.queue_dir.iterdir():
            f.unlink()
    finally:
        own.stop()
    for message in (INFECTED, b"Received: x\nSubject: clean\n\nhello\n"):
        r = rig.run(message)
        assert r.code in TEMPORARY and r.delivered == [], r
    assert rig.leftovers() == []
    assert "engine failure" in daemon.log()
    shutil.rmtree(own.dir, ignore_errors=True)


def test_200_runs_16_at_a_time_are_delivered_intact_or_tempfailed(rig, start_scand, clamd, tmp_path):
    # A tight daemon (2 workers, 1 waiting) so that some runs meet "busy" too.
    connect(rig, start_scand(rig.tmpdir, engines=(clamd.unix_spec,), args=["--workers", "2", "--queue", "1"]))
    messages = [b"Received: from client%d by example.net\nMessage-ID: <%d.%s@example.org>\nSubject: run %d\n\n%s\n"
                % (n, n, os.urandom(8).hex().encode(), n, os.urandom(300 * (n % 7 + 1)).hex().encode())
                for n in range(200)]

    def one(n):
        queue = tmp_path / f"queue{n}"
        queue.mkdir()
        r = rig.run(messages[n], env={"QQ_STANDIN_DIR": str(queue)}, timeout=120)
        return r.code, read_deliveries(queue), r

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(200)))
    delivered = tempfailed = 0
    for message, (code, deliveries, r) in zip(messages, results):
        if code == 0:
            [(got, envelope, _)] = deliveries
            assert got == HEADER + message and envelope == b"Falice@example.org\0Tbob@example.net\0\0"
            delivered += 1
        else:
            assert code in TEMPORARY and deliveries == [], r
            tempfailed += 1
    assert delivered + tempfailed == 200 and delivered > 0
    assert rig.leftovers() == []
    busy = sum("scanner error: busy" in r.stderr for code, _, r in results if code)  # the daemon throttles its busy lines
    print(f"200 runs, 16 at a time: {delivered} delivered intact, {tempfailed} tempfailed ({busy} busy)")
    assert tempfailed == busy  # nothing failed but for the deliberate overload


def test_a_hung_engine_meets_the_time_limit_and_sigterm_still_stops_the_daemon(rig, start_scand, tmp_path):
    """clamd stopped with SIGSTOP: connections are accepted by the kernel, never answered."""
    import signal
    own = Clamd(str(tmp_path / "clamd"))
    os.mkdir(own.dir)
    own.start()
    try:
        daemon = connect(rig, start_scand(rig.tmpdir, engines=(own.unix_spec,), args=["--timeout", "2"],
                                          config={"FP_SCAND_CLAMD_TIMEOUT": "60", "FP_QMAIL_TIMEOUT": "10"}))
        own.process.send_signal(signal.SIGSTOP)
        r = rig.run(INFECTED, env={"FP_QMAIL_TIMEOUT": "10"})
        assert r.code in TEMPORARY and r.delivered == [], r
        assert "scanner error: time limit" in r.stderr
        # the worker is still stuck in clamd; the daemon stops anyway, and at once
        daemon.signal(signal.SIGTERM)
        assert daemon.process.wait(10) == 0
        assert "Traceback" not in daemon.log()
    finally:
        own.process.send_signal(signal.SIGCONT)
        own.stop()
        shutil.rmtree(own.dir, ignore_errors=True)


# ---- issue 9 section 2: what clamd was not shown -------------------------------------

SIGNED = (b"Received: from mx.example.org (1.2.3.4) by example.net\r\nFrom: alice@example.org\r\n"
          b"To: bob@example.net\r\nSubject: signed\r\nMIME-Version: 1.0\r\n"
          b"Content-Type: multipart/signed; protocol=\"application/pgp-signature\"; micalg=pgp-sha256;\r\n"
          b"\tboundary=\"sig\"\r\n\r\n"
          b"--sig\r\nContent-Type: text/plain\r\n\r\nsigned text\r\n"
          b"--sig\r\nContent-Type: application/pgp-signature\r\n\r\nsignature\r\n"
          b"--sig\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
          b"Content-Disposition: attachment; filename=\"late.com\"\r\n\r\n"
          + base64.encodebytes(EICAR).replace(b"\n", b"\r\n") + b"--sig--\r\n")
CONTENT_TYPE_ONLY = (b"Content-Type: multipart/mixed; boundary=\"only\"\n\n"
                     b"--only\nContent-Type: text/plain\n\nfirst\n"
                     b"--only\nContent-Type: text/plain\n\nsecond\n"
                     b"--only\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n"
                     b"Content-Disposition: attachment; filename=\"late.com\"\n\n"
                     + base64.encodebytes(EICAR) + b"--only--\n")


@pytest.mark.parametrize("message", [SIGNED, CONTENT_TYPE_ONLY], ids=["multipart-signed", "content-type-only"])
@pytest.mark.parametrize("policy", ["deliver", "reject", "drop"])
def test_eicar_in_a_later_part_is_cut_out_or_the_message_refused(rig, start_scand, clamd, message, policy):
    connect(rig, start_scand(rig.tmpdir, engines=(clamd.unix_spec,)))
    r = rig.run(message, env={"FP_QMAIL_ON_VIRUS": policy})
    if policy == "reject":
        assert r.code == 31 and r.delivered == [], r
        return
    assert r.code == 0, r
    if policy == "drop":
        assert r.delivered == []
        return
    [(delivered, _, _)] = r.delivered
    header, _, rest = delivered.partition(message[:20])
    assert header.startswith(b"X-Antivirus: scanned by fp-qmail (clamd); infected:")
    assert b"Fpqmail-Test-Eicar.UNOFFICIAL in late.com" in header.replace(b"\r\n\t", b" ").replace(b"\n\t", b" ")
    rest = message[:20] + rest
    # every byte but the infected part's is delivered as it came, the part is a notice
    start = message.index(b"Content-Type: application/octet-stream")
    end = message.rindex(b"--", 0, message.rindex(b"--")) - (2 if message.endswith(b"\r\n") else 1)
    assert rest.startswith(message[:start]) and rest.endswith(message[end:])
    notice = rest[start:len(rest) - (len(message) - end)]
    assert b'removed the attachment "late.com"' in notice and base64.b64encode(EICAR)[:40] not in notice
