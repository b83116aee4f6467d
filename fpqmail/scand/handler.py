"""One request, start to finish: read it, open its files, examine, write fo, keep the
original if asked, reply.

A request comes from anyone who can connect, so the files it names are opened only if
docs/protocol.md allows them: inside the configured temp directory, named
fi<pid>.<random> and fo<pid>.<random> with the same suffix, no symlink (O_NOFOLLOW),
regular files with one link each and one owner, In of the announced size, Out empty.
"""

import contextlib
import mmap
import os
import stat
import time

from . import protocol
from .deadline import TimeLimit
from .engines import EngineError
from .examine import LimitExceeded
from .log import logger
from .quarantine import StoreError

RECV_SIZE = 65536
# fp-qmail sends its whole request as soon as it is connected; a client that takes
# longer must not hold a worker for the whole time limit.
READ_TIMEOUT = 10.0


class Refused(Exception):
    """The request cannot be served; str() is the ERROR reply's Reason."""


def handle(conn, runtime):
    """Serve the request on conn (server.Connection) with the runtime's engines and stores."""
    started = time.monotonic()
    try:
        request, envelope = read_request(conn)
    except (protocol.ProtocolError, Refused) as e:
        logger.warning("refused a request from %s: %s", conn.peer, e)
        conn.answer(protocol.error_reply(str(e)))
        return
    scan_id = os.path.basename(request.in_path)[2:]
    try:
        reply, summary = scan(request, envelope, runtime, conn, scan_id)
    except Refused as e:
        logger.warning("scan %s from %s: refused: %s", scan_id, conn.peer, e)
        conn.answer(protocol.error_reply(str(e)))
        return
    if conn.answer(reply):
        logger.info("scan %s from=<%s> rcpts=%d size=%d %s ms=%d", scan_id,
                    protocol.printable(envelope.sender.decode("latin-1")), len(envelope.recipients),
                    request.size, summary, (time.monotonic() - started) * 1000)
    else:
        logger.warning("scan %s: finished after the time limit; the ERROR reply stands", scan_id)


def read_request(conn):
    """(Request, Envelope) from the connection, within READ_TIMEOUT and the deadline."""
    until = min(conn.deadline, time.monotonic() + READ_TIMEOUT)
    reader = protocol.HeadReader()
    request = None
    while request is None:
        data = conn.recv(RECV_SIZE, until)
        if not data:
            raise Refused("malformed request: connection closed before the blank line")
        request = reader.feed(data)
    raw = bytearray(reader.rest)
    if len(raw) > request.envelope_size:
        raise Refused("malformed request: more bytes than Envelope announced")
    while len(raw) < request.envelope_size:
        data = conn.recv(min(RECV_SIZE, request.envelope_size - len(raw)), until)
        if not data:
            raise Refused("malformed request: connection closed inside the envelope")
        raw += data
    conn.fully_read = True
    return request, protocol.parse_envelope(bytes(raw))


def scan(request, envelope, runtime, conn, scan_id):
    """Examine In into Out; return (reply bytes, log summary). Raises Refused."""
    in_fd, out_fd = open_spool(request, runtime.settings.tmpdir)
    try:
        mappable = os.fstat(in_fd).st_uid in runtime.mappable_owners
        with _contents(in_fd, request.size, mappable) as message:
            try:
                examined = runtime.examine(message, in_fd, conn.deadline)
            except EngineError as e:
                raise Refused(f"engine failure: {protocol.printable(e)}") from None
            except TimeLimit:
                raise Refused("time limit") from None
            except LimitExceeded as e:
                return protocol.format_reply("REFUSED", [("Reason", str(e))]), \
                    f"status=refused reason={protocol.printable(e, 200)}"
            if conn.expired():
                raise Refused("time limit")  # nobody will read what follows
            written = 0
            if examined.status != "infected":
                written = _write_out(examined, out_fd)
            headers = [("Size", str(written))] if written else []
            headers += [("Threat", t) for t in examined.threats]
            headers.append(("Engines", ",".join(examined.engines)))
            entry_id = _keep(runtime, message, envelope, examined, scan_id)
            if entry_id:
                headers.append(("Id", entry_id))
    finally:
        os.close(in_fd)
        os.close(out_fd)
    summary = f"status={examined.status}"
    if examined.threats:
        summary += " threats=" + protocol.printable("; ".join(examined.threats))
    if entry_id:
        summary += " id=" + entry_id
    return protocol.format_reply(examined.status.upper(), headers), summary


def open_spool(request, tmpdir):
    """Open In (read-only) and Out (write-only) after every check; (in_fd, out_fd)."""
    in_suffix = _spool_suffix(request.in_path, "i", tmpdir)
    out_suffix = _spool_suffix(request.out_path, "o", tmpdir)
    if in_suffix != out_suffix:
        raise Refused("In and Out are not a pair (fi<pid>.<random> and fo<same>)")
    in_fd = _open_regular(request.in_path, os.O_RDONLY)
    try:
        out_fd = _open_regular(request.out_path, os.O_WRONLY)
    except Refused:
        os.close(in_fd)
        raise
    try:
        i, o = os.fstat(in_fd), os.fstat(out_fd)
        if (i.st_uid, i.st_dev) != (o.st_uid, o.st_dev):
            raise Refused("In and Out have different owners")
        if i.st_size != request.size:
            raise Refused(f"In holds {i.st_size} bytes, not Size {request.size}")
        if o.st_size != 0:
            raise Refused("Out is not empty")
    except Refused:
        os.close(in_fd)
        os.close(out_fd)
        raise
    return in_fd, out_fd


def _spool_suffix(path, which, tmpdir):
    directory, name = os.path.split(path)
    m = protocol.SPOOL_NAME.match(name)
    if not os.path.isabs(path) or (directory.rstrip("/") or "/") != tmpdir or not m \
            or m.group(1) != which:
        label = "In" if which == "i" else "Out"
        raise Refused(f"{label} is not a f{which}<pid>.<random> file in {tmpdir}")
    return m.group(2)


def _open_regular(path, mode):
    label = "In" if mode == os.O_RDONLY else "Out"
    try:
        # O_NONBLOCK: opening a FIFO planted under the name must not hang the worker.
        fd = os.open(path, mode | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise Refused(f"{label}: cannot open: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise Refused(f"{label} is not a regular file with a single link")
    os.set_blocking(fd, True)
    return fd


@contextlib.contextmanager
def _contents(fd, size, mappable):
    """In as a read-only bytes-like: mapped when its owner can be trusted not to
    truncate it under us (touching a mapped page past the end of a truncated file kills
    the whole daemon with SIGBUS), else read into memory. mmap cannot map 0 bytes."""
    if size == 0:
        yield b""
    elif not mappable:
        parts = []
        done = 0
        while done < size:
            part = os.read(fd, size - done)
            if not part:
                raise Refused("In was truncated while it was read")
            parts.append(part)
            done += len(part)
        yield parts[0] if len(parts) == 1 else b"".join(parts)
    else:
        mapped = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        try:
            yield mapped
        finally:
            try:
                mapped.close()
            except BufferError:  # a view still held (by a traceback): the GC unmaps it
                pass


def _write_out(examined, out_fd):
    try:
        with os.fdopen(os.dup(out_fd), "wb", buffering=1 << 16) as out:
            written = examined.write(out)
            out.flush()
            if os.fstat(out.fileno()).st_size != written:
                raise Refused("Out changed while it was written")
    except OSError as e:  # a full disk is the administrator's to see, not a bug of ours
        raise Refused(f"cannot write Out: {e.strerror}") from None
    if written == 0:
        raise Refused("nothing to deliver")
    return written


def _keep(runtime, message, envelope, examined, scan_id):
    """Store the original as the settings ask; the quarantine ID, or ''. A message that
    cannot be stored is not delivered: Refused, and fp-qmail tries again later."""
    entry_id = ""
    stores = []
    if runtime.quarantine and examined.status != "clean":
        stores.append(("quarantine", runtime.quarantine))
    if runtime.backup:
        stores.append(("backup", runtime.backup))
    for kind, store in stores:
        try:
            stored = store.put(message, envelope, kind=kind, status=examined.status,
                               threats=examined.threats, engines=examined.engines, scan_id=scan_id)
        except (OSError, StoreError) as e:
            logger.error("scan %s: cannot store the original in the %s: %s", scan_id, kind, e)
            raise Refused(f"cannot store the original in the {kind}") from None
        if kind == "quarantine":
            entry_id = stored
    return entry_id
