"""Run fp-qmail the way qmail does: a real process, the message on a pipe at fd 0, the
envelope on a pipe at fd 1 (read side), optionally a pipe at fd 6 for the custom
error text, and a stand-in qmail-queue.orig that records what it received.

FPQMAIL_UNDER_TEST picks what is run: `module` (default: python -m fpqmail) or
`binary` (the Nuitka build, FPQMAIL_BINARY, default build/fp-qmail.dist/fp-qmail).
"""
import ctypes
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from scanner_double import ScannerDouble

# Fixtures shared by every test module (the daemon, a private clamd: one per session).
pytest_plugins = ("scand_fixtures", "clamd_fixtures")

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
UNDER_TEST = os.environ.get("FPQMAIL_UNDER_TEST", "module")
BINARY = Path(os.environ.get("FPQMAIL_BINARY", REPO / "build" / "fp-qmail.dist" / "fp-qmail"))


def fp_qmail_command():
    if UNDER_TEST == "binary":
        if not BINARY.exists():
            raise RuntimeError("FPQMAIL_UNDER_TEST=binary but %s is missing: run make build" % BINARY)
        return [str(BINARY)]
    if UNDER_TEST != "module":
        raise RuntimeError("FPQMAIL_UNDER_TEST must be module or binary")
    return [sys.executable, "-m", "fpqmail"]


def base_environment():
    """What every run gets: a minimal environment, logs copied to stderr at debug."""
    env = {"PATH": "/usr/bin:/bin", "FP_QMAIL_LOGLEVEL": "7", "FP_QMAIL_LOG_STDERR": "yes"}
    if UNDER_TEST == "module":
        env["PYTHONPATH"] = str(REPO)
    return env


def envelope(sender=b"alice@example.org", *recipients):
    recipients = recipients or (b"bob@example.net",)
    return b"F" + sender + b"\0" + b"".join(b"T" + r + b"\0" for r in recipients) + b"\0"


def free_port():
    """A TCP port of 127.0.0.1 that nothing listens on (for 'scanner not listening')."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_user(name):
    """A system user for the setuid tests (they run as root, as CI does)."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                       check=True)
        return pwd.getpwnam(name)


def become(user):
    """A preexec function: the child drops to user (real and effective ids)."""
    account = pwd.getpwnam(user)

    def drop():
        os.setgroups([])
        os.setgid(account.pw_gid)
        os.setuid(account.pw_uid)
    return drop


_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, MS_RDONLY, MS_REC, MS_PRIVATE = 0x00020000, 1, 0x4000, 1 << 18


def private_mounts(overlays, hidden=()):
    """In a child before its exec (a preexec function's work, as root): a mount namespace
    of its own where each (layer, directory) of overlays shows layer's files over
    directory (a read-only overlay), and each existing directory of hidden is empty."""
    calls = [(_libc.unshare, (CLONE_NEWNS,)), (_libc.mount, (b"none", b"/", None, MS_REC | MS_PRIVATE, None))]
    for layer, directory in overlays:
        calls.append((_libc.mount, (b"fpq-overlay", directory.encode(), b"overlay", 0,
                                    b"lowerdir=%s:%s" % (bytes(Path(layer)), directory.encode()))))
    for directory in hidden:
        if os.path.isdir(directory):
            calls.append((_libc.mount, (b"fpq-hidden", directory.encode(), b"tmpfs", MS_RDONLY, None)))
    for call, args in calls:
        if call(*args) != 0:
            err = ctypes.get_errno()
            raise OSError(err, "private mounts: " + os.strerror(err))


class PrivateEtc:
    """/etc as one run sees it, the real one untouched (others run tests on this machine
    too): files put here show through /etc in a private mount namespace of that run, a
    read-only overlay of this layer on the real /etc. Needs root."""

    def __init__(self, root):
        self.layer = Path(root) / "etc-layer"
        self.layer.mkdir(mode=0o755)
        self.layer.chmod(0o755)  # the overlay's root takes the layer's mode: /etc's

    def put(self, path, text, mode=0o644, uid=0, gid=0):
        """/etc/<path> holds text (str or bytes), with this mode and owner."""
        target = self.layer / path
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        target.write_bytes(text.encode() if isinstance(text, str) else text)
        os.chown(target, uid, gid)
        target.chmod(mode)
        return target

    def hide(self, path):
        """/etc/<path> does not exist (an overlay whiteout)."""
        target = self.layer / path
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(0, 0))

    def enter(self):
        """A preexec function (root, in the child before its exec): a private mount
        namespace where /etc is this layer over the real /etc, and what the machine may
        have at the default paths (its qmail, a running daemon's socket) is out of sight."""
        private_mounts([(self.layer, "/etc")], hidden=("/var/qmail", "/run/fpqmail-scand"))


def then(*steps):
    """One preexec function doing each of steps in order (None steps are skipped)."""
    def run():
        for step in steps:
            if step:
                step()
    return run


def install_setuid_binary(directory, owner):
    """A copy of the binary's dist folder in directory (root-owned), the binary setuid to
    owner, mode 4711, as the seed installs it for qmailq. Returns its path."""
    dist = Path(directory) / "dist"
    shutil.copytree(BINARY.parent, dist)
    binary = dist / BINARY.name
    os.chown(binary, owner.pw_uid, owner.pw_gid)
    binary.chmod(0o4711)
    return binary


MESSAGE = (b"Received: from mx.example.org by example.net\n"
           b"From: alice@example.org\nTo: bob@example.net\nSubject: hello\n\n"
           b"Hello Bob,\n\xe9t\xe9 8-bit and a NUL \0 byte.\n")


class Result:
    def __init__(self, code, stderr, fd6_text, delivered):
        self.code = code
        self.stderr = stderr
        self.fd6_text = fd6_text
        self.delivered = delivered  # [(message, envelope, state)] recorded by the stand-in

    def __repr__(self):
        return "Result(code=%r, fd6=%r, delivered=%d, stderr=%r)" % (
            self.code, self.fd6_text, len(self.delivered), self.stderr[-2000:])


def standin_executable(directory, python=sys.executable):
    """The stand-in, behind a sh that notes which signals it inherited as ignored and as
    blocked (Python would ignore SIGPIPE itself before the stand-in could look). `sh -p`
    keeps the effective uid a setuid fp-qmail passes on, as the real (C) qmail-queue would."""
    path = Path(directory) / "qmail-queue.orig"
    path.write_text('#!/bin/sh -p\nQQ_SIGIGN=$(sed -n "s/^SigIgn:\\t//p" /proc/$$/status) '
                    'QQ_SIGBLK=$(sed -n "s/^SigBlk:\\t//p" /proc/$$/status) exec %s -S %s\n'
                    % (python, TESTS / "qmail_queue_standin.py"))
    path.chmod(0o755)
    return path


def read_deliveries(directory):
    import json
    out = []
    for msg in sorted(Path(directory).glob("[!.]*.msg")):  # not the stand-in's partial one
        base = msg.with_suffix("")
        out.append((msg.read_bytes(), base.with_suffix(".env").read_bytes(),
                    json.loads(base.with_suffix(".json").read_text())))
    return out


class Rig:
    """One test's world: a temp dir for fp-qmail, a stand-in queue, a scanner double."""

    def __init__(self, root):
        self.root = Path(root)
        self.tmpdir = self.root / "tmp"
        self.queue_dir = self.root / "queue"
        self.tmpdir.mkdir()
        self.queue_dir.mkdir()
        self.queue = standin_executable(self.root)
        self.scanner = None
        self.env = base_environment()
        # No scanner until scan_with names one: never the machine's (the default socket).
        self.env.update({"FP_QMAIL_TMPDIR": str(self.tmpdir), "FP_QMAIL_QUEUE": str(self.queue),
                         "QQ_STANDIN_DIR": str(self.queue_dir),
                         "FP_QMAIL_SCANNER": str(self.root / "no-scanner.sock")})

    def scan_with(self, behaviour, **kw):
        if self.scanner:
            self.scanner.close()
        self.scanner = ScannerDouble(behaviour, **kw)
        self.env["FP_QMAIL_SCANNER"] = self.scanner.address
        return self.scanner

    def run(self, message=MESSAGE, env_bytes=None, fd6=False, env=None, timeout=60,
            preexec=None, stdin=None, command=None, after_start=None, measure_rss=False):
        """Run fp-qmail once; message may be bytes or an iterable of chunks.

        measure_rss: run it under GNU time, whose %M is the peak RSS of fp-qmail and,
        after its exec, of qmail-queue.orig. (A child forked from pytest itself would
        report pytest's own peak: fork copies the parent's high-water mark.)"""
        command = command or fp_qmail_command()
        rss_file = self.root / "maxrss"
        if measure_rss:
            command = ["/usr/bin/time", "-q", "-f", "%M", "-o", str(rss_file)] + command
        environment = dict(self.env)
        environment.update(env or {})
        environment = {k: v for k, v in environment.items() if v is not None}
        env_r, env_w = os.pipe()
        fd6_r = fd6_w = None
        if fd6:
            fd6_r, fd6_w = os.pipe()

        def child_setup():
            if fd6_w is not None:
                os.dup2(fd6_w, 6)
            if preexec:
                preexec()

        proc = subprocess.Popen(
            command, stdin=subprocess.PIPE if stdin is None else stdin,
            stdout=env_r, stderr=subprocess.PIPE, env=environment, cwd=str(self.root),
            preexec_fn=child_setup, close_fds=False)  # else fd 6, made in child_setup, is closed
        os.close(env_r)
        if fd6_w is not None:
            os.close(fd6_w)
        stderr = []
        fd6_text = []
        readers = [threading.Thread(target=lambda: stderr.append(proc.stderr.read()))]
        if fd6_r is not None:
            readers.append(threading.Thread(target=lambda: fd6_text.append(os.read(fd6_r, 4096))))
        for t in readers:
            t.start()

        def feed():
            try:
                if proc.stdin:
                    chunks = [message] if isinstance(message, bytes) else message
                    for chunk in chunks:
                        proc.stdin.write(chunk)
                    proc.stdin.close()
                os.write(env_w, env_bytes if env_bytes is not None else envelope())
            except (BrokenPipeError, OSError):
                pass
            finally:
                os.close(env_w)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        try:
            if after_start:
                after_start(proc)
            code = proc.wait(timeout)
        except BaseException:  # a timeout, or a failure of after_start: never leave it running
            proc.kill()
            proc.wait()
            raise
        finally:
            for t in readers:
                t.join(10)
            if fd6_r is not None:
                os.close(fd6_r)
        result = Result(code, b"".join(stderr).decode("utf-8", "replace"),
                        b"".join(fd6_text) if fd6 else None, read_deliveries(self.queue_dir))
        if measure_rss:
            result.maxrss_kb = int(rss_file.read_text().split()[-1])
            rss_file.unlink()
        return result

    def leftovers(self):
        return sorted(p.name for p in self.tmpdir.iterdir())

    def close(self):
        if self.scanner:
            self.scanner.close()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()
    # Non-negotiable 2: whatever the test did, fp-qmail left nothing in its tmpdir.
    assert r.leftovers() == [], "files left in tmpdir: %r" % r.leftovers()
    if r.scanner:
        assert r.scanner.violations == [], r.scanner.violations
