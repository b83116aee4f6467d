"""A stand-in for qmail-queue.orig: qmail itself cannot be installed here.

It enforces qmail-queue's contract as strictly as notqmail's qmail-queue.c does
(../shared/reference/qmail-queue.md): it reads the message on fd 0 to end of file,
then the envelope on fd 1 byte by byte with the same checks in the same order
(first byte not F or a recipient not T: 91; an address of 1003 bytes or more: 11;
end of file before the final NUL: 54; a read error: 54), and exits 0 only when all
of it was read. It then records exactly what it received, atomically, in
$QQ_STANDIN_DIR/<n>.msg, <n>.env and <n>.json (descriptors open at exec, signal
ignored and blocked signals, uids), so tests can compare bytes.

Fault injection, for the tests that need qmail-queue.orig to fail:
QQ_STANDIN_EXIT=<n> exits n after reading (nothing recorded), QQ_STANDIN_SIGNAL=<n>
kills itself with signal n, QQ_STANDIN_HANG=1 sleeps after reading.
"""
import json
import os
import signal
import sys
import time

ADDR = 1003


partial = None  # the message being recorded: never left behind


def die(code):
    if partial:
        os.unlink(partial)
    os._exit(code)


def read_envelope(fd):
    data = bytearray()
    buf = b""

    def get():
        nonlocal buf
        if not buf:
            try:
                buf = os.read(fd, 4096)
            except OSError:
                die(54)
            if not buf:
                die(54)
        ch, buf = buf[0], buf[1:]
        data.append(ch)
        return ch

    def address():  # qmail-queue.c: at most ADDR - 1 bytes, then its NUL
        for length in range(ADDR + 1):
            if length == ADDR:
                die(11)
            if get() == 0:
                return

    if get() != ord("F"):
        die(91)
    address()
    while True:
        ch = get()
        if ch == 0:
            return bytes(data)
        if ch != ord("T"):
            die(91)
        address()


def offset(fd):
    """Where fd stands (None for a pipe: qmail-smtpd's own way of calling)."""
    try:
        return os.lseek(fd, 0, os.SEEK_CUR)
    except OSError:
        return None


def signals(mask):
    """The signal numbers of a /proc/<pid>/status mask."""
    return [n for n in range(1, 65) if int(mask, 16) >> (n - 1) & 1]


def main():
    global partial
    state = {
        "fds": sorted(int(n) for n in os.listdir("/proc/self/fd")),
        # the signals ignored at exec, as the wrapping sh saw them (Python ignores some itself)
        "ignored_signals": signals(os.environ["QQ_SIGIGN"]),
        "blocked_signals": signals(os.environ.get("QQ_SIGBLK", "0")),
        "uid": os.getuid(), "euid": os.geteuid(), "cwd": os.getcwd(),
        "fd0_offset": offset(0),
        "alarm_pending": signal.alarm(0),  # an alarm fp-qmail forgot survives the exec
    }
    outdir = os.environ["QQ_STANDIN_DIR"]
    name = "%d-%d" % (time.time_ns(), os.getpid())
    partial = os.path.join(outdir, "." + name + ".msg")
    # Streamed through one buffer: tests send 100 MB messages and measure peak memory.
    buf = bytearray(1 << 16)
    view = memoryview(buf)
    out = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    while True:
        try:
            n = os.readv(0, [buf])
        except OSError:
            die(54)
        if not n:
            break
        done = 0
        while done < n:
            done += os.write(out, view[done:n])
    os.close(out)
    envelope = read_envelope(1)
    if os.environ.get("QQ_STANDIN_HANG"):
        time.sleep(3600)
    if os.environ.get("QQ_STANDIN_SIGNAL"):
        os.unlink(partial)
        os.kill(os.getpid(), int(os.environ["QQ_STANDIN_SIGNAL"]))
    if os.environ.get("QQ_STANDIN_EXIT"):
        die(int(os.environ["QQ_STANDIN_EXIT"]))
    for suffix, data in ((".env", envelope), (".json", json.dumps(state).encode())):
        tmp = os.path.join(outdir, "." + name + suffix)
        with open(tmp, "wb") as f:
            f.write(data)
        os.rename(tmp, os.path.join(outdir, name + suffix))
    os.rename(partial, os.path.join(outdir, name + ".msg"))
    partial = None
    die(0)


if __name__ == "__main__":
    sys.exit(main())
