"""One message through one variant, the way qmail runs its queue program: the message
on a pipe at fd 0 (written while the program runs), the envelope on a pipe at fd 1.

bench/measure.c forks and execs the program and reports its wall time, CPU time, peak
RSS and minor page faults, which add up over the exec into qmail-queue.orig (ru_maxrss
keeps the highest of the two images); measure.c's own start is not counted.
"""
import base64
import os
import threading
from dataclasses import dataclass

PIPE_BUFFER = 65536
REPORT_FD = 3


@dataclass
class Sample:
    seconds: float
    cpu_seconds: float | None = None
    max_rss_kb: int | None = None
    page_faults: int | None = None


class RunFailed(Exception):
    pass


def _feed(fd, data):
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BrokenPipeError:
        pass  # the program failed early; its exit status says why
    finally:
        os.close(fd)


def run_program(measure, argv, env, message, envelope):
    msg_r, msg_w = os.pipe()
    env_r, env_w = os.pipe()
    report_r, report_w = os.pipe()
    os.write(env_w, envelope)
    os.close(env_w)
    actions = [(os.POSIX_SPAWN_DUP2, msg_r, 0), (os.POSIX_SPAWN_DUP2, env_r, 1),
               (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0),
               (os.POSIX_SPAWN_DUP2, report_w, REPORT_FD)]
    pid = os.posix_spawn(measure, [measure, str(REPORT_FD)] + argv, env, file_actions=actions)
    for fd in (msg_r, env_r, report_w):
        os.close(fd)
    writer = None
    if len(message) < PIPE_BUFFER:
        _feed(msg_w, message)
    else:
        writer = threading.Thread(target=_feed, args=(msg_w, message))
        writer.start()
    with os.fdopen(report_r, "rb") as f:
        figures = f.read().split()
    _, status = os.waitpid(pid, 0)
    if writer:
        writer.join()
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or len(figures) != 4:
        raise RunFailed("%s exited %d" % (" ".join(argv), code))
    wall_ns, cpu_us, rss_kb, faults = map(int, figures)
    return Sample(wall_ns / 1e9, cpu_us / 1e6, rss_kb, faults)


class Messages:
    """Unique mail of a given size: a text part and a base64 attachment of fresh random
    bytes, so clamd decodes and scans real content and can answer nothing from its
    cache (it caches verdicts by content)."""

    serial = 0

    def make(self, size):
        self.serial += 1
        head = (b"Received: (qmail %d invoked by uid 0); 25 Nov 2026 00:00:00 -0000\n"
                b"From: bench@example.org\nTo: rcpt@example.net\nSubject: bench message %d\n"
                b"Message-ID: <%d.%s@bench.example.org>\nMIME-Version: 1.0\n"
                b"Content-Type: multipart/mixed; boundary=\"b\"\n\n"
                b"--b\nContent-Type: text/plain\n\nThe attachment, as promised.\n\n"
                b"--b\nContent-Type: application/octet-stream; name=\"data.bin\"\n"
                b"Content-Transfer-Encoding: base64\n\n"
                % (os.getpid(), self.serial, self.serial, os.urandom(8).hex().encode()))
        tail = b"\n--b--\n"
        room = max(0, size - len(head) - len(tail))
        attachment = base64.encodebytes(os.urandom(room * 3 // 4 + 3))[:room]
        return head + attachment + tail


ENVELOPE = b"Fbench@example.org\0Trcpt@example.net\0\0"
