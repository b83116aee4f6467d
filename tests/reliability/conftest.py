"""Fixtures of the reliability suite. The lead's `rig` (tests/conftest.py) runs fp-qmail;
the daemon and clamd come from their plugins (scand_fixtures, clamd_fixtures).
What is added here: real broken peers (raw sockets), tmpfs mounts, a copy of the
binary and the stand-in that other users can run, and the summary table (summary.py).
"""
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import BINARY, TESTS, UNDER_TEST, Rig, private_mounts, standin_executable

from . import summary

SYSTEM_PYTHON = "/usr/bin/python3.11"  # readable by every user, unlike pyenv's under /root
OWNER = "fpqowner"                     # the test's qmailq: owner of the setuid binary
CALLER = "nobody"


def pytest_configure(config):
    summary.pytest_configure(config)


# ---- broken peers ----------------------------------------------------------------------

class RawListener:
    """A TCP listener on 127.0.0.1 that misbehaves below the protocol:
    `never_accept` (connections wait in the backlog), `hold` (accepts, reads, never
    answers), `reset` (accepts and resets the connection at once, unread)."""

    def __init__(self, mode, backlog=16):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        self.address = "127.0.0.1:%d" % self.port
        self.accepted = []
        self.received = []  # per accepted connection, what it sent (mode hold)
        self.mode = mode
        if mode != "never_accept":
            threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)
            if self.mode == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
            else:
                self.received.append(bytearray())
                threading.Thread(target=self._read, args=(conn, self.received[-1]), daemon=True).start()

    @staticmethod
    def _read(conn, into):
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            into += data

    def close(self):
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def raw_listener():
    made = []

    def make(mode, **kw):
        made.append(RawListener(mode, **kw))
        return made[-1]
    yield make
    for listener in made:
        listener.close()


# ---- file systems ------------------------------------------------------------------------

@pytest.fixture
def tmpfs():
    """tmpfs(path, options) mounts a tmpfs (e.g. "size=1m", "ro") on path, for the test."""
    mounted = []

    def mount(path, options):
        path.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "fpq-reliability", str(path)], check=True)
        mounted.append(path)
        return path
    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", str(path)], check=True)


# ---- runs as other users -------------------------------------------------------------------

@pytest.fixture(scope="session")
def installed():
    """The dist folder and the stand-in copied into a root-owned 0755 directory (the
    repository may sit where other users cannot read): returns (root, binary) where
    binary is what FPQMAIL_UNDER_TEST names (for module mode: None)."""
    if os.geteuid() != 0:
        raise RuntimeError("the reliability suite installs binaries and mounts: run it as root")
    root = Path(tempfile.mkdtemp(prefix="fpq-reliability-", dir="/var/tmp"))
    root.chmod(0o755)
    binary = None
    if UNDER_TEST == "binary":
        shutil.copytree(BINARY.parent, root / "dist")
        binary = root / "dist" / BINARY.name
    shutil.copy(TESTS / "qmail_queue_standin.py", root / "qmail_queue_standin.py")
    yield root, binary
    shutil.rmtree(root)


def open_rig(installed_root, directory):
    """A Rig whose directories every user may use (tmpdir and queue 1777, like /tmp),
    with a stand-in any user can run; fp-qmail run as a given user."""
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    rig = Rig(directory)
    for d in (rig.tmpdir, rig.queue_dir):
        d.chmod(0o1777)
    queue = standin_executable(directory, python=SYSTEM_PYTHON)
    queue.write_text(queue.read_text().replace(str(TESTS / "qmail_queue_standin.py"),
                                               str(installed_root / "qmail_queue_standin.py")))
    rig.queue = queue
    rig.env["FP_QMAIL_QUEUE"] = str(queue)
    return rig


@pytest.fixture
def world_rig(installed):
    """Like `rig`, in a directory other users can reach; `command` runs the installed copy."""
    root, binary = installed
    directory = Path(tempfile.mkdtemp(prefix="rig-", dir=root))
    directory.rmdir()
    rig = open_rig(root, directory)
    rig.command = [str(binary)] if binary else [SYSTEM_PYTHON, "-m", "fpqmail"]
    if not binary:
        rig.env["PYTHONPATH"] = str(TESTS.parent)
    yield rig
    rig.close()
    left = rig.leftovers()
    shutil.rmtree(directory)
    assert left == [], "files left in tmpdir: %r" % left


# ---- syslog ---------------------------------------------------------------------------------

class SyslogCapture:
    """What a program sends to /dev/log, captured without touching the machine's /dev:
    the socket lives in the test's directory, and `enter` (a preexec function) gives the
    child a /dev of its own whose log is a link to it. (fp-qmail logs to syslog only,
    unless FP_QMAIL_LOG_STDERR=yes.)"""
    MAIL_ERR = 2 * 8 + 3       # facility mail, priority err
    MAIL_WARNING = 2 * 8 + 4
    MAIL_INFO = 2 * 8 + 6

    def __init__(self, directory):
        self.path = directory / "log"
        self.layer = directory / "dev-layer"
        self.layer.mkdir(mode=0o755)
        self.layer.chmod(0o755)  # the overlay's root takes the layer's mode: /dev's
        (self.layer / "log").symlink_to(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        os.chmod(self.path, 0o666)
        self.lines = []
        threading.Thread(target=self._read, daemon=True).start()

    def enter(self):
        private_mounts([(self.layer, "/dev")])

    def _read(self):
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            self.lines.append(data.decode("utf-8", "replace"))

    def wait_for(self, text, priority=None, timeout=10):
        """The first line holding text (sent with this priority): fails after timeout."""
        prefix = "<%d>" % priority if priority is not None else "<"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line and line.startswith(prefix):
                    return line
            time.sleep(0.01)
        raise AssertionError("no syslog line %s...%r in %r" % (prefix, text, self.lines))

    def close(self):
        self.sock.close()


@pytest.fixture
def syslog(tmp_path):
    """A /dev/log of the test's own: pass syslog.enter as the run's preexec."""
    capture = SyslogCapture(tmp_path)
    yield capture
    capture.close()


# ---- names fp-qmail will draw, known in advance ------------------------------------------

def predictable_names(rig, program, strace_user=None, spool=None, preexec=None):
    """A command running fp-qmail (program: its argv) with the names it will draw known
    in advance, so that a test can plant things exactly there. It runs in a fresh PID
    namespace (its pid is the same on every run) with /dev/urandom bound to a file of
    distinct 8-byte blocks and getrandom() failing with ENOSYS (strace), so that Python
    reads its randomness from that file, in order. A dry run, killed once its first pair
    exists in spool (default: a scratch tmpdir it is given), shows the pid and the first
    block used; the names that follow are the next blocks. strace_user: strace -u (runs
    a setuid program as that user with its setuid bit honoured). preexec: for the dry
    run, what the real run will do before the command (a private /etc).
    Returns (command, the first 16 <pid>.<random> suffixes)."""
    blocks = [(0xF0F0000000000000 + k).to_bytes(8, "big") for k in range(4096)]
    fake = rig.root / "urandom"
    fake.write_bytes(b"".join(blocks))
    fake.chmod(0o644)
    script = ('mount --bind "$0" /dev/urandom && exec strace -qq -o /dev/null -e trace=getrandom '
              '-e inject=getrandom:error=ENOSYS "$@"')
    command = ["unshare", "--pid", "--mount", "--fork", "--kill-child", "sh", "-c", script, str(fake)]
    command += (["-u", strace_user] if strace_user else []) + list(program)
    env = {}
    if spool is None:
        spool = rig.root / "dry-run"
        spool.mkdir()
        env["FP_QMAIL_TMPDIR"] = str(spool)
    killed = []

    def message():
        yield b"Subject: dry run\n\n"
        deadline = time.monotonic() + 20
        while not killed and time.monotonic() < deadline:
            time.sleep(0.01)

    def kill_once_spooled(proc):
        deadline = time.monotonic() + 20
        while len(list(spool.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.kill()  # unshare --kill-child: the whole namespace dies, fp-qmail with it
        while not dead(proc):
            time.sleep(0.01)
        killed.append(True)

    rig.run(command=command, message=message(), env=env, after_start=kill_once_spooled, preexec=preexec)
    spooled = sorted(p.name for p in spool.iterdir())
    assert [n[:2] for n in spooled] == ["fi", "fo"], spooled
    for name in spooled:
        (spool / name).unlink()
    if "FP_QMAIL_TMPDIR" in env:
        spool.rmdir()
    pid, _, suffix = spooled[0][2:].partition(".")
    k = blocks.index(bytes.fromhex(suffix))
    return command, ["%s.%s" % (pid, b.hex()) for b in blocks[k:k + 16]]


def dead(proc):
    """Whether proc has exited (a zombie), without reaping it: the rig waits for it."""
    try:
        with open("/proc/%d/stat" % proc.pid) as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def remove_all(directory):
    for p in directory.iterdir():
        p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
