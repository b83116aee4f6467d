"""ClamAV's clamd, spoken with the stdlib.

Over a unix socket a message is passed as a descriptor (FILDES: clamd reads the file
itself, nothing is copied); over TCP, or for a decoded part that exists only in memory,
it is streamed (INSTREAM). Several endpoints fail over in the order given. clamd decodes
whole mails itself, so examine() sends it a clean message only once.
"""

import fcntl
import os
import socket
import stat
import struct

from . import Engine, EngineError
from .endpoints import Endpoints
from ..settings import number

CHUNK = 256 * 1024
MAX_REPLY = 64 * 1024


class ClamdEngine(Engine):
    name = "clamd"
    decodes_mail = True

    def __init__(self, endpoints, settings):
        self._endpoints = Endpoints(
            "clamd", endpoints,
            connect_timeout=number(settings, "FP_SCAND_CLAMD_CONNECT_TIMEOUT", 0.001, 86400, default=5.0),
            timeout=number(settings, "FP_SCAND_CLAMD_TIMEOUT", 0.001, 86400, default=60.0))

    def scan(self, data, fd=None, filename=None):
        use_fd = fd is not None and _is_readable_file(fd)
        return self._endpoints.ask(lambda sock, unix: _scan_on(sock, unix, data, fd if use_fd else None))

    def ping(self):
        self._endpoints.ask(_ping_on)

    def reload(self):
        pass  # clamd watches and reloads its own database


def _scan_on(sock, unix, data, fd):
    if unix and fd is not None:
        sock.sendall(b"zFILDES\0")
        socket.send_fds(sock, [b"\0"], [fd])
    else:
        sock.sendall(b"zINSTREAM\0")
        try:
            with memoryview(data) as view:
                for pos in range(0, len(view), CHUNK):
                    with view[pos:pos + CHUNK] as chunk:
                        sock.sendall(struct.pack(">I", len(chunk)))
                        sock.sendall(chunk)
            sock.sendall(struct.pack(">I", 0))
        except (BrokenPipeError, ConnectionResetError):
            pass  # clamd stopped reading (size limit): its reply says why
    return parse_verdict(_read_reply(sock))


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
    sock.sendall(b"zPING\0")
    reply = _read_reply(sock)
    if reply != "PONG":
        raise EngineError(f"PING answered {reply!r}")


def _read_reply(sock):
    """One \\0-terminated reply (or whatever came before clamd closed)."""
    data = b""
    while not data.endswith(b"\0"):
        try:
            more = sock.recv(4096)
        except ConnectionResetError:
            more = b""
        if not more:
            if not data:
                raise EngineError("connection closed without a reply")
            break
        data += more
        if len(data) > MAX_REPLY:
            raise EngineError("reply too long")
    return data.rstrip(b"\0").decode("ascii", "replace").strip()


def _is_readable_file(fd):
    # clamd answers OK for a descriptor opened write-only and an error for a pipe:
    # FILDES only with a readable regular file, else the bytes are streamed.
    try:
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        return mode != os.O_WRONLY and stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False
