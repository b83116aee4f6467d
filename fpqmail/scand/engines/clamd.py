"""ClamAV's clamd, spoken with the stdlib.

All objects of one message go on one connection, in a session (IDSESSION ... END), one
command after the other. Over a unix socket every object is passed as a descriptor
(FILDES: clamd reads the file itself, and its StreamMaxLength does not apply): a
decoded part that lives in a memfd as it is, any other object copied into one. Over
TCP every object is streamed (INSTREAM). Several endpoints fail over in the order given.
"""

import fcntl
import os
import socket
import stat
import struct

from fpqmail import values

from . import Engine, EngineError
from .endpoints import Endpoints
from .. import deadline as time_limit
from ..settings import number

CHUNK = 256 * 1024
MAX_REPLY = 64 * 1024


class ClamdEngine(Engine):
    name = "clamd"

    def __init__(self, endpoints, settings):
        whole = settings.get("FP_SCAND_CLAMD_WHOLE_MESSAGE", "").strip() or "no"
        try:
            self.whole_message = values.flag(whole)
        except ValueError as e:
            raise ValueError(f"FP_SCAND_CLAMD_WHOLE_MESSAGE={values.printable(whole, 100)!r}: {e}") from None
        self._endpoints = Endpoints(
            "clamd", endpoints,
            connect_timeout=number(settings, "FP_SCAND_CLAMD_CONNECT_TIMEOUT", 0.001, 86400, default=5.0),
            timeout=number(settings, "FP_SCAND_CLAMD_TIMEOUT", 0.001, 86400, default=60.0))

    def scan_objects(self, objects, deadline=None):
        if not objects:
            return []
        return self._endpoints.ask(lambda sock, unix: _Session(sock, unix, deadline).scan(objects), deadline)

    def ping(self):
        self._endpoints.ask(_ping_on)

    def reload(self):
        pass  # clamd watches and reloads its own database


class _Session:
    """One IDSESSION on a connected socket (whose every wait Endpoints bounds by the
    engine's timeout and the request's deadline); commands in lock-step (the reply to
    one is read before the next is sent), so that clamd never holds more than one of
    ours."""

    def __init__(self, sock, unix, deadline):
        self._sock = sock
        self._unix = unix
        self._deadline = deadline
        self._replies = b""

    def scan(self, objects):
        self.send(b"zIDSESSION\0")
        verdicts = []
        for command, obj in enumerate(objects, 1):
            time_limit.check(self._deadline)
            verdicts.append(self._one(command, obj))
        self.send(b"zEND\0")
        return verdicts

    def _one(self, command, obj):
        if self._unix:
            self._fildes(obj)
        else:
            self.send(b"zINSTREAM\0")
            try:
                with memoryview(obj.data) as view:
                    for pos in range(0, len(view), CHUNK):
                        with view[pos:pos + CHUNK] as chunk:
                            self.send(struct.pack(">I", len(chunk)))
                            self.send(chunk)
                self.send(struct.pack(">I", 0))
            except (BrokenPipeError, ConnectionResetError):
                pass  # clamd stopped reading (size limit): its reply says why
        tag, _, reply = self.reply().partition(": ")
        if tag != str(command):
            raise EngineError(f"reply to command {command} in a session: {tag}: {reply}"[:300])
        return parse_verdict(reply)

    def _fildes(self, obj):
        """FILDES with the object's own file, else with a memfd holding a copy (clamd
        reads a file whatever its size; a stream meets its StreamMaxLength)."""
        if obj.fd is not None and _is_readable_file(obj.fd):
            self.send(b"zFILDES\0")
            socket.send_fds(self._sock, [b"\0"], [obj.fd])
            return
        fd = os.memfd_create("fpqmail-clamd", os.MFD_CLOEXEC)
        try:
            with memoryview(obj.data) as view:
                for pos in range(0, len(view), CHUNK):
                    time_limit.check(self._deadline)
                    with view[pos:pos + CHUNK] as chunk:
                        while len(chunk):
                            chunk = chunk[os.write(fd, chunk):]
            self.send(b"zFILDES\0")
            socket.send_fds(self._sock, [b"\0"], [fd])
        finally:
            os.close(fd)

    def send(self, data):
        self._sock.sendall(data)

    def reply(self):
        """The next \\0-terminated reply (or whatever came before clamd closed)."""
        while b"\0" not in self._replies:
            try:
                more = self._sock.recv(4096)
            except ConnectionResetError:
                more = b""
            if not more:
                if not self._replies:
                    raise EngineError("connection closed without a reply")
                break
            self._replies += more
            if len(self._replies) > MAX_REPLY:
                raise EngineError("reply too long")
        reply, _, self._replies = self._replies.partition(b"\0")
        return reply.decode("ascii", "replace").strip()


def parse_verdict(reply):
    """clamd's reply to one scan -> threat names; EngineError for anything but a verdict."""
    if reply.endswith(" FOUND"):
        # "stream: Eicar-Signature.UNOFFICIAL FOUND", "fd[7]: Win.Test.EICAR_HDB-1 FOUND"
        name = reply[: -len(" FOUND")].partition(": ")[2].strip()
        if name:
            return [name]
    elif reply.endswith(": OK"):
        return []
    raise EngineError(reply or "empty reply")


def _ping_on(sock, unix):
    session = _Session(sock, unix, None)
    session.send(b"zPING\0")
    reply = session.reply()
    if reply != "PONG":
        raise EngineError(f"PING answered {reply!r}")


def _is_readable_file(fd):
    # clamd answers OK for a descriptor opened write-only and an error for a pipe:
    # FILDES only with a readable regular file, else the bytes are streamed.
    try:
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        return mode != os.O_WRONLY and stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False
