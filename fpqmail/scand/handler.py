"""One complete SCAN request, start to finish, in a worker: get at In and Out, examine,
write Out, keep the original if asked, and the reply. No sockets here: the loop
(server.py) read the request and sends the reply.

How the daemon gets at In and Out depends on the transport (docs/protocol.md):

- unix socket: the client passed the two open files. In must be a regular file open
  for reading, holding exactly Size bytes; Out a regular file open for writing, empty,
  not the same file as In. The peer was checked before (connection.py).
- TCP: the request names them, and they are opened only if the protocol allows:
  inside the configured temp directory, named fi<pid>.<random> and fo<pid>.<random>
  with the same suffix, no symlink (O_NOFOLLOW), regular files with one link each and
  one owner, In of the announced size, Out empty.

Either way In is never read past what the file system allocated for it (a sparse In
of the caller's own must not make the daemon allocate its size), never through the
file offset the client shares (mmap or pread), and Out is written from offset 0.
"""

import contextlib
import fcntl
import itertools
import mmap
import os
import stat
import time

from . import protocol
from .deadline import TimeLimit, check
from .engines import EngineError
from .examine import UNSCANNED, LimitExceeded, not_scanned
from .log import logger
from .policy import DELIVER, DROP, REJECT, TEMPFAIL, Decision
from .quarantine import StoreError, fate_of
from .spam import MAX_RECIPIENTS, TAG, YES, Client, header_block

# A file system may allocate a little less than a file's size (data kept inline in the
# inode, tail packing); more than this missing is a hole.
SPARSE_SLACK = 64 * 1024
TIME_LIMIT = protocol.error_reply("time limit")
#: the spam engine answers by this share of the request's time limit (FP_SCAND_TIMEOUT),
#: or the message is not scored: what is left is for writing Out and the stores
SPAM_SHARE = 0.9
#: what fp-qmail does with a message the policy does not deliver (quarantine.FATES)
FATE_OF_ACTION = {REJECT: "rejected", DROP: "dropped", TEMPFAIL: "deferred"}


class Failed(Exception):
    """The message was not scanned; str() is the ERROR reply's Reason."""


def handle(job, runtime):
    """Serve job (connection.Job) with the runtime's engines and stores; returns
    (reply bytes, the info line to log once the reply is sent, or None)."""
    request = job.request
    try:
        envelope = protocol.parse_envelope(job.envelope)
        reply, summary = scan(job, envelope, runtime)
    except protocol.ProtocolError as e:
        logger.warning("refused a request from %s: %s", job.peer, e)
        return protocol.error_reply(str(e)), None
    except Failed as e:
        logger.warning("scan %s from %s: refused: %s", job.scan_id, job.peer, e)
        return protocol.error_reply(str(e)), None
    except TimeLimit:
        logger.warning("scan %s from %s: abandoned at its time limit", job.scan_id, job.peer)
        return TIME_LIMIT, None
    except LimitExceeded as e:
        reply = protocol.format_reply("REFUSED", [("Reason", str(e))])
        summary = f"status=refused reason={protocol.printable(e, 200)}"
    line = "scan %s from=<%s> rcpts=%d size=%d%s %s ms=%d" % (
        job.scan_id, protocol.printable(envelope.sender), envelope.recipient_count, request.size,
        _who(request), summary, (time.monotonic() - job.accepted) * 1000)
    return reply, line


def _who(request):
    text = ""
    if request.caller is not None:
        text += f" caller={request.caller}"
    if request.client_ip:
        text += " client=" + protocol.printable(request.client_ip, 64)
    return text


def scan(job, envelope, runtime):
    """Judge In, write Out if the message is to be delivered, keep the original if
    asked; return (reply bytes, log summary). Raises Failed (ERROR), LimitExceeded
    (REFUSED: the message is past one of the limits) or TimeLimit."""
    request, deadline = job.request, job.deadline
    in_fd, out_fd = open_files(job, runtime.settings.tmpdir)
    try:
        mappable = os.fstat(in_fd).st_uid in runtime.mappable_owners
        runtime.limits.check_size(request.size)  # before In is mapped or read
        with _contents(in_fd, request.size, mappable) as message:
            recipients = runtime.policy.for_message(envelope.distinct_recipients(), deadline)
            examined, spam, decision = judge(message, in_fd, envelope, recipients, job, runtime)
            check(deadline)
            written = 0
            if decision.action == DELIVER:
                block = header_block(spam, decision.verdict, decision.required, examined.newline()) \
                    if decision.verdict else b""
                written = _write_out(examined, block, out_fd, deadline)
            check(deadline)
            entry_id = _keep(runtime, message, envelope, examined, spam, decision, job.scan_id,
                             request.on_virus)
    finally:
        os.close(in_fd)
        os.close(out_fd)
    return _reply(examined, spam, decision, written, entry_id)


def judge(message, fd, envelope, recipients, job, runtime):
    """(Examined, SpamResult or None, policy.Decision): the virus engines' verdict, the
    spam engine's score where it can still matter, and what the recipients' policies
    (recipients: policy.MessagePolicy) make of them. Raises LimitExceeded, Failed and
    TimeLimit."""
    request = job.request
    if not recipients.scan:
        return not_scanned(message), None, Decision(DELIVER)
    try:
        examined = runtime.examine(message, fd, job.deadline)
    except EngineError as e:
        raise Failed(f"engine failure: {protocol.printable(e)}") from None
    decision = recipients.decide(examined.status, None, request.on_virus)
    if examined.status != "clean" or runtime.spam is None or not recipients.spam:
        return examined, None, decision  # the virus verdict wins: a virus, and it is not scored
    check(job.deadline)
    # One round trip with the original. The engine's answer must come while there is
    # still time to write Out: by SPAM_SHARE of the request's time limit.
    spam_deadline = job.accepted + runtime.settings.timeout * SPAM_SHARE
    spam = runtime.spam_engine.score(
        message, envelope.sender, list(itertools.islice(envelope.iter_recipients(), MAX_RECIPIENTS)),
        client=Client.of(request.client_ip or "", request.client_host or ""), user=recipients.spam_user,
        queue_id=job.scan_id, deadline=min(spam_deadline, job.deadline))
    return examined, spam, recipients.decide(examined.status, spam, request.on_virus)


def _reply(examined, spam, decision, written, entry_id):
    """(reply bytes, log summary) for the decision (docs/protocol.md)."""
    headers = []
    if decision.cause == "virus":  # reject or drop
        status = "INFECTED"
        headers += [("Threat", t) for t in examined.threats]
        headers += [("Engines", ",".join(examined.engines)), ("Action", decision.action)]
    elif decision.action in (REJECT, TEMPFAIL):  # the spam score, or the spam engine down
        status = "REFUSED" if decision.action == REJECT else "DEFERRED"
        headers.append(("Reason", decision.reason))
    else:
        status = "CLEAN" if examined.status in ("clean", UNSCANNED) else "CLEANED"
        headers.append(("Size", str(written)))
        headers += [("Threat", t) for t in examined.threats]
        if examined.status == UNSCANNED:
            headers.append(("Scanned", "no (policy)"))
        else:
            headers.append(("Engines", ",".join(examined.engines)))
    if spam is not None:
        headers.append(("Spam", spam_header(spam, decision)))
    if entry_id:
        headers.append(("Id", entry_id))
    summary = f"status={status.lower()}"
    if examined.status == UNSCANNED:
        summary += " scanned=no (policy)"
    if examined.threats:
        summary += " threats=" + protocol.printable("; ".join(examined.threats))
    if decision.cause == "virus":
        summary += " action=" + decision.action
    if spam is not None:
        summary += " " + spam.summary()
    if decision.reason:
        summary += " reason=" + protocol.printable(decision.reason, 200)
    if entry_id:
        summary += " id=" + entry_id
    return protocol.format_reply(status, headers), summary


def spam_header(spam, decision):
    """The reply's Spam header: `score=S required=R action=A` (A: deliver, tag, reject,
    tempfail), or `unknown (why)` when the engine gave no score."""
    if not spam.known:
        return f"unknown ({spam.reason})"
    action = TAG if decision.action == DELIVER and decision.verdict == YES else decision.action
    return f"score={spam.score:.1f} required={decision.required:.1f} action={action}"


# ---- In and Out ---------------------------------------------------------------------

def open_files(job, tmpdir):
    """(in_fd, out_fd), both checked, owned by the caller: the descriptors the client
    passed (the job gives them up), or the named files opened."""
    if job.fds:
        in_fd, out_fd = job.fds
        job.fds = ()
        try:
            _check_passed(in_fd, out_fd, job.request.size)
        except Failed:
            os.close(in_fd)
            os.close(out_fd)
            raise
        return in_fd, out_fd
    return open_spool(job.request, tmpdir)


def _check_passed(in_fd, out_fd, size):
    """The two descriptors of a unix-socket request, as docs/protocol.md wants them."""
    for fd, label, modes in ((in_fd, "In", (os.O_RDONLY, os.O_RDWR)), (out_fd, "Out", (os.O_WRONLY, os.O_RDWR))):
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        if flags & os.O_PATH or flags & os.O_ACCMODE not in modes:
            raise Failed(f"{label} is not open for {'reading' if label == 'In' else 'writing'}")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Failed(f"{label} is not a regular file")
    i, o = os.fstat(in_fd), os.fstat(out_fd)
    if (i.st_dev, i.st_ino) == (o.st_dev, o.st_ino):
        raise Failed("In and Out are the same file")
    _check_sizes(i, o, size)


def _check_sizes(i, o, size):
    if i.st_size != size:
        raise Failed(f"In holds {i.st_size} bytes, not Size {size}")
    if i.st_size > i.st_blocks * 512 + SPARSE_SLACK:
        raise Failed(f"In is sparse: {i.st_blocks * 512} bytes allocated for {i.st_size}")
    if o.st_size != 0:
        raise Failed("Out is not empty")


def open_spool(request, tmpdir):
    """Open the named In (read-only) and Out (write-only) after every check."""
    in_suffix = _spool_suffix(request.in_path, "i", tmpdir)
    out_suffix = _spool_suffix(request.out_path, "o", tmpdir)
    if in_suffix != out_suffix:
        raise Failed("In and Out are not a pair (fi<pid>.<random> and fo<same>)")
    in_fd = _open_regular(request.in_path, os.O_RDONLY)
    try:
        out_fd = _open_regular(request.out_path, os.O_WRONLY)
    except Failed:
        os.close(in_fd)
        raise
    try:
        i, o = os.fstat(in_fd), os.fstat(out_fd)
        if (i.st_uid, i.st_dev) != (o.st_uid, o.st_dev):
            raise Failed("In and Out have different owners")
        _check_sizes(i, o, request.size)
    except Failed:
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
        raise Failed(f"{label} is not a f{which}<pid>.<random> file in {tmpdir}")
    return m.group(2)


def _open_regular(path, mode):
    label = "In" if mode == os.O_RDONLY else "Out"
    try:
        # O_NONBLOCK: opening a FIFO planted under the name must not hang the worker.
        fd = os.open(path, mode | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise Failed(f"{label}: cannot open: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise Failed(f"{label} is not a regular file with a single link")
    os.set_blocking(fd, True)
    return fd


@contextlib.contextmanager
def _contents(fd, size, mappable):
    """In as a read-only bytes-like, without moving its offset: mapped when its owner
    can be trusted not to truncate it under us (touching a mapped page past the end of
    a truncated file kills the whole daemon with SIGBUS), else read into memory with
    pread. mmap cannot map 0 bytes."""
    if size == 0:
        yield b""
    elif not mappable:
        parts, done = [], 0
        while done < size:  # one read, unless the file system gives less at a time
            part = os.pread(fd, size - done, done)
            if not part:
                raise Failed("In was truncated while it was read")
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


class _OutWriter:
    """Out as a file object for Examined.write: pwrite from offset 0 (the offset the
    client shares is not used), the deadline checked between writes."""

    def __init__(self, fd, deadline):
        self._fd = fd
        self._deadline = deadline
        self.written = 0

    def write(self, data):
        check(self._deadline)
        with memoryview(data) as view, view.cast("B") as left:
            while left:
                n = os.pwrite(self._fd, left, self.written)
                self.written += n
                left = left[n:]
        return len(data)


def _write_out(examined, block, out_fd, deadline):
    writer = _OutWriter(out_fd, deadline)
    try:
        written = examined.write(writer, block)
        if written != writer.written or os.fstat(out_fd).st_size != written:
            raise Failed("Out changed while it was written")
    except OSError as e:  # a full disk is the administrator's to see, not a bug of ours
        raise Failed(f"cannot write Out: {e.strerror}") from None
    if written == 0:
        raise Failed("nothing to deliver")
    return written


def _keep(runtime, message, envelope, examined, spam, decision, scan_id, on_virus):
    """Store the original as the settings ask; the quarantine ID, or ''. A message that
    cannot be stored is not delivered: Failed, and fp-qmail tries again later.

    The quarantine keeps what had a threat, and what was refused as spam when
    FP_SCAND_QUARANTINE_SPAM says so; the backup keeps everything."""
    status, threats = examined.status, examined.threats
    refused_spam = decision.action == REJECT and decision.cause == "spam"
    if refused_spam:
        status, threats = "spam", [f"Spam ({spam.engine} score {spam.score:.1f})"]
    if decision.action == DELIVER:
        fate = fate_of(status, on_virus) if status == "cleaned" else "delivered"
    else:
        fate = FATE_OF_ACTION[decision.action]
    entry_id = ""
    stores = []
    if runtime.quarantine and (status in ("cleaned", "infected") or
                               (refused_spam and runtime.settings.quarantine_spam)):
        stores.append(("quarantine", runtime.quarantine))
    if runtime.backup:
        stores.append(("backup", runtime.backup))
    for kind, store in stores:
        try:
            stored = store.put(message, envelope, kind=kind, status=status, fate=fate,
                               threats=threats, engines=examined.engines, scan_id=scan_id)
        except (OSError, StoreError) as e:
            logger.error("scan %s: cannot store the original in the %s: %s", scan_id, kind, e)
            raise Failed(f"cannot store the original in the {kind}") from None
        if kind == "quarantine":
            entry_id = stored
    return entry_id
