"""fpqmail-scand as a real process for the tests, and a raw protocol client.

Scand starts `python -m fpqmail.scand` with a config file of its own on a free port
(--listen 127.0.0.1:0: the daemon logs the port it got), its stderr in a file the
tests read. spool() creates an fi/fo pair the way fp-qmail does; ask() speaks
docs/protocol.md over a real socket and returns the reply's status and headers.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


class Scand:
    def __init__(self, root, tmpdir, engines=("builtin",), quarantine=None, config=None, args=(),
                 listen="127.0.0.1:0"):
        self.root = Path(root)
        self.tmpdir = Path(tmpdir)
        self.quarantine = quarantine
        self.config = self.root / "scand.conf"
        self.stderr_path = self.root / "scand.stderr"
        self.write_config(config or {})
        self.command = [sys.executable, "-m", "fpqmail.scand", "--config", str(self.config),
                        "--listen", listen, "--tmpdir", str(self.tmpdir)]
        for spec in engines:
            self.command += ["--engine", spec]
        if quarantine:
            self.command += ["--quarantine", str(quarantine)]
        self.command += list(args)
        self.process = None
        self.address = None  # as fp-qmail's FP_QMAIL_SCANNER names it
        self.port = None

    def write_config(self, values):
        text = "".join(f"{k}='{v}'\n" for k, v in values.items())
        self.config.write_text(text)

    def start(self, timeout=30):
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.stderr = open(self.stderr_path, "ab")
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=self.stderr, env=env, cwd=str(self.root))
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(r"listening on (\S+) with", self.log())
            if m:
                self.address = m.group(1)
                if not self.address.startswith("/"):
                    self.port = int(self.address.rpartition(":")[2])
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
        return self.process.returncode


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


def request_bytes(fi, fo, size, envelope=b"Falice@example.org\0Tbob@example.net\0\0"):
    return (b"FPQMAIL/1 SCAN\nIn: %s\nOut: %s\nSize: %d\nEnvelope: %d\n\n"
            % (fi.encode(), fo.encode(), size, len(envelope)) + envelope)


def exchange(port, data, timeout=30):
    """Send data on a fresh connection, read the reply to end of stream."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        reply = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return reply
            reply += chunk


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


def ask(port, fi, fo, size=None, envelope=b"Falice@example.org\0Tbob@example.net\0\0"):
    size = os.path.getsize(fi) if size is None else size
    return parse_reply(exchange(port, request_bytes(fi, fo, size, envelope)))


@pytest.fixture
def start_scand(tmp_path):
    """start_scand(tmpdir, **Scand options) -> a running Scand; each is stopped with
    SIGTERM after the test, and must then exit 0."""
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
