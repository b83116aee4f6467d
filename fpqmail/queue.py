"""fp-qmail: qmail-queue that has every message scanned before it is queued.

qmail runs this program in place of bin/qmail-queue, once per message, with
qmail-queue's contract:

  fd 0  the message, read to end of file (a pipe when qmail-smtpd calls)
  fd 1  the envelope, open for reading: F<sender>\\0 T<recipient>\\0 ... \\0
  fd 6  optional, open for writing: one custom SMTP error text, then exit 82
  exit  qmail-queue's codes (the table below)

It copies the message to a temp file fi, creates an empty fo, asks the Mail Scanner
(docs/protocol.md) to scan the one into the other and execs qmail-queue.orig with fo on
fd 0 and the envelope, exactly as received, on fd 1. On a unix socket (the default) fi
and fo are nameless (O_TMPFILE) and travel as descriptors; over TCP they are named
<tmpdir>/fi<pid>.<random> and fo<pid>.<random>, removed before the exec and on every
failure. Exit 0 happens only at qmail-queue.orig's own exit or when the policy
deliberately drops an infected message.

It is installed setuid qmailq: every input, the environment included, is hostile. Only a
trusted caller (docs: fp-qmail(8), "Trusted callers") may set anything through the
environment. It is started for every message: it imports only modules built into the
interpreter (posix, not os), and the config-file parser only when it must read the file.
"""
import _socket
import posix
import sys
import syslog
import time

from fpqmail import envelope as qmail_envelope
from fpqmail import values
from fpqmail.values import printable

# CPython's standard start (python -m fpqmail, a stock Nuitka binary) imports _signal and
# ignores SIGPIPE and SIGXFSZ before any code of ours runs: the caller's dispositions of
# those two are lost then. A core-only start leaves every disposition as the caller gave it.
STANDARD_START = "_signal" in sys.modules
# Last: importing _signal gives SIGINT CPython's KeyboardInterrupt until main() takes it
# over, and a KeyboardInterrupt in the middle of an import is what the binary's start-up
# handles worst. Until here SIGINT keeps the caller's disposition.
import _signal  # noqa: E402

# Exit codes (qmail-queue's, see README.md). Every failure path below raises Fail with
# exactly one of these names.
ADDRESS_TOO_LONG = 11     # an envelope address of 1003 bytes or more
REJECTED = 31             # infected and rejected by policy, REFUSED by the scanner, or over
                          # FP_QMAIL_MAX_SIZE; fd 6 not open
OUT_OF_MEMORY = 51        # also: an envelope larger than ENVELOPE_MAX
TIMED_OUT = 52            # our own 24-hour alarm, as qmail-queue's
WRITE_FAILED = 53         # creating or writing the temp files: disk full, read-only, no O_TMPFILE...
READ_FAILED = 54          # reading the message or the envelope; envelope ended early
CONFIG_FAILED = 55        # config file unreadable; a setting that cannot be parsed or used
SCANNER_FAILED = 71       # the scanner answered ERROR
DEFERRED = 71             # the scanner DEFERRED the message; fd 6 not open
INTERRUPTED = 71          # a signal while working
EXEC_FAILED = 71          # qmail-queue.orig could not be executed
SCANNER_TIMED_OUT = 72    # connecting or waiting for the reply took too long
SCANNER_UNREACHABLE = 73  # no scanner endpoint accepted the connection
SCANNER_GARBLED = 74      # a reply that breaks docs/protocol.md; fo not as announced
INTERNAL = 81             # a bug of ours: logged with the exception
CUSTOM_TEXT = 82          # the text on fd 6 says permanent (D) or temporary (Z)
ENVELOPE_FORMAT = 91      # envelope not F... T... as qmail-queue demands

# The errno values fp-qmail tells apart, Linux's (it is Linux-only: O_TMPFILE, splice,
# memfd): the errno module would be one more import on every message.
EIO, EISDIR, EINVAL, EFBIG, ENOSPC, EROFS, EOPNOTSUPP, EDQUOT = 5, 21, 22, 27, 28, 30, 95, 122

ENVELOPE_MAX = 16 << 20
REPLY_MAX = 64 << 10
CHUNK = 1 << 20
REJECT_TEXT_MIN = 3       # qmail answers a shorter custom text with a temporary error
CLIENT_HEADER_MAX = 255   # Client-IP, Client-Host: longer values are not sent
FD_MAX = (1 << 31) - 1    # above any descriptor a process can hold, whatever its limits
# The uids whose environment fp-qmail trusts when it runs setuid (besides root). Fixed
# here, at build time: nothing a caller sets can name another file.
TRUSTED_UIDS = "/etc/fp-qmail/trusted-uids"
TRUSTED_UIDS_MAX = 64 << 10

DEFAULTS = {
    "FP_QMAIL_LOGLEVEL": "4",
    "FP_QMAIL_CONF": "/etc/f-prot.conf",
    "FP_QMAIL_SCANNER": "/run/fpqmail-scand/scand.sock",
    "FP_QMAIL_CONNECT_TIMEOUT": "5",
    "FP_QMAIL_TIMEOUT": "120",
    "FP_QMAIL_TMPDIR": "/tmp",
    "FP_QMAIL_GROUP_ACCESS": "no",
    "FP_QMAIL_QUEUE": "/var/qmail/bin/qmail-queue.orig",
    "FP_QMAIL_ON_VIRUS": "deliver",
    "FP_QMAIL_ON_ERROR": "tempfail",
    "FP_QMAIL_REJECT_TEXT": "This message contains a virus ({threats}) and was rejected (#5.7.1)",
    "FP_QMAIL_LOG_STDERR": "no",
    "FP_QMAIL_MAX_SIZE": "52428800",
}
# FP_QMAIL_ON_VIRUS, from the least strict to the strictest; a scanner's Action may ask
# for one of the last two, and the stricter of the two wins.
VIRUS_ACTIONS = ("deliver", "drop", "reject")
# Settings naming a file or a program: under setuid even a trusted caller's environment
# must not choose them, or a compromised qmail-smtpd could make us run or write
# something of its own as qmailq.
PATH_SETTINGS = ("FP_QMAIL_CONF", "FP_QMAIL_TMPDIR", "FP_QMAIL_QUEUE")


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
log_stderr = None  # not known before the environment is looked at: stderr too, as the launcher's lines
log_opened = False


def log(priority, text):
    global log_opened
    if priority > loglevel:
        return
    if not log_opened:
        options = syslog.LOG_PID | (0 if log_stderr is False else syslog.LOG_PERROR)
        syslog.openlog("fp-qmail", options, syslog.LOG_MAIL)
        log_opened = True
    syslog.syslog(priority, text)


# ---- signals ------------------------------------------------------------------------
# The interpreter may have set no disposition at all (a core-only start): fp-qmail sets
# every one it relies on first thing, and gives the caller's back just before the exec,
# so that qmail-queue.orig starts as it would have without us.

# What would kill fp-qmail and may come from outside: the handler removes the temp files
# and exits with a temporary failure.
HANDLED_SIGNALS = (_signal.SIGHUP, _signal.SIGINT, _signal.SIGQUIT, _signal.SIGABRT, _signal.SIGUSR1,
                   _signal.SIGUSR2, _signal.SIGALRM, _signal.SIGTERM, _signal.SIGSTKFLT, _signal.SIGXCPU,
                   _signal.SIGVTALRM, _signal.SIGPROF, _signal.SIGIO, _signal.SIGPWR)
# A write then fails with EPIPE or EFBIG instead, which names the cause.
IGNORED_SIGNALS = (_signal.SIGPIPE, _signal.SIGXFSZ)
# Faults the CPU raises for an instruction of ours: a handler could not resume them.
# Blocked, a real fault still kills at once (the kernel forces its default action),
# while the same signal sent with kill(2) waits; so do the realtime signals. What waits
# is delivered when the caller's mask comes back just before the exec, once the names
# are gone: the process dies of it, which qmail's callers take as a temporary failure.
BLOCKED_SIGNALS = {_signal.SIGILL, _signal.SIGTRAP, _signal.SIGBUS, _signal.SIGFPE, _signal.SIGSEGV,
                   _signal.SIGSYS, *range(_signal.SIGRTMIN, _signal.SIGRTMAX + 1)}
# Signals whose default action neither kills nor leaves anything (SIGCHLD, SIGWINCH,
# SIGURG, SIGCONT, the stop signals) keep the caller's disposition throughout.

dying = False
alarm_code = TIMED_OUT  # what our own alarm means now
alarm_due = 0.0         # when it rings (time.monotonic()); a SIGALRM before that was sent by someone


def set_alarm(seconds, code):
    global alarm_code, alarm_due
    alarm_code, alarm_due = code, time.monotonic() + seconds
    _signal.alarm(seconds)


def take_signals():
    """Set the dispositions fp-qmail relies on; return the caller's: [(signal, SIG_DFL or
    SIG_IGN)] and its signal mask, for hand_over to put back."""
    given = []
    for signum in HANDLED_SIGNALS + IGNORED_SIGNALS:
        current = _signal.getsignal(signum)  # as the interpreter found it (SIGINT: its own handler)
        ignored = current == _signal.SIG_IGN and not (STANDARD_START and signum in IGNORED_SIGNALS)
        given.append((signum, _signal.SIG_IGN if ignored else _signal.SIG_DFL))
        if signum in IGNORED_SIGNALS:
            if current != _signal.SIG_IGN:
                _signal.signal(signum, _signal.SIG_IGN)
        elif not ignored or signum == _signal.SIGALRM:
            # What the caller ignores stays ignored: it would not have stopped qmail-queue
            # either. SIGALRM is our own timer.
            _signal.signal(signum, on_signal)
    mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, BLOCKED_SIGNALS)
    return given, mask


def on_signal(signum, frame):
    """Raise the failure the signal means, once: the clean-up is never interrupted."""
    global dying
    if dying:
        return
    ours = signum == _signal.SIGALRM and time.monotonic() >= alarm_due - 0.1
    if ours and alarm_code == SCANNER_TIMED_OUT:  # scanner trouble, which FP_QMAIL_ON_ERROR may pass
        raise Fail(SCANNER_TIMED_OUT, "scanner: timed out (alarm)", scanner=True)
    dying = True
    if ours:
        raise Fail(TIMED_OUT, "timed out (alarm)")
    # A SIGALRM sent by the caller is not our timer: never scanner trouble.
    raise Fail(INTERRUPTED, "interrupted by signal %d" % signum)


# ---- settings ----------------------------------------------------------------------------

def caller_trusted(setuid, ruid, notes):
    """Whether the environment of whoever ran us counts: when we are not setuid, when the
    real uid is root's, or when it is listed in TRUSTED_UIDS (a root-owned file only
    root may write; anything else is ignored with a note for the log)."""
    if not setuid or ruid == 0:
        return True
    try:
        fd = posix.open(TRUSTED_UIDS, posix.O_RDONLY | posix.O_NOFOLLOW | posix.O_NONBLOCK | posix.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as e:
        notes.append("%s ignored: %s" % (TRUSTED_UIDS, e.strerror))
        return False
    try:
        info = posix.fstat(fd)
        if info.st_mode & 0o170000 != 0o100000 or info.st_uid != 0 or info.st_mode & 0o022:
            notes.append("%s ignored: it must be a regular file owned by root that only root may write"
                         % TRUSTED_UIDS)
            return False
        data = posix.read(fd, TRUSTED_UIDS_MAX + 1)
    except OSError as e:
        notes.append("%s ignored: %s" % (TRUSTED_UIDS, e.strerror))
        return False
    finally:
        posix.close(fd)
    if len(data) > TRUSTED_UIDS_MAX:
        notes.append("%s ignored: larger than %d bytes" % (TRUSTED_UIDS, TRUSTED_UIDS_MAX))
        return False
    trusted = False
    for line in data.split(b"\n"):
        for word in line.partition(b"#")[0].split():
            if not word.isdigit() or len(word) > 10:
                notes.append("%s: %r is not a uid, skipped" % (TRUSTED_UIDS, printable(word, 40)))
            elif int(word) == ruid:
                trusted = True
    return trusted


def load_settings(environ, setuid):
    """The settings from `environ` (a trusted caller's environment, else nothing), and
    /etc/f-prot.conf unless environ has FP_QMAIL_LOGLEVEL; environ wins key by key."""
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
    # The parser is imported only when the file must be read. No signal lands in the
    # middle of that import: it waits, and raises its Fail when the import is done.
    mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, HANDLED_SIGNALS)
    try:
        from fpqmail import shconf
    finally:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)
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


def reject_text(value):
    """The SMTP text of a reject, on one line."""
    text = value.replace("\r", "").replace("\n", "")
    if len(text) < REJECT_TEXT_MIN:
        raise ValueError("needs at least %d characters: qmail answers a shorter text with a "
                         "temporary error" % REJECT_TEXT_MIN)
    return text


# ---- the temp files ---------------------------------------------------------------------

def nameless_file(tmpdir):
    """A file with no name (O_TMPFILE): nothing to guess, nothing left behind."""
    try:
        return posix.open(tmpdir, posix.O_TMPFILE | posix.O_RDWR, 0o600)
    except OSError as e:
        if e.errno in (EOPNOTSUPP, EISDIR):
            raise Fail(WRITE_FAILED, "cannot create a nameless temp file in %s: its file system does "
                                     "not support O_TMPFILE" % tmpdir)
        raise Fail(WRITE_FAILED, "cannot create a temp file in %s: %s" % (tmpdir, e.strerror))


def group_access_allowed(tmpdir, setuid, ruid):
    """FP_QMAIL_GROUP_ACCESS=yes opens the named files to a group: only to the group of a
    setgid temp directory (which its owner chose: the files take it), never to the
    caller's own groups."""
    try:
        info = posix.stat(tmpdir)
    except OSError as e:
        raise Fail(WRITE_FAILED, "cannot create a temp file in %s: %s" % (tmpdir, e.strerror))
    if not info.st_mode & 0o2000:
        raise Fail(CONFIG_FAILED, "FP_QMAIL_GROUP_ACCESS=yes needs a setgid temp directory, whose group "
                                  "the files take: %s is not setgid" % tmpdir)
    if setuid and ruid != 0 and (info.st_gid == posix.getgid() or info.st_gid in posix.getgroups()):
        raise Fail(CONFIG_FAILED, "FP_QMAIL_GROUP_ACCESS=yes: the group of %s (gid %d) is one of the "
                                  "caller's own" % (tmpdir, info.st_gid))
    return True


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
        mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, HANDLED_SIGNALS)
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
            _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)
        if group_access:  # so a scanner in the directory's group can read fi and write fo
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


def copy(src, dst, what, limit=0):
    """Copy src to end of file into dst without growing memory: splice(2) when src is
    a pipe (no copy through user space), read/write otherwise. Returns the byte count.
    With a limit, what comes past it is read to end of file and thrown away (the
    caller's writes must go through for it to hear our exit code), never kept: the
    count returned is then over the limit."""
    total = 0
    try:
        while True:
            n = posix.splice(src, dst, CHUNK)
            if not n:
                return total
            total += n
            if limit and total > limit:
                dst = posix.open("/dev/null", posix.O_WRONLY | posix.O_CLOEXEC)
                limit = 0  # dst now discards: the rest costs a read, no disk
    except OSError as e:
        if e.errno != EINVAL or total:
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
        total += n
        if limit and total > limit:
            continue
        done = 0
        while done < n:
            try:
                done += posix.write(dst, view[done:n])
            except OSError as e:
                raise copy_failure(e, what)


def copy_failure(e, what):
    if e.errno in (ENOSPC, EDQUOT, EFBIG, EIO, EROFS):
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

def client_headers(environ):
    """Client-IP and Client-Host from qmail-smtpd's environment (a trusted caller's only):
    values of printable ASCII without spaces, at most CLIENT_HEADER_MAX bytes."""
    out = b""
    for header, variable in ((b"Client-IP", b"TCPREMOTEIP"), (b"Client-Host", b"TCPREMOTEHOST")):
        value = environ.get(variable, b"")
        if 0 < len(value) <= CLIENT_HEADER_MAX and all(0x21 <= c <= 0x7e for c in value):
            out += b"%s: %s\n" % (header, value)
    return out


def ask_scanner(endpoints, connect_timeout, deadline, request, fds):
    """Send the request to the first endpoint that accepts a connection; return the
    raw reply. request(family) gives the bytes for that kind of endpoint; on a unix
    socket the descriptors `fds` (In, Out) go with its first byte. Only a failed connect
    moves on to the next endpoint: once a scanner has the request it may be writing fo,
    so there is no second try."""
    failure = None
    for family, address, name in endpoints:
        try:  # fails for an IPv6 endpoint on a host without IPv6, or out of descriptors
            sock = _socket.socket(family, _socket.SOCK_STREAM)
        except OSError as e:
            failure = Fail(SCANNER_UNREACHABLE, "scanner %s: cannot make a socket: %s" % (name, e.strerror or e),
                           True)
            continue
        try:
            sock.settimeout(max(0.001, min(connect_timeout, deadline - time.monotonic())))
            sock.connect(address)
            break
        except TimeoutError:
            failure = Fail(SCANNER_TIMED_OUT, "scanner %s: connect timed out" % name, True)
        except OSError as e:
            failure = Fail(SCANNER_UNREACHABLE, "scanner %s: %s" % (name, e.strerror or e), True)
        sock.close()
    else:
        raise failure
    try:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        data = request(family)
        if family == _socket.AF_UNIX:
            rights = b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)  # an array of C ints
            sent = sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
            data = memoryview(data)[sent:]
        if data:  # (an empty send to a scanner that already answered and closed fails)
            sock.sendall(data)
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
            "REFUSED": ("reason",), "DEFERRED": ("reason",), "ERROR": ("reason",)}


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
    action = fields.get("action")
    if action is not None and (status != "INFECTED" or len(action) != 1 or action[0] not in VIRUS_ACTIONS[1:]):
        raise Fail(SCANNER_GARBLED, "scanner reply %s with Action %r" % (status, printable(",".join(action), 200)),
                   True)
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
    """Whether the caller gave us fd 6 open for writing: writing nothing to it succeeds
    (a pipe, as qmail-smtpd gives it, takes an empty write as nothing)."""
    try:
        posix.write(6, b"")
        return True
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


SCANNER_TROUBLE_TEXT = "message could not be scanned for viruses, try again later (#4.3.0)"


# ---- the message's way through, top to bottom -------------------------------------------

spool = []  # the temp file names that exist now: removed whatever happens
summary = {"sender": "?", "rcpts": "?", "size": "?", "threats": "-", "spam": ""}


def main():
    global dying
    summary["started"] = time.monotonic()
    fd6 = False
    # Everything in the try: once take_signals() has set on_signal, a signal may land at
    # any line, and its Fail must end here as an interruption, not escape as a bug.
    try:
        caller_signals = take_signals()
        set_alarm(86400, TIMED_OUT)
        posix.umask(0o077)
        # The caller may have closed 0, 1 or 2: our files must never take those numbers.
        # /dev/null write-only in their place makes reading 0 or 1 fail, as it should.
        for fd in (0, 1, 2):
            try:
                posix.get_inheritable(fd)  # fcntl(F_GETFD): EBADF if it is closed
            except OSError:
                posix.dup2(posix.open("/dev/null", posix.O_WRONLY), fd)
        fd6 = fd6_writable()  # before we open anything that could become fd 6
        code, verdict, reason = attempt(fd6, caller_signals)
    except BaseException as e:  # before attempt(), or as it began to handle a failure
        dying = True
        code, reason = failure(e, fd6)
        verdict = "failed"
    remove_names(spool)
    log_summary(verdict, "exit %d" % code, reason)
    posix._exit(code)


def attempt(fd6, caller_signals):
    """(exit code, verdict, reason) of a message refused, dropped or failed; a delivered
    one never comes back. Once it returns, no signal interrupts: the clean-up runs."""
    global dying
    try:
        outcome = scan_and_queue(fd6, caller_signals)
        dying = True
        return outcome
    except BaseException as e:
        dying = True
        code, reason = failure(e, fd6)
        return code, "failed", reason


VERDICT_PRIORITY = {"failed": syslog.LOG_ERR, "dropped": syslog.LOG_WARNING, "unscanned": syslog.LOG_WARNING}
NOT_SCANNED_BY_POLICY = "not scanned (policy)"


def log_summary(verdict, outcome, reason=None):
    """The one line per message: info for the usual, warning for what lets mail through
    unscanned (unless the scanner's policy said so) or drops it, err for a failure (with
    its cause). A message the scanner scored for spam has its Spam header in spam=."""
    priority = VERDICT_PRIORITY.get(verdict, syslog.LOG_INFO)
    if reason == NOT_SCANNED_BY_POLICY:  # the administrator's choice, not trouble
        priority = syslog.LOG_INFO
    log(priority, "sender=<%s> rcpts=%s size=%s verdict=%s threats=%s%s %s ms=%d%s" % (
        summary["sender"], summary["rcpts"], summary["size"], verdict, summary["threats"],
        " spam=" + summary["spam"] if summary["spam"] else "", outcome,
        (time.monotonic() - summary["started"]) * 1000, ": " + reason if reason else ""))


def failure(e, fd6):
    """(exit code, cause) for what went wrong."""
    if isinstance(e, Fail):
        if e.scanner:
            return refuse(fd6, e.code, b"Z", SCANNER_TROUBLE_TEXT), e.reason
        return e.code, e.reason
    if isinstance(e, MemoryError):
        return OUT_OF_MEMORY, "out of memory"
    if isinstance(e, KeyboardInterrupt):  # SIGINT before take_signals() replaced CPython's handler
        return INTERRUPTED, "interrupted by signal %d" % _signal.SIGINT
    return INTERNAL, "internal error: %s: %s" % (type(e).__name__, printable(str(e), 200))


def scan_and_queue(fd6, caller_signals):
    """Returns (exit code, verdict, reason) when the message is refused or dropped; on
    delivery it never returns: qmail-queue.orig replaces this process."""
    global loglevel, log_stderr
    ruid = posix.getuid()
    setuid = ruid != posix.geteuid() or posix.getgid() != posix.getegid()
    notes = []  # what to warn about once the log level is known
    environ = posix.environ if caller_trusted(setuid, ruid, notes) else {}
    # Until the settings are read, a failure to read them is logged as the environment says.
    log_stderr = environ.get(b"FP_QMAIL_LOG_STDERR", b"").decode("latin-1") in values.TRUE_WORDS
    settings, problems = load_settings(environ, setuid)
    log_stderr = setting(settings, "FP_QMAIL_LOG_STDERR", values.flag)
    loglevel = setting(settings, "FP_QMAIL_LOGLEVEL", values.number, 0, 7, int)
    for note in notes:
        log(syslog.LOG_WARNING, note)
    for path, line, problem in problems:
        log(syslog.LOG_WARNING, "%s line %d skipped: %s" % (path, line, printable(problem, 200)))
    endpoints = setting(settings, "FP_QMAIL_SCANNER", values.endpoints)
    connect_timeout = setting(settings, "FP_QMAIL_CONNECT_TIMEOUT", values.number, 0.001, 86400)
    timeout = setting(settings, "FP_QMAIL_TIMEOUT", values.number, 0.001, 86400)
    tmpdir = setting(settings, "FP_QMAIL_TMPDIR", values.absolute_path)
    group_access = setting(settings, "FP_QMAIL_GROUP_ACCESS", values.flag)
    queue = setting(settings, "FP_QMAIL_QUEUE", values.absolute_path)
    on_virus = setting(settings, "FP_QMAIL_ON_VIRUS", choice, VIRUS_ACTIONS)
    on_error = setting(settings, "FP_QMAIL_ON_ERROR", choice, ("tempfail", "pass"))
    text = setting(settings, "FP_QMAIL_REJECT_TEXT", reject_text)
    max_size = setting(settings, "FP_QMAIL_MAX_SIZE", values.number, 0, 1 << 50, int)

    # 1. The message, then the envelope: qmail's callers write them in that order. A
    # unix-socket scanner gets the files as descriptors: they need no name. Over TCP the
    # request must name them.
    if any(family != _socket.AF_UNIX for family, _, _ in endpoints):
        if group_access:
            group_access_allowed(tmpdir, setuid, ruid)
        fi, fi_fd, fo, fo_fd = create_spool(tmpdir, group_access, spool)
    else:
        fi = fo = None
        fi_fd = nameless_file(tmpdir)
        fo_fd = nameless_file(tmpdir)
    size = summary["size"] = copy(0, fi_fd, "the message", max_size)
    data = read_envelope()
    code, length = check_envelope(data)
    if code:
        raise Fail(code, "bad envelope (%s)" % {
            READ_FAILED: "ended early", ENVELOPE_FORMAT: "format error",
            ADDRESS_TOO_LONG: "address too long"}[code])
    envelope = data[:length]
    summary["sender"] = printable(envelope[1:envelope.index(b"\0")], 200)
    summary["rcpts"] = envelope.count(b"\0") - 2
    if max_size and size > max_size:  # permanent, as qmail-smtpd's own databytes limit
        said = "message size exceeds the limit of %d bytes (#5.3.4)" % max_size
        return refuse(fd6, REJECTED, b"D", said), "refused", said

    # 2. The scan.
    head = b"FPQMAIL/1 SCAN\nSize: %d\nEnvelope: %d\n" % (size, len(envelope))
    tail = b"On-Virus: %s\nCaller: %d\n%s\n%s" % (on_virus.encode(), ruid, client_headers(environ), envelope)

    def request(family):
        if family == _socket.AF_UNIX:
            return head + tail
        return head + b"In: %s\nOut: %s\n" % (fi.encode(), fo.encode()) + tail

    deliver_fd = fo_fd
    reason = None
    try:
        set_alarm(int(timeout) + 2, SCANNER_TIMED_OUT)  # belt and braces: a hostname lookup has no timeout
        try:
            reply = ask_scanner(endpoints, connect_timeout, time.monotonic() + timeout, request, (fi_fd, fo_fd))
        finally:
            set_alarm(86400, TIMED_OUT)
        status, fields = parse_reply(reply)
        if status == "ERROR":
            raise Fail(SCANNER_FAILED, "scanner error: %s" % printable(fields["reason"][0], 200), True)
        if status in ("CLEAN", "CLEANED"):
            announced_size(fields, fo_fd)
    except Fail as f:
        if not f.scanner or on_error != "pass":
            raise
        status, fields, reason = "UNSCANNED", {}, "not scanned: " + f.reason
        deliver_fd = unscanned_copy(tmpdir, fi_fd, f.reason)

    # 3. What the verdict means for this message. REFUSED and DEFERRED are the scanner's
    # rules speaking, not scanner trouble: FP_QMAIL_ON_ERROR has no say.
    if fields.get("spam"):
        summary["spam"] = printable(fields["spam"][0], 200)
    if status in ("REFUSED", "DEFERRED"):
        said = printable(fields["reason"][0], 200)
        if status == "REFUSED":
            return refuse(fd6, REJECTED, b"D", said), "refused", "the scanner refused it: " + said
        return refuse(fd6, DEFERRED, b"Z", said), "deferred", "the scanner deferred it: " + said
    if fields.get("threat"):
        summary["threats"] = ", ".join(printable(t, 100) for t in fields["threat"])
    if status == "INFECTED" or (status == "CLEANED" and on_virus != "deliver"):
        # The scanner's policy may say what to do (Action): the stricter of it and ours.
        action = max(on_virus, fields.get("action", [on_virus])[0], key=VIRUS_ACTIONS.index)
        if action == "drop":
            return 0, "dropped", None
        return refuse(fd6, REJECTED, b"D", text.replace("{threats}", summary["threats"])), "rejected", None
    if status == "CLEAN" and fields.get("scanned", [""])[0].startswith("no"):
        status, reason = "UNSCANNED", NOT_SCANNED_BY_POLICY

    # 4. Hand over: fd 0 the message to deliver, fd 1 the envelope as received.
    hand_over(deliver_fd, envelope, queue, caller_signals, status.lower(), reason)


def unscanned_copy(tmpdir, fi_fd, reason):
    """The original with one added header, in a new nameless file: fo may still be
    written by a scanner that we gave up on."""
    fd = nameless_file(tmpdir)
    try:
        posix.write(fd, b"X-Antivirus: not scanned (%s)\n" % printable(reason, 200).encode())
        posix.lseek(fi_fd, 0, 0)
    except OSError as e:
        raise Fail(WRITE_FAILED, "cannot make the unscanned copy: %s" % e.strerror)
    copy(fi_fd, fd, "the unscanned copy")
    return fd


def hand_over(deliver_fd, envelope, queue, caller_signals, verdict, reason):
    """exec qmail-queue.orig with fd 0 the message, fd 1 the envelope, fd 6 as the caller
    gave it, no other descriptor, and the caller's signal dispositions and mask."""
    try:
        envelope_fd = posix.memfd_create("envelope")
        done = 0
        while done < len(envelope):
            done += posix.write(envelope_fd, envelope[done:])
        posix.lseek(envelope_fd, 0, 0)
        posix.lseek(deliver_fd, 0, 0)
    except OSError as e:
        raise Fail(WRITE_FAILED, "cannot pass the envelope on: %s" % e.strerror)
    # From here to the exec no signal is taken. One that came already raises its Fail
    # here (pthread_sigmask runs pending handlers); one that comes later waits and is
    # delivered, at its default action, when the caller's mask comes back below.
    _signal.pthread_sigmask(_signal.SIG_BLOCK, _signal.valid_signals())
    remove_names(spool)  # before the exec: nothing is left even if qmail-queue.orig crashes
    if STANDARD_START:
        log(syslog.LOG_DEBUG, "the interpreter's start ignored SIGPIPE and SIGXFSZ: qmail-queue.orig "
                              "gets them at their defaults")
    log_summary(verdict, "to " + queue, reason)
    posix.dup2(deliver_fd, 0)
    posix.dup2(envelope_fd, 1)
    posix.closerange(3, 6)  # fd 6 stays as the caller gave it
    # CPython makes this one close_range(2) call: every descriptor from 7 up, however
    # high, whatever the limits the caller set.
    posix.closerange(7, FD_MAX)
    _signal.alarm(0)  # a pending alarm would survive the exec
    dispositions, mask = caller_signals
    for signum, disposition in dispositions:
        _signal.signal(signum, disposition)
    _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)
    try:
        posix.execv(queue, [queue])
    except OSError as e:
        raise Fail(EXEC_FAILED, "cannot run %s: %s" % (queue, e.strerror))
