"""fpqmail-scand as a real process for the tests, raw protocol clients, and the helpers
the daemon's tests share. A pytest plugin (tests/conftest.py loads it): its fixtures
are there for every test module without an import.

Scand starts `python -m fpqmail.scand` with a config file of its own, by default on a
free port (--listen 127.0.0.1:0: the daemon logs the address it got), its stderr in a
file the tests read. Over TCP, spool() creates an fi/fo pair the way the seed's
fp-qmail does and ask() names it in a request; over the unix socket, ask_unix() passes
the two files as descriptors (sendmsg with SCM_RIGHTS), as docs/protocol.md says.
"""

import array
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
ENVELOPE = b"Falice@example.org\0Tbob@example.net\0\0"
# fp-qmail's exit codes that make qmail retry later
TEMPORARY = {51, 52, 53, 54, 55, 71, 72, 73, 74, 81, 91}
HEADER = b"X-Antivirus: scanned by fp-qmail (builtin)\n"
ATTACHED = (b"Received: from mx.example.org by example.net\nFrom: alice@example.org\n"
            b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"b1\"\n\n"
            b"--b1\nContent-Type: text/plain; charset=iso-8859-1\nContent-Transfer-Encoding: 8bit\n\n"
            b"Caf\xe9, see the attachment.\n"
            b"--b1\nContent-Type: application/octet-stream\n"
            b"Content-Disposition: attachment; filename=\"tool.com\"\n\n" + EICAR + b"\n"
            b"--b1--\n")


def socket_directory():
    """A new directory for a unix socket: short enough a path for sun_path whatever the
    test's name, and reachable by every user (setuid runs connect as another one)."""
    directory = tempfile.mkdtemp(prefix="scand-", dir="/tmp")
    os.chmod(directory, 0o755)
    return directory


class Scand:
    """The daemon as installed: on a unix socket (first: what `connect` gives fp-qmail)
    and, for the protocol's TCP side and raw clients, on a free TCP port too."""

    def __init__(self, root, tmpdir, engines=("builtin",), quarantine=None, config=None, args=(),
                 listen=None, preexec_fn=None):
        self.root = Path(root)
        self.socket_directory = None
        if listen is None:
            self.socket_directory = socket_directory()
            listen = f"{self.socket_directory}/scand.sock 127.0.0.1:0"
        self.tmpdir = Path(tmpdir)
        self.quarantine = quarantine
        self.config = self.root / "scand.conf"
        self.stderr_path = self.root / "scand.stderr"
        self.preexec_fn = preexec_fn
        self.write_config(config or {})
        self.command = [sys.executable, "-m", "fpqmail.scand", "--config", str(self.config),
                        "--listen", listen, "--tmpdir", str(self.tmpdir)]
        for spec in engines:
            self.command += ["--engine", spec]
        if quarantine:
            self.command += ["--quarantine", str(quarantine)]
        self.command += [str(a) for a in args]
        self.process = None
        self.addresses = []  # as fp-qmail's FP_QMAIL_SCANNER names them
        self.address = None  # the first
        self.port = None     # the first TCP one's port
        self.unix_path = None

    def write_config(self, values):
        text = "".join(f"{k}='{v}'\n" for k, v in values.items())
        self.config.write_text(text)

    def start(self, timeout=30):
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.stderr = open(self.stderr_path, "ab")
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=self.stderr, env=env, cwd=str(self.root),
                                        preexec_fn=self.preexec_fn)
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(r"listening on (.+?) with \d+ workers", self.log())
            if m:
                self.addresses = m.group(1).split(", ")
                self.address = self.addresses[0]
                for address in self.addresses:
                    if address.startswith("/"):
                        self.unix_path = self.unix_path or address
                    elif self.port is None:
                        self.port = int(address.rpartition(":")[2])
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"fpqmail-scand exited {self.process.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("fpqmail-scand did not start: " + self.log())
            time.sleep(0.02)

    def log(self):
        return self.stderr_path.read_text(errors="replace")

    def signal(self, signum):
        self.process.send_signal(signum)

    def wait_log(self, pattern, timeout=10, count=1):
        deadline = time.monotonic() + timeout
        while len(re.findall(pattern, self.log())) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not logged {count} times: {self.log()}")
            time.sleep(0.02)

    def stop(self, timeout=20):
        """SIGTERM and wait; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError("fpqmail-scand ignored SIGTERM: " + self.log())
        self.stderr.close()
        if self.socket_directory:
            shutil.rmtree(self.socket_directory, ignore_errors=True)
        return self.process.returncode


@pytest.fixture
def start_scand(tmp_path):
    """start_scand(tmpdir, **Scand options) -> a running Scand; each is stopped with
    SIGTERM after the test, and must then exit 0 without a traceback."""
    started = []

    def start(tmpdir, **options):
        root = tmp_path / f"scand{len(started)}"
        root.mkdir()
        daemon = Scand(root, tmpdir, **options)
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        assert daemon.stop() == 0, daemon.log()
        assert "Traceback" not in daemon.log(), daemon.log()


def connect(rig, daemon, tcp=False):
    """Point the rig's fp-qmail at the daemon: its unix socket (descriptors, nameless
    files), or with tcp its TCP port (named files in the rig's tmpdir)."""
    rig.env["FP_QMAIL_SCANNER"] = "127.0.0.1:%d" % daemon.port if tcp else daemon.address
    return daemon


# ---- the protocol over TCP: named files -------------------------------------------------

def spool(tmpdir, message, pid=None):
    """An fi file holding message and an empty fo, named as fp-qmail names them."""
    suffix = "%d.%s" % (pid or os.getpid(), os.urandom(8).hex())
    fi, fo = os.path.join(tmpdir, "fi" + suffix), os.path.join(tmpdir, "fo" + suffix)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    fd = os.open(fi, flags, 0o600)
    os.write(fd, message)
    os.close(fd)
    os.close(os.open(fo, flags, 0o600))
    return fi, fo


def request_bytes(fi, fo, size, envelope=ENVELOPE, headers=b""):
    return (b"FPQMAIL/1 SCAN\nIn: %s\nOut: %s\nSize: %d\nEnvelope: %d\n%s\n"
            % (fi.encode(), fo.encode(), size, len(envelope), headers) + envelope)


def read_all(sock):
    return b"".join(iter(lambda: sock.recv(65536), b""))


def exchange(port, data, timeout=30):
    """Send data on a fresh TCP connection, read the reply to end of stream."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return read_all(s)


def parse_reply(reply):
    """(status, {header: [values]}) of a reply, checking the framing."""
    assert reply.endswith(b"\n\n"), reply
    lines = reply[:-2].decode("ascii").split("\n")
    version, _, status = lines[0].partition(" ")
    assert version == "FPQMAIL/1", reply
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(": ")
        assert sep, reply
        headers.setdefault(name, []).append(value)
    return status, headers


def ask(port, fi, fo, size=None, envelope=ENVELOPE, headers=b""):
    size = os.path.getsize(fi) if size is None else size
    return parse_reply(exchange(port, request_bytes(fi, fo, size, envelope, headers)))


# ---- the protocol over a unix socket: descriptors -----------------------------------------

def unix_request(size, envelope=ENVELOPE, headers=b""):
    return b"FPQMAIL/1 SCAN\nSize: %d\nEnvelope: %d\n%s\n" % (size, len(envelope), headers) + envelope


class Files:
    """A nameless In holding message and an empty nameless Out, as fp-qmail makes them
    (O_TMPFILE in directory; memfd without one); `passed` are the descriptors to send:
    In read-only, Out write-only."""

    def __init__(self, message, directory=None):
        if directory:
            self.inp = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
            self.out = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
        else:
            self.inp, self.out = os.memfd_create("In"), os.memfd_create("Out")
        os.write(self.inp, message)
        self.passed = [os.open(f"/proc/self/fd/{self.inp}", os.O_RDONLY),
                       os.open(f"/proc/self/fd/{self.out}", os.O_WRONLY)]

    def delivered(self):
        return os.pread(self.out, os.fstat(self.out).st_size + 1, 0)

    def close(self):
        for fd in [self.inp, self.out] + self.passed:
            os.close(fd)


def send_with_fds(sock, data, fds):
    """data, the descriptors riding on its first byte."""
    sent = sock.sendmsg([data[:1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [])
    assert sent == 1
    sock.sendall(data[1:])


def ask_unix(path, message, envelope=ENVELOPE, headers=b"", size=None, files=None, timeout=30):
    """One SCAN over the unix socket with In and Out passed as descriptors:
    (status, headers, what Out holds)."""
    own = files is None
    files = files or Files(message)
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(path)
            send_with_fds(s, unix_request(len(message) if size is None else size, envelope, headers),
                          files.passed)
            status, fields = parse_reply(read_all(s))
        return status, fields, files.delivered()
    finally:
        if own:
            files.close()


def exchange_unix(path, data, fds=(), timeout=30):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        send_with_fds(s, data, list(fds))
        return read_all(s)


def open_descriptors():
    """The numbers of this process's open descriptors (to see none leak)."""
    return sorted(int(n) for n in os.listdir("/proc/self/fd"))


def daemon_descriptors(daemon):
    return len(os.listdir(f"/proc/{daemon.process.pid}/fd"))


# ---- an engine that takes its time ----------------------------------------------------------

class SlowEngine:
    """An engine for the daemon that speaks fpscand's protocol (`engines=(slow.spec,)`),
    takes `delay` seconds over each object and finds it clean. It notes when each
    object arrived (`arrivals`, time.monotonic()), so a test sees what the daemon still
    asks after a time limit. close() answers everything at once."""

    def __init__(self, delay):
        self.delay = delay
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.spec = "fpscand:127.0.0.1:%d" % self.sock.getsockname()[1]
        self.arrivals = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        # One connection per message: every object a SCAN STREAM, then QUIT.
        with conn, conn.makefile("rb") as f:
            while True:
                line = f.readline()
                if not line.startswith(b"SCAN STREAM "):
                    return  # QUIT, or the connection closed
                _, _, name, _, size = line.split()
                f.read(int(size))
                self.arrivals.append(time.monotonic())
                self._stop.wait(self.delay)
                try:
                    conn.sendall(b"0 <clean> %s\n" % name)
                except OSError:
                    return

    def close(self):
        self._stop.set()
        self.sock.close()


@pytest.fixture
def slow_engine():
    """slow_engine(delay) -> a running SlowEngine, closed after the test."""
    made = []

    def make(delay):
        made.append(SlowEngine(delay))
        return made[-1]
    yield make
    for engine in made:
        engine.close()
