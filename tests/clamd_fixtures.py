"""A private, real clamd (Debian's clamav-daemon) for the tests.

Each instance runs from its own temp directory with a tiny signature database of its
own (no official database, no network), listens on a unix socket and on a free TCP
port of 127.0.0.1, and is stopped by its PID with TERM. StreamMaxLength is small so the
size-limit path can be tested with a few MB.

A pytest plugin (tests/conftest.py loads it): the `clamd` fixture is one instance for
the whole session, shared by every module that asks for it. A test that must stop or
break a clamd starts a Clamd of its own.
"""

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from conftest import free_port

CLAMD = "/usr/sbin/clamd"
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
# A second body signature, so tests can tell threats apart and use a non-EICAR one.
MARKER = b"FPQMAIL-TEST-MARKER-7f3a9c2e-do-not-deliver"
# A signature for mail only (target type 4): clamd matches it in what it takes for a
# whole mail, never in a part sent alone.
MAIL_MARKER = b"FPQMAIL-TEST-MAIL-ONLY-5d2c81aa"
# An exact-file (MD5) signature: clamd reports it only for exactly these bytes.
HDB_FILE = b"fp-qmail test file matched by its MD5 digest\n"
STREAM_MAX = 2 * 1024 * 1024
# Debian's clamav-testfiles: 44 files (archives, packers, documents, mail) that all hold
# one test program, clam.exe; one MD5 signature of it finds every one of them.
TESTFILES = "/usr/share/clamav-testfiles"
TESTFILE_THREAT = "Fpqmail-Test-Clam-Exe.UNOFFICIAL"


class Clamd:
    def __init__(self, directory):
        self.dir = directory
        self.unix_socket = os.path.join(directory, "clamd.sock")
        self.tcp_port = free_port()
        self.process = None

    @property
    def unix_spec(self):
        return f"clamd:{self.unix_socket}"

    @property
    def tcp_spec(self):
        return f"clamd:127.0.0.1:{self.tcp_port}"

    def start(self):
        db = os.path.join(self.dir, "db")
        tmp = os.path.join(self.dir, "tmp")
        os.makedirs(db)
        os.makedirs(tmp)
        with open(os.path.join(db, "fpqmail-test.ndb"), "w") as f:
            f.write(f"Fpqmail-Test-Eicar:0:*:{EICAR.hex()}\n")
            f.write(f"Fpqmail-Test-Marker:0:*:{MARKER.hex()}\n")
            f.write(f"Fpqmail-Test-Mail-Only:4:*:{MAIL_MARKER.hex()}\n")
        with open(os.path.join(db, "fpqmail-test.hdb"), "w") as f:
            f.write(f"{hashlib.md5(HDB_FILE).hexdigest()}:{len(HDB_FILE)}:Fpqmail-Test-Md5\n")
            if os.path.exists(os.path.join(TESTFILES, "clam.exe")):
                with open(os.path.join(TESTFILES, "clam.exe"), "rb") as exe:
                    program = exe.read()
                f.write(f"{hashlib.md5(program).hexdigest()}:{len(program)}:{TESTFILE_THREAT[:-11]}\n")
        conf = os.path.join(self.dir, "clamd.conf")
        with open(conf, "w") as f:
            f.write("\n".join([
                "Foreground yes",
                f"DatabaseDirectory {db}",
                f"LocalSocket {self.unix_socket}",
                f"TCPSocket {self.tcp_port}",
                "TCPAddr 127.0.0.1",
                f"TemporaryDirectory {tmp}",
                f"PidFile {os.path.join(self.dir, 'clamd.pid')}",
                f"LogFile {os.path.join(self.dir, 'clamd.log')}",
                f"StreamMaxLength {STREAM_MAX}",
                "SelfCheck 0",
                "",
            ]))
        self.process = subprocess.Popen([CLAMD, "--foreground", f"--config-file={conf}"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not self._answers_ping():
            if self.process.poll() is not None:
                raise RuntimeError(f"clamd exited {self.process.returncode}: "
                                   + self.process.stderr.read().decode(errors="replace") + self.log())
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("clamd did not answer PING within 60 s: " + self.log())
            time.sleep(0.02)

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process:
            self.process.stderr.close()

    def log(self):
        try:
            with open(os.path.join(self.dir, "clamd.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _answers_ping(self):
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1)
                s.connect(self.unix_socket)
                s.sendall(b"zPING\0")
                return s.recv(16) == b"PONG\0"
        except OSError:
            return False


@pytest.fixture(scope="session")
def clamd(tmp_path_factory):
    """A running private clamd, one per session: do not stop or break it."""
    if not os.path.exists(CLAMD):
        pytest.fail(f"{CLAMD} is missing: run scripts/install-deps (installs clamav-daemon)")
    directory = tmp_path_factory.mktemp("clamd")
    instance = Clamd(str(directory))
    instance.start()
    yield instance
    instance.stop()
    shutil.rmtree(directory, ignore_errors=True)
