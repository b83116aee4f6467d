"""fp-qmail: qmail-queue that has every message scanned before it is queued.

qmail runs this program in place of bin/qmail-queue, once per message, with
qmail-queue's contract:

  fd 0  the message, read to end of file (a pipe when qmail-smtpd calls)
  fd 1  the envelope, open for reading: F<sender>\\0 T<recipient>\\0 ... \\0
  fd 6  optional, open for writing: one custom SMTP error text, then exit 82
  exit  qmail-queue's codes (the table below)

It copies the message to <tmpdir>/fi<pid>.<random>, creates <tmpdir>/fo<pid>.<random>,
asks the Mail Scanner (docs/protocol.md) to scan the one into the other, removes both
names and execs qmail-queue.orig with fo on fd 0 and the envelope, exactly as
received, on fd 1. Exit 0 happens only there (qmail-queue.orig's own exit) or when
the policy deliberately drops an infected message.

It is installed setuid qmailq: every input, the environment included, is hostile.
It is started for every message: it imports only modules built into the interpreter
(posix, not os), and the config-file parser only when it must read the file.
"""
import _signal
import _socket
import errno
import fcntl
import posix
import syslog
import time

from fpqmail import envelope as qmail_envelope
from fpqmail import values
from fpqmail.values import printable

# Exit codes (qmail-queue's, ../shared/reference/qmail-queue.md). Every failure path
# below raises Fail with exactly one of these names.
ADDRESS_TOO_LONG = 11   # an envelope address of 1003 bytes or more
VIRUS_REJECTED = 31     # infected, policy reject (or not cleanable), fd 6 not open
OUT_OF_MEMORY = 51      # also: an envelope larger than ENVELOPE_MAX
TIMED_OUT = 52          # our own 24-hour alarm, as qmail-queue's
WRITE_FAILED = 53       # creating or writing the temp files: disk full, read-only...
READ_FAILED = 54        # reading the message or the envelope; envelope ended early
CONFIG_FAILED = 55      # config file unreadable; a setting that cannot be parsed
SCANNER_FAILED = 71     # the scanner answered ERROR
INTERRUPTED = 71        # SIGTERM, SIGHUP or SIGINT while working
EXEC_FAILED = 71        # qmail-queue.orig could not be executed
SCANNER_TIMED_OUT = 72  # connecting or waiting for the reply took too long
SCANNER_REFUSED = 73    # no scanner endpoint accepted the connection
SCANNER_GARBLED = 74    # a reply that breaks docs/protocol.md; fo not as announced
INTERNAL = 81           # a bug of ours: logged with the exception
CUSTOM_TEXT = 82        # the text on fd 6 says permanent (D) or temporary (Z)
ENVELOPE_FORMAT = 91    # envelope not F... T... as qmail-queue demands

ENVELOPE_MAX = 64 << 20
REPLY_MAX = 64 << 10
CHUNK = 1 << 20

DEFAULTS = {
    "FP_QMAIL_LOGLEVEL": "4",
    "FP_QMAIL_CONF": "/etc/f-prot.conf",
    "FP_QMAIL_SCANNER": "127.0.0.1:11200",
    "FP_QMAIL_CONNECT_TIMEOUT": "5",
    "FP_QMAIL_TIMEOUT": "120",
    "FP_QMAIL_TMPDIR": "/tmp",
    "FP_QMAIL_GROUP_ACCESS": "no",
    "FP_QMAIL_QUEUE": "/var/qmail/bin/qmail-queue.orig",
    "FP_QMAIL_ON_VIRUS": "deliver",
    "FP_QMAIL_ON_ERROR": "tempfail",
    "FP_QMAIL_REJECT_TEXT": "This message contains a virus ({threats}) and was rejected (#5.7.1)",
    "FP_QMAIL_LOG_STDERR": "no",
}
# Settings naming a file or a program: under setuid the caller's environment must not
# choose them, or it could make us run or write something of theirs as qmailq.
PATH_SETTINGS = ("FP_QMAIL_CONF", "FP_QMAIL_TMPDIR", "FP_QMAIL_QUEUE")
HANDLED_SIGNALS = (_signal.SIGTERM, _signal.SIGHUP, _signal.SIGINT, _signal.SIGALRM)


class Fail(Exception):
    """A failure with its exit code. `scanner` marks scanner trouble, which the
    FP_QMAIL_ON_ERROR policy may turn into an unscanned delivery."""

    def __init__(self, code, reason, scanner=False):
        Exception.__init__(self, reason)
        self.code = code
        self.reason = reason
        self.scanner = scanner


# ---- logging: syslog, facility mail, opened only when a line is due --------------

loglevel = 4
log_stderr = False
log_opened = False


def log(priority, text):
    global log_opened
    if priority > loglevel:
        return
    if not log_opened:
        options = syslog.LOG_PID | (syslog.LOG_PERROR if log_stderr else 0)
        syslog.openlog("fp-qmail", options, syslog.LOG_MAIL)
        log_opened = True
    syslog.syslog(priority, text)


# ---- signals: any of them while working means remove the temp files, exit -------

dying = False
alarm_code = TIMED_OUT


def on_signal(signum, frame):
    if dying:
        return
    if signum == _signal.SIGALRM:
        raise Fail(alarm_code, "timed out (alarm)", scanner=alarm_code == SCANNER_TIMED_OUT)
    raise Fail(INTERRUPTED, "interrupted by signal %d" % signum)


# ---- settings: the environment; /etc/f-prot.conf only if FP_QMAIL_LOGLEVEL is unset

def load_settings(setuid):
    environ = posix.environ
    from_file = {}
    problems = ()
    if b"FP_QMAIL_LOGLEVEL" not in environ:
        path = DEFAULTS["FP_QMAIL_CONF"]
        if not setuid and b"FP_QMAIL_CONF" in environ:
            path = environ[b"FP_QMAIL_CONF"].decode("utf-8", "surrogateescape")
        from_file, problems = read_config(path)
    settings = {}
    for key, default in DEFAULTS.items():
        raw = environ.get(key.encode())
        if raw is not None and not (setuid and key in PATH_SETTINGS):
            value = raw.decode("utf-8", "surrogateescape")
            if key == "FP_QMAIL_SCANNER" and setuid:
                value = ",".join(e for e in value.split(",") if not e.strip().startswith("/"))
                if not value:
                    value = from_file.get(key, default)
        else:
            value = from_file.get(key, default)
        settings[key] = value
    return settings, problems


def read_config(path):
    from fpqmail import shconf
    try:
        found, problems = shconf.read(path)
    except FileNotFoundError:
        return {}, ()
    except OSError as e:
        raise Fail(CONFIG_FAILED, "cannot read config %s: %s" % (path, e.strerror))
    except ValueError as e:
        raise Fail(CONFIG_FAILED, "config %s is %s" % (path, e))
    return found, [(path, n, p) for n, p in problems]


def setting(settings, key, parse, *args):
    """settings[key] through a parser of fpqmail.values; exit 55 naming key and value."""
    value = settings[key]
    try:
        return parse(value, *args)
    except ValueError as e:
        raise Fail(CONFIG_FAILED, "bad setting %s=%s: %s" % (key, printable(value, 200), e))


def choice(value, allowed):
    if value not in allowed:
        raise ValueError("must be one of " + "|".join(allowed))
    return value


# ---- the temp files ---------------------------------------------------------------

def create_spool(tmpdir, group_access, names):
    """Create fi and fo with fresh unpredictable names; a name that exists, whatever
    it is, is never opened: draw again. Returns (fi, fi_fd, fo, fo_fd)."""
    pid = posix.getpid()
    flags = posix.O_RDWR | posix.O_CREAT | posix.O_EXCL | posix.O_NOFOLLOW
    for attempt in range(16):
        suffix = "%d.%s" % (pid, posix.urandom(8).hex())
        fi = "%s/fi%s" % (tmpdir, suffix)
        fo = "%s/fo%s" % (tmpdir, suffix)
        # A signal between creating a file and recording its name would leave it behind.
        _signal.pthread_sigmask(_signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            try:
                fi_fd = posix.open(fi, flags, 0o600)
            except FileExistsError:
                continue
            names.append(fi)
            try:
                fo_fd = posix.open(fo, flags, 0o600)
            except FileExistsError:
                posix.unlink(fi)
                names.remove(fi)
                posix.close(fi_fd)
                continue
            names.append(fo)
        except OSError as e:
            raise Fail(WRITE_FAILED, "cannot create a temp file in %s: %s" % (tmpdir, e.strerror))
        finally:
            _signal.pthread_sigmask(_signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        if group_access:  # so a scanner in the files' group can read fi and write fo
            posix.fchmod(fi_fd, 0o640)
            posix.fchmod(fo_fd, 0o660)
        return fi, fi_fd, fo, fo_fd
    raise Fail(WRITE_FAILED, "no free temp file name in %s after 16 tries" % tmpdir)


def remove_names(names):
    while names:
        try:
            posix.unlink(names.pop())
        except FileNotFoundError:
            pass


def copy(src, dst, what):
    """Copy src to end of file into dst without growing memory: splice(2) when src is
    a pipe (no copy through user space), read/write otherwise. Returns the byte count."""
    total = 0
    try:
        while True:
            n = posix.splice(src, dst, CHUNK)
            if not n:
                return total
            total += n
    except OSError as e:
        if e.errno != errno.EINVAL or total:
            raise copy_failure(e, what)
    buf = bytearray(1 << 16)
    view = memoryview(buf)
    while True:
        try:
            n = posix.readv(src, [buf])
        except OSError as e:
            raise Fail(READ_FAILED, "cannot read %s: %s" % (what, e.strerror))
        if not n:
            return total
        done = 0
        while done < n:
            try:
                done += posix.write(dst, view[done:n])
            except OSError as e:
                raise copy_failure(e, what)
        total += n


def copy_failure(e, what):
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS):
        return Fail(WRITE_FAILED, "cannot write %s to a temp file: %s" % (what, e.strerror))
    return Fail(READ_FAILED, "cannot read %s: %s" % (what, e.strerror))


# ---- the envelope -------------------------------------------------------------------

def read_envelope():
    """Read fd 1 up to the envelope's final NUL (or end of file), as qmail-queue does:
    a caller may keep fd 1 open after writing it."""
    data = bytearray()  # grown in place and searched only where new bytes came: linear time
    searched = 1
    while data.find(b"\0\0", searched) < 0:
        searched = max(1, len(data) - 1)
        try:
            chunk = posix.read(1, 1 << 16)
        except OSError as e:
            raise Fail(READ_FAILED, "cannot read the envelope: %s" % e.strerror)
        if not chunk:
            break
        data += chunk
        if len(data) > ENVELOPE_MAX:
            raise Fail(OUT_OF_MEMORY, "envelope larger than %d bytes" % ENVELOPE_MAX)
    return bytes(data)


ENVELOPE_EXITS = {qmail_envelope.ENDED_EARLY: READ_FAILED, qmail_envelope.FORMAT_ERROR: ENVELOPE_FORMAT,
                  qmail_envelope.ADDRESS_TOO_LONG: ADDRESS_TOO_LONG}


def check_envelope(data):
    """qmail-queue's envelope checks, in the order it makes them while reading:
    returns (exit code or 0, length of the envelope including its final NUL)."""
    problem, length = qmail_envelope.check(data)
    return (ENVELOPE_EXITS[problem] if problem else 0), length


# ---- the Mail Scanner (docs/protocol.md) ----------------------------------------------

def ask_scanner(endpoints, connect_timeout, deadline, request):
    """Send the request to the first endpoint that accepts a connection; return the
    raw reply. Only a failed connect moves on to the next endpoint: once a scanner
    has the request it may be writing fo, so there is no second try."""
    failure = None
    for family, address, name in endpoints:
        try:  # fails for an IPv6 endpoint on a host without IPv6, or out of descriptors
            sock = _socket.socket(family, _socket.SOCK_STREAM)
        except OSError as e:
            failure = Fail(SCANNER_REFUSED, "scanner %s: cannot make a socket: %s" % (name, e.strerror or e), True)
            continue
        try:
            sock.settimeout(max(0.001, min(connect_timeout, deadline - time.monotonic())))
            sock.connect(address)
            break
        except TimeoutError:
            failure = Fail(SCANNER_TIMED_OUT, "scanner %s: connect timed out" % name, True)
        except OSError as e:
            failure = Fail(SCANNER_REFUSED, "scanner %s: %s" % (name, e.strerror or e), True)
        sock.close()
    else:
        raise failure
    try:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.sendall(request)
        reply = b""
        while b"\n\n" not in reply:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = sock.recv(REPLY_MAX + 1 - len(reply))
            if not chunk:
                raise Fail(SCANNER_GARBLED, "scanner %s closed the connection mid-reply" % name, True)
            reply += chunk
            if len(reply) > REPLY_MAX:
                raise Fail(SCANNER_GARBLED, "scanner %s: reply longer than %d bytes" % (name, REPLY_MAX), True)
        return reply
    except TimeoutError:
        raise Fail(SCANNER_TIMED_OUT, "scanner %s: no reply in time" % name, True)
    except OSError as e:
        raise Fail(SCANNER_GARBLED, "scanner %s: %s" % (name, e.strerror or e), True)
    finally:
        sock.close()


STATUSES = {"CLEAN": ("size",), "CLEANED": ("size", "threat"), "INFECTED": ("threat",),
            "ERROR": ("reason",)}


def parse_reply(reply):
    """Return (status, {header: [values]}) of a reply, or raise Fail(SCANNER_GARBLED)."""
    head, sep, rest = reply.partition(b"\n\n")
    if not sep or rest:
        raise Fail(SCANNER_GARBLED, "scanner reply is not one header block", True)
    try:
        lines = head.decode("ascii").split("\n")
    except UnicodeDecodeError:
        raise Fail(SCANNER_GARBLED, "scanner reply is not ASCII", True)
    version, _, status = lines[0].partition(" ")
    if version != "FPQMAIL/1" or status not in STATUSES:
        raise Fail(SCANNER_GARBLED, "scanner reply starts with %r" % printable(lines[0], 200), True)
    fields = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if not sep or not key or not key.replace("-", "").isalnum():
            raise Fail(SCANNER_GARBLED, "scanner reply line %r" % printable(line, 200), True)
        fields.setdefault(key.lower(), []).append(value.strip())
    for key in STATUSES[status]:
        if not fields.get(key) or not all(fields[key]):
            raise Fail(SCANNER_GARBLED, "scanner reply %s without %s" % (status, key.title()), True)
    return status, fields


def announced_size(fields, fo_fd):
    """The Size the scanner announced, checked against the fo we hold open."""
    values = fields["size"]
    if len(values) != 1 or not values[0].isdigit() or not values[0].isascii():
        raise Fail(SCANNER_GARBLED, "scanner reply with Size %r" % printable(",".join(values), 200), True)
    size = int(values[0])
    actual = posix.fstat(fo_fd).st_size
    if size == 0 or size != actual:
        raise Fail(SCANNER_GARBLED, "fo holds %d bytes, the scanner announced %d" % (actual, size), True)
    return size


# ---- the custom error text on fd 6 ----------------------------------------------------

def fd6_writable():
    try:
        return fcntl.fcntl(6, fcntl.F_GETFL) & 3 in (posix.O_WRONLY, posix.O_RDWR)
    except OSError:
        return False


def refuse(fd6, code, kind, text):
    """Exit code for a refusal: 82 with D (permanent) or Z (temporary) text on fd 6
    when the caller gave us fd 6, else the plain code."""
    if not fd6:
        return code
    text = text.replace("\r", "").replace("\n", "").encode("ascii", "replace")[:200]
    try:
        posix.write(6, kind + text)
    except OSError:
        return code
    return CUSTOM_TEXT


# ---- the message's way through, top to bottom -------------------------------------------

spool = []  # the temp file names that exist now: removed whatever happens
summary = {"sender": "?", "rcpts": "?", "size": "?", "threats": "-"}


def main():
    global dying
    summary["started"] = time.monotonic()
    for signum in HANDLED_SIGNALS:
        _signal.signal(signum, on_signal)
    _signal.alarm(86400)
    posix.umask(0o077)
    # The caller may have closed 0, 1 or 2: our files must never take those numbers.
    # /dev/null write-only in their place makes reading 0 or 1 fail, as it should.
    for fd in (0, 1, 2):
        try:
            fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            posix.dup2(posix.open("/dev/null", posix.O_WRONLY), fd)
    fd6 = fd6_writable()  # before we open anything that could become fd 6
    try:
        code, verdict = scan_and_queue(fd6)
    except BaseException as e:
        dying = True  # first: from here on no signal may interrupt the clean-up
        code, verdict = failure(e, fd6), "failed"
    dying = True
    remove_names(spool)
    log_summary(verdict, "exit %d" % code)
    posix._exit(code)


def log_summary(verdict, outcome):
    """The one line per message at info level."""
    log(syslog.LOG_INFO, "sender=<%s> rcpts=%s size=%s verdict=%s threats=%s %s ms=%d" % (
        summary["sender"], summary["rcpts"], summary["size"], verdict, summary["threats"],
        outcome, (time.monotonic() - summary["started"]) * 1000))


def failure(e, fd6):
    """The exit code for what went wrong, logged with its cause."""
    if isinstance(e, Fail):
        log(syslog.LOG_ERR, "%s (exit %d)" % (e.reason, e.code))
        if e.scanner:
            return refuse(fd6, e.code, b"Z", "message could not be scanned for viruses, try again later (#4.3.0)")
        return e.code
    if isinstance(e, MemoryError):
        log(syslog.LOG_ERR, "out of memory (exit %d)" % OUT_OF_MEMORY)
        return OUT_OF_MEMORY
    log(syslog.LOG_ERR, "internal error: %s: %s (exit %d)" % (type(e).__name__, printable(str(e), 200), INTERNAL))
    return INTERNAL


def scan_and_queue(fd6):
    """Returns (exit code, verdict) when the message is refused or dropped; on delivery
    it never returns: qmail-queue.orig replaces this process."""
    global loglevel, log_stderr, alarm_code
    setuid = posix.getuid() != posix.geteuid() or posix.getgid() != posix.getegid()
    # Until the settings are read, a failure to read them is logged as the environment says.
    log_stderr = posix.environ.get(b"FP_QMAIL_LOG_STDERR", b"").decode("latin-1") in values.TRUE_WORDS
    settings, problems = load_settings(setuid)
    log_stderr = setting(settings, "FP_QMAIL_LOG_STDERR", values.flag)
    loglevel = setting(settings, "FP_QMAIL_LOGLEVEL", values.number, 0, 7, int)
    for path, line, problem in problems:
        log(syslog.LOG_WARNING, "%s line %d skipped: %s" % (path, line, printable(problem, 200)))
    endpoints = setting(settings, "FP_QMAIL_SCANNER", values.endpoints)
    connect_timeout = setting(settings, "FP_QMAIL_CONNECT_TIMEOUT", values.number, 0.001, 86400)
    timeout = setting(settings, "FP_QMAIL_TIMEOUT", values.number, 0.001, 86400)
    tmpdir = setting(settings, "FP_QMAIL_TMPDIR", values.absolute_path)
    group_access = setting(settings, "FP_QMAIL_GROUP_ACCESS", values.flag)
    queue = setting(settings, "FP_QMAIL_QUEUE", values.absolute_path)
    on_virus = setting(settings, "FP_QMAIL_ON_VIRUS", choice, ("deliver", "reject", "drop"))
    on_error = setting(settings, "FP_QMAIL_ON_ERROR", choice, ("tempfail", "pass"))
    reject_text = settings["FP_QMAIL_REJECT_TEXT"]

    # 1. The message, then the envelope: qmail's callers write them in that order.
    fi, fi_fd, fo, fo_fd = create_spool(tmpdir, group_access, spool)
    size = summary["size"] = copy(0, fi_fd, "the message")
    data = read_envelope()
    code, length = check_envelope(data)
    if code:
        raise Fail(code, "bad envelope (%s)" % {
            READ_FAILED: "ended early", ENVELOPE_FORMAT: "format error",
            ADDRESS_TOO_LONG: "address too long"}[code])
    envelope = data[:length]
    summary["sender"] = printable(envelope[1:envelope.index(b"\0")], 200)
    summary["rcpts"] = envelope.count(b"\0") - 2

    # 2. The scan.
    request = b"FPQMAIL/1 SCAN\nIn: %s\nOut: %s\nSize: %d\nEnvelope: %d\n\n%s" % (
        fi.encode(), fo.encode(), size, len(envelope), envelope)
    deliver_fd = fo_fd
    try:
        alarm_code = SCANNER_TIMED_OUT  # belt and braces: a hostname lookup has no timeout
        _signal.alarm(int(timeout) + 2)
        try:
            reply = ask_scanner(endpoints, connect_timeout, time.monotonic() + timeout, request)
        finally:
            alarm_code = TIMED_OUT
            _signal.alarm(86400)
        status, fields = parse_reply(reply)
        if status == "ERROR":
            raise Fail(SCANNER_FAILED, "scanner error: %s" % printable(fields["reason"][0], 200), True)
        if status != "INFECTED":
            announced_size(fields, fo_fd)
    except Fail as f:
        if not f.scanner or on_error != "pass":
            raise
        log(syslog.LOG_WARNING, "delivering unscanned: %s" % f.reason)
        status, fields = "UNSCANNED", {}
        deliver_fd = unscanned_copy(tmpdir, fi_fd, f.reason)

    # 3. What the verdict means for this message.
    if fields.get("threat"):
        summary["threats"] = ", ".join(printable(t, 100) for t in fields["threat"])
    if status == "INFECTED" or (status == "CLEANED" and on_virus != "deliver"):
        if on_virus == "drop":
            log(syslog.LOG_WARNING, "dropped infected message from <%s>: %s"
                % (summary["sender"], summary["threats"]))
            return 0, "dropped"
        text = reject_text.replace("{threats}", summary["threats"])
        return refuse(fd6, VIRUS_REJECTED, b"D", text), "rejected"

    # 4. Hand over: fd 0 the message to deliver, fd 1 the envelope as received.
    log_summary(status.lower(), "to " + queue)
    hand_over(deliver_fd, envelope, queue)


def unscanned_copy(tmpdir, fi_fd, reason):
    """The original with one added header, in a new nameless file: fo may still be
    written by a scanner that we gave up on."""
    try:
        fd = posix.open(tmpdir, posix.O_TMPFILE | posix.O_RDWR, 0o600)
        posix.write(fd, b"X-Antivirus: not scanned (%s)\n" % printable(reason, 200).encode())
        posix.lseek(fi_fd, 0, 0)
    except OSError as e:
        raise Fail(WRITE_FAILED, "cannot make the unscanned copy: %s" % e.strerror)
    copy(fi_fd, fd, "the unscanned copy")
    return fd


def hand_over(deliver_fd, envelope, queue):
    try:
        envelope_fd = posix.memfd_create("envelope")
        done = 0
        while done < len(envelope):
            done += posix.write(envelope_fd, envelope[done:])
        posix.lseek(envelope_fd, 0, 0)
        posix.lseek(deliver_fd, 0, 0)
    except OSError as e:
        raise Fail(WRITE_FAILED, "cannot pass the envelope on: %s" % e.strerror)
    remove_names(spool)  # before the exec: nothing is left even if qmail-queue.orig crashes
    posix.dup2(deliver_fd, 0)
    posix.dup2(envelope_fd, 1)
    posix.closerange(3, 6)  # fd 6 stays as the caller gave it
    posix.closerange(7, posix.sysconf("SC_OPEN_MAX"))
    _signal.alarm(0)  # a pending alarm would survive the exec
    for signum in (_signal.SIGPIPE, _signal.SIGXFSZ):  # Python ignores these; qmail-queue must not
        _signal.signal(signum, _signal.SIG_DFL)
    try:
        posix.execv(queue, [queue])
    except OSError as e:
        raise Fail(EXEC_FAILED, "cannot run %s: %s" % (queue, e.strerror))
