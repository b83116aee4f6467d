"""A scriptable Mail Scanner for tests: a real listening socket in a thread, speaking
docs/protocol.md and checking every request strictly.

By default it listens on a unix socket, as the real daemon does, and takes the files as
descriptors: it checks the peer with SO_PEERCRED, exactly two descriptors with the
request's first byte (and none after), no In/Out headers, In a readable regular file of
Size bytes, Out a writable empty regular file, and closes every descriptor it got.
`tcp=True` makes it listen on 127.0.0.1 and take the files by name (In/Out headers), the
seed's way.

`behaviour` decides what it does with each request; the named behaviours below cover
the faults fp-qmail must survive: verdicts, delays, garbage, disconnects, partial fo.
Each request it received is kept in `requests` (parsed) for assertions; anything fp-qmail
did against the protocol is in `violations` (the rig's teardown asserts it is empty).
"""
import fcntl
import os
import shutil
import socket
import stat
import struct
import tempfile
import threading
import time

HEADER = b"X-Antivirus: scanned by scanner-double\n"
ON_VIRUS = ("deliver", "reject", "drop")
OPTIONAL = ("on-virus", "caller", "client-ip", "client-host")
FDS_MAX = 16  # room to notice more descriptors than the protocol allows


class ProtocolViolation(AssertionError):
    pass


class Connection:
    """Reads a request from a socket; on a unix socket keeps the descriptors that came."""

    def __init__(self, conn, unix):
        self.conn = conn
        self.unix = unix
        self.fds = []          # every descriptor received: closed in close()
        self.first_fds = None  # those that came with the first byte

    def recv(self):
        if not self.unix:
            return self.conn.recv(65536)
        data, ancdata, flags, _ = self.conn.recvmsg(65536, socket.CMSG_SPACE(FDS_MAX * 4))
        got = []
        for level, kind, payload in ancdata:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                got += list(struct.unpack("%di" % (len(payload) // 4), payload[:len(payload) // 4 * 4]))
        self.fds += got
        if flags & socket.MSG_CTRUNC:
            raise ProtocolViolation("more descriptors than fit in %d" % FDS_MAX)
        if self.first_fds is None:
            self.first_fds = got
        elif got:
            raise ProtocolViolation("descriptors after the request's first byte: %d" % len(got))
        return data

    def close(self):
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def read_request(conn):
    """Parse one request as docs/protocol.md says, strictly. `conn` is a Connection."""
    data = b""
    while b"\n\n" not in data:
        chunk = conn.recv()
        if not chunk:
            raise ProtocolViolation("request ended before the blank line: %r" % data)
        data += chunk
    head, _, rest = data.partition(b"\n\n")
    lines = head.decode("ascii").split("\n")
    if lines[0] != "FPQMAIL/1 SCAN":
        raise ProtocolViolation("first line %r" % lines[0])
    fields = {}
    for line in lines[1:]:
        key, sep, value = line.partition(": ")
        if not sep or key.lower() in fields or not value.isprintable():
            raise ProtocolViolation("header line %r" % line)
        fields[key.lower()] = value
    required = {"size", "envelope"} if conn.unix else {"in", "out", "size", "envelope"}
    if not required <= set(fields) or set(fields) - required - set(OPTIONAL):
        raise ProtocolViolation("headers %r" % sorted(fields))
    if fields.get("on-virus", "deliver") not in ON_VIRUS or not fields.get("caller", "0").isdigit():
        raise ProtocolViolation("header values %r" % fields)
    length = int(fields["envelope"])
    while len(rest) < length:
        chunk = conn.recv()
        if not chunk:
            raise ProtocolViolation("envelope cut short")
        rest += chunk
    if len(rest) != length:
        raise ProtocolViolation("bytes after the envelope")
    request = {"size": int(fields["size"]), "envelope": rest,
               **{k: fields[k] for k in OPTIONAL if k in fields}}
    if conn.unix:
        request.update(descriptors(conn, request["size"]))
    else:
        request.update({"in": fields["in"], "out": fields["out"]})
        if os.path.getsize(request["in"]) != request["size"]:
            raise ProtocolViolation("Size does not match the In file")
        if os.path.getsize(request["out"]) != 0:
            raise ProtocolViolation("Out is not empty")
    return request


def descriptors(conn, size):
    """In and Out as the protocol demands them on a unix socket."""
    if conn.first_fds is None or len(conn.first_fds) != 2:
        raise ProtocolViolation("%s descriptors with the first byte, not 2" % (conn.first_fds and len(conn.first_fds)))
    in_fd, out_fd = conn.first_fds
    found = {}
    for name, fd, modes in (("in", in_fd, (os.O_RDONLY, os.O_RDWR)), ("out", out_fd, (os.O_WRONLY, os.O_RDWR))):
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ProtocolViolation("%s is not a regular file" % name)
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE not in modes:
            raise ProtocolViolation("%s is not open for %s" % (name, "reading" if name == "in" else "writing"))
        found[name + "_fd"] = fd
        found[name + "_links"] = info.st_nlink
    if os.fstat(in_fd).st_size != size:
        raise ProtocolViolation("Size does not match the In descriptor")
    if os.fstat(out_fd).st_size != 0:
        raise ProtocolViolation("Out is not empty")
    return found


def write_out(request, data):
    if "out_fd" in request:
        os.pwrite(request["out_fd"], data, 0)
        return len(data)
    with open(request["out"], "r+b") as f:
        f.write(data)
    return len(data)


def original(request):
    if "in_fd" in request:
        return os.pread(request["in_fd"], request["size"], 0)
    with open(request["in"], "rb") as f:
        return f.read()


# ---- behaviours: (conn, request) -> None --------------------------------------------

def clean(conn, request):
    size = write_out(request, HEADER + original(request))
    conn.sendall(b"FPQMAIL/1 CLEAN\nSize: %d\nEngines: double\n\n" % size)


def cleaned(*threats, body=b"X-Antivirus: cleaned\n\nthe virus was removed\n"):
    def behaviour(conn, request):
        size = write_out(request, body)
        conn.sendall(b"FPQMAIL/1 CLEANED\nSize: %d\n%s\n" % (
            size, b"".join(b"Threat: %s\n" % t.encode() for t in threats)))
    return behaviour


def infected(*threats):
    def behaviour(conn, request):
        conn.sendall(b"FPQMAIL/1 INFECTED\n%s\n" % b"".join(b"Threat: %s\n" % t.encode() for t in threats))
    return behaviour


def error(reason="engine down"):
    def behaviour(conn, request):
        conn.sendall(b"FPQMAIL/1 ERROR\nReason: %s\n\n" % reason.encode())
    return behaviour


def refused(reason="message larger than the scanner accepts (#5.3.4)", status=b"REFUSED"):
    """REFUSED (permanent) or, with status=b"DEFERRED", a temporary refusal."""
    def behaviour(conn, request):
        conn.sendall(b"FPQMAIL/1 %s\nReason: %s\n\n" % (status, reason.encode()))
    return behaviour


def answer(status, *headers):
    """The reply `status` with these (name, value) headers; CLEAN and CLEANED write fo
    (the original under HEADER) and announce its Size first."""
    def behaviour(conn, request):
        lines = [b"FPQMAIL/1 " + status.encode()]
        if status in ("CLEAN", "CLEANED"):
            lines.append(b"Size: %d" % write_out(request, HEADER + original(request)))
        lines += [b"%s: %s" % (name.encode(), value.encode()) for name, value in headers]
        conn.sendall(b"\n".join(lines) + b"\n\n")
    return behaviour


def raw(reply):
    """Send these exact bytes, whatever they are, then close."""
    def behaviour(conn, request):
        write_out(request, HEADER + original(request))
        conn.sendall(reply)
    return behaviour


def announce(size_delta=0, write=True):
    """CLEAN with a Size that is off by size_delta from what fo holds (or no fo written)."""
    def behaviour(conn, request):
        size = write_out(request, HEADER + original(request)) if write else len(HEADER) + request["size"]
        conn.sendall(b"FPQMAIL/1 CLEAN\nSize: %d\n\n" % (size + size_delta))
    return behaviour


def silent(conn, request):
    time.sleep(3600)


def close_mid_reply(conn, request):
    write_out(request, HEADER + original(request))
    conn.sendall(b"FPQMAIL/1 CLEAN\nSiz")


def endless(conn, request):
    while True:
        conn.sendall(b"X" * 65536)


def drip(reply_behaviour=clean, interval=1.0):
    """The reply of another behaviour, one byte per interval."""
    def behaviour(conn, request):
        class Dripper:
            def sendall(self, data):
                for i in range(len(data)):
                    conn.sendall(data[i:i + 1])
                    time.sleep(interval)
        reply_behaviour(Dripper(), request)
    return behaviour


def delayed(seconds, then=clean):
    def behaviour(conn, request):
        time.sleep(seconds)
        then(conn, request)
    return behaviour


class ScannerDouble:
    """unix_path: where to listen (default: a socket in a fresh directory under /tmp that
    every user can reach, so that a setuid fp-qmail connects too). peer_uids: the
    effective uids served (SO_PEERCRED; default any); others get ERROR, as from the
    real daemon."""

    def __init__(self, behaviour=clean, unix_path=None, tcp=False, peer_uids=None):
        self.directory = None
        self.unix = not tcp
        if tcp:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.bind(("127.0.0.1", 0))
            self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        else:
            if unix_path is None:
                self.directory = tempfile.mkdtemp(prefix="fpq-double-")
                os.chmod(self.directory, 0o755)
                unix_path = os.path.join(self.directory, "scand.sock")
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(unix_path)
            os.chmod(unix_path, 0o666)
            self.address = unix_path
        self.sock.listen(64)
        self.behaviour = behaviour
        self.peer_uids = peer_uids
        self.requests = []
        self.violations = []
        self.os_errors = []
        self.connections = 0
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, sock):
        conn = Connection(sock, self.unix)
        try:
            peer = None
            if self.unix:
                pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                   struct.calcsize("3i")))
                if pid <= 0:
                    raise ProtocolViolation("no peer credentials")
                peer = {"peer_pid": pid, "peer_uid": uid, "peer_gid": gid}
            request = read_request(conn)
            request.update(peer or {})
            self.requests.append(request)
            if peer and self.peer_uids is not None and peer["peer_uid"] not in self.peer_uids:
                sock.sendall(b"FPQMAIL/1 ERROR\nReason: peer uid %d not served\n\n" % peer["peer_uid"])
                return
            self.behaviour(sock, request)
        except ProtocolViolation as e:
            self.violations.append(str(e))
        except OSError as e:
            self.os_errors.append(e)  # the client gave up on us: what several behaviours provoke
        except Exception as e:  # a request the parser could not even take apart
            self.violations.append("%s: %s" % (type(e).__name__, e))
        finally:
            conn.close()
            sock.close()

    def close(self):
        self._stop = True
        self.sock.close()
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)
