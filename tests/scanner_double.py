"""A scriptable Mail Scanner for tests: a real listening socket in a thread, speaking
docs/protocol.md and checking every request strictly.

`behaviour` decides what it does with each request; the named behaviours below cover
the faults fp-qmail must survive: verdicts, delays, garbage, disconnects, partial fo.
Each request it received is kept in `requests` (parsed) for assertions.
"""
import os
import socket
import threading
import time

HEADER = b"X-Antivirus: scanned by scanner-double\n"


class ProtocolViolation(AssertionError):
    pass


def read_request(conn):
    """Parse one request as docs/protocol.md says, strictly."""
    data = b""
    while b"\n\n" not in data:
        chunk = conn.recv(65536)
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
        if not sep or key.lower() in fields:
            raise ProtocolViolation("header line %r" % line)
        fields[key.lower()] = value
    if set(fields) != {"in", "out", "size", "envelope"}:
        raise ProtocolViolation("headers %r" % sorted(fields))
    length = int(fields["envelope"])
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            raise ProtocolViolation("envelope cut short")
        rest += chunk
    if len(rest) != length:
        raise ProtocolViolation("bytes after the envelope")
    request = {"in": fields["in"], "out": fields["out"], "size": int(fields["size"]),
               "envelope": rest}
    if os.path.getsize(request["in"]) != request["size"]:
        raise ProtocolViolation("Size does not match the In file")
    if os.path.getsize(request["out"]) != 0:
        raise ProtocolViolation("Out is not empty")
    return request


def write_out(request, data):
    with open(request["out"], "r+b") as f:
        f.write(data)
    return len(data)


def original(request):
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
    def __init__(self, behaviour=clean, unix_path=None):
        if unix_path:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(unix_path)
            self.address = unix_path
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.bind(("127.0.0.1", 0))
            self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.sock.listen(64)
        self.behaviour = behaviour
        self.requests = []
        self.violations = []
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

    def _handle(self, conn):
        try:
            request = read_request(conn)
            self.requests.append(request)
            self.behaviour(conn, request)
        except ProtocolViolation as e:
            self.violations.append(str(e))
        except OSError:
            pass  # the client gave up on us: what several behaviours provoke
        finally:
            conn.close()

    def close(self):
        self._stop = True
        self.sock.close()
