"""The scanners the benchmarks run fp-qmail against, each a real process on 127.0.0.1:
the instant-clean responder, fpqmail-scand with its builtin engine, and fpqmail-scand
with a private clamd (tests/clamd_fixtures.py: Debian's clamd, a tiny database of
its own). Each is a context manager yielding the FP_QMAIL_SCANNER address.
"""
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
import clamd_fixtures  # noqa: E402  (the tests' private clamd)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, process, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("%s exited %d" % (process.args, process.returncode))
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise RuntimeError("%s does not listen on %d" % (process.args, port))


@contextlib.contextmanager
def serving(argv, port, env=None):
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=env, cwd=REPO)
    try:
        wait_listening(port, process)
        yield "127.0.0.1:%d" % port
    finally:
        process.terminate()
        process.wait(10)


def responder(spool):
    port = free_port()
    return serving([sys.executable, str(REPO / "bench" / "responder.py"), "127.0.0.1:%d" % port], port)


def scand(spool, engine):
    port = free_port()
    empty_config = Path(spool).parent / "empty.conf"
    empty_config.touch()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return serving([sys.executable, "-m", "fpqmail.scand", "--config", str(empty_config),
                    "--listen", "127.0.0.1:%d" % port, "--engine", engine, "--tmpdir", str(spool)],
                   port, env)


def scand_builtin(spool):
    return scand(spool, "builtin")


@contextlib.contextmanager
def running_clamd(directory):
    # The benchmark sends up to 10 MB through INSTREAM; the tests' limit is 2 MB.
    clamd_fixtures.STREAM_MAX = 64 << 20
    instance = clamd_fixtures.Clamd(str(directory))
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()


@contextlib.contextmanager
def scand_clamd(spool, clamd):
    with scand(spool, clamd.unix_spec) as address:
        yield address


def clamd_instream(unix_socket, data):
    """clamd's own time for these bytes: one INSTREAM over its unix socket."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(unix_socket)
        s.sendall(b"zINSTREAM\0")
        view = memoryview(data)
        for start in range(0, len(data), 1 << 20):
            chunk = view[start:start + (1 << 20)]
            s.sendall(len(chunk).to_bytes(4, "big"))
            s.sendall(chunk)
        s.sendall(b"\0\0\0\0")
        reply = b""
        while not reply.endswith(b"\0"):
            part = s.recv(4096)
            if not part:
                break
            reply += part
    if reply != b"stream: OK\0":
        raise RuntimeError("clamd INSTREAM: %r" % reply)
