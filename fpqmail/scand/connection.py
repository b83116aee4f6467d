"""One client connection, as the accepting thread sees it: who is on the other end,
the request being read (non-blocking, as bytes arrive), the reply being sent, and the
linger after it. Only server.py's loop thread touches a Connection; a complete
request leaves it as a Job, the only thing a worker gets.

A connection costs a descriptor and a small buffer while its request is read: the
head (at most the protocol's limits) and then the envelope, read straight into one
buffer of the announced size. Both are counted in the daemon's Budget.

On a unix socket the peer's credentials come from SO_PEERCRED, and the two files
travel as descriptors with the request's first byte (docs/protocol.md): the first read
takes exactly one byte, so that the descriptors that come with it are those of the
first byte; every later read takes whatever descriptors come along too, and closes
them (a descriptor is never left open in the daemon, whatever the client sends).
"""

import array
import os
import secrets
import socket
import struct
import threading

from . import protocol
from .protocol import ProtocolError

READ_TIMEOUT = 10.0      # seconds from accept for the whole request (fp-qmail sends it at once)
HEAD_CHUNK = 16384       # bytes asked of one recv while the head is read
READ_SLICE = 1 << 20     # bytes read from one connection before the loop turns to others
MAX_FDS = 8              # descriptors one read takes in; more are cut (and closed) by the kernel
LINGER = 2.0             # seconds to wait for a client to close after an early reply
LINGER_BYTES = 1 << 20   # and the most of its unread request to swallow meanwhile
SEND_TIMEOUT = 10.0      # seconds for a client to take its reply

_FDS_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_UCRED = struct.Struct("3i")

# States
READING, PINGING, WORKING, REPLYING, LINGERING, CLOSED = (
    "reading", "pinging", "working", "replying", "lingering", "closed")


class Probe(Exception):
    """Closed without sending a byte: a port probe, not worth a warning."""


class OverBudget(Exception):
    """The request does not fit in what the daemon may buffer now: answer busy."""


class Connection:
    def __init__(self, sock, unix, address, now, timeout):
        self.sock = sock
        self.unix = unix
        self.accepted = now
        self.deadline = now + timeout                       # the request's time limit
        self.read_until = min(self.deadline, now + READ_TIMEOUT)
        self.state = READING
        self.events = 0          # what the selector watches for (server.py)
        self.wake_at = None      # the pending timer (server.py)
        self.request = None      # once its head is read
        self.job = None          # once it is complete (a SCAN)
        if unix:
            pid, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            self.pid, self.uid = pid, uid
            self.peer = f"uid {uid}"               # what per-peer limits count by
            self.name = f"uid {uid} pid {pid}"     # for the log
        else:
            self.pid = self.uid = None
            self.peer = address[0]
            self.name = f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"
        self._head = protocol.HeadReader()
        self._head_counted = 0   # head bytes counted in the budget
        self._envelope = None    # bytearray of the announced size, once the head is read
        self._got = 0
        self._envelope_counted = 0
        self._fds = []           # In, Out as received (unix)
        self._first = True
        self._last = 0           # bytes the last read got
        self._outbuf = b""
        self._swallowed = 0
        self.fully_read = False

    # ---- reading ------------------------------------------------------------------

    def read(self, budget, clients):
        """Read what has arrived (at most READ_SLICE bytes, then the loop serves others);
        the Request once it is complete, else None. Raises Probe, OverBudget or
        ProtocolError (the Reason for the ERROR reply), OSError if the client is gone."""
        taken = 0
        while taken < READ_SLICE:
            try:
                got = self._read_once(budget, clients)
            except BlockingIOError:
                return None
            if got is not None:
                return got
            taken += self._last
        return None

    def _read_once(self, budget, clients):
        if self._envelope is None:
            data = self._recv(1 if self.unix and self._first else HEAD_CHUNK)
            self._last = len(data)
            if not data:
                if self._first:
                    raise Probe()
                raise ProtocolError("malformed request: connection closed before the blank line")
            self._first = False
            request = self._head.feed(data)
            self._count_head(budget)
            if self.unix and self._head.command == protocol.SCAN and self.uid not in clients:
                raise ProtocolError(f"uid {self.uid} may not ask for scans")
            if request is None:
                return None
            self._release_head(budget)
            return self._start_envelope(request, budget)
        view = memoryview(self._envelope)
        received = self._last = self._recv_into(view[self._got:])
        if not received:
            raise ProtocolError("malformed request: connection closed inside the envelope")
        self._got += received
        return self._complete() if self._got == len(self._envelope) else None

    def _start_envelope(self, request, budget):
        self.request = request
        if request.command == protocol.PING:
            self.close_fds()
            self.fully_read = not self._head.rest
            return request
        if self.unix:
            if request.in_path is not None:
                raise ProtocolError("In and Out are named: on a unix socket they are passed as descriptors")
            if len(self._fds) != 2:
                raise ProtocolError("no descriptors: In and Out come with the request's first byte")
        elif request.in_path is None:
            raise ProtocolError("malformed request: missing In, Out")
        rest = self._head.rest
        if len(rest) > request.envelope_size:
            raise ProtocolError("malformed request: more bytes than Envelope announced")
        if not budget.take(request.envelope_size):
            raise OverBudget()
        self._envelope_counted = request.envelope_size
        self._envelope = bytearray(request.envelope_size)
        self._envelope[:len(rest)] = rest
        self._got = len(rest)
        return self._complete() if self._got == request.envelope_size else None

    def _complete(self):
        self.fully_read = True
        return self.request

    def take_job(self):
        """The complete SCAN request as a Job for a worker; the Job now owns the
        descriptors and the envelope (and its share of the budget)."""
        scan_id = (os.path.basename(self.request.in_path)[2:] if self.request.in_path
                   else f"{self.pid}.{secrets.token_hex(8)}")
        job = Job(self, self.request, self._envelope, tuple(self._fds), self._envelope_counted, scan_id)
        self._fds, self._envelope, self._envelope_counted = [], None, 0
        self.job = job
        return job

    def _count_head(self, budget):
        more = self._head.buffered - self._head_counted
        if more > 0:
            if not budget.take(more):
                raise OverBudget()
            self._head_counted += more
        # the reader drops its buffer once the head is whole: nothing more to count

    def _release_head(self, budget):
        budget.give(self._head_counted)
        self._head_counted = 0

    def _recv(self, size):
        if not self.unix:
            return self.sock.recv(size)
        data, ancillary, flags, _ = self.sock.recvmsg(size, _FDS_SPACE, socket.MSG_CMSG_CLOEXEC)
        self._take_fds(ancillary, flags, first=self._first)
        return data

    def _recv_into(self, view):
        if not self.unix:
            return self.sock.recv_into(view)
        received, ancillary, flags, _ = self.sock.recvmsg_into([view], _FDS_SPACE, socket.MSG_CMSG_CLOEXEC)
        self._take_fds(ancillary, flags, first=False)
        return received

    def _take_fds(self, ancillary, flags, first):
        fds = _descriptors(ancillary)
        if first:
            self._fds = fds
        else:
            _close_all(fds)
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("more descriptors than In and Out")
        if fds and not first:
            raise ProtocolError("descriptors that did not come with the request's first byte")
        if first and len(fds) not in (0, 2):
            raise ProtocolError(f"{len(fds)} descriptors, not 2 (In and Out)")

    # ---- replying -------------------------------------------------------------------

    def start_reply(self, reply):
        self._outbuf = reply

    def send(self) -> bool:
        """Send what the client can take now; True once all of it went and the write
        side is shut. Raises OSError if the client is gone."""
        while self._outbuf:
            try:
                sent = self.sock.send(self._outbuf)
            except BlockingIOError:
                return False
            self._outbuf = self._outbuf[sent:]
        self.sock.shutdown(socket.SHUT_WR)
        return True

    def swallow(self) -> bool:
        """While lingering: read and drop what the client still sends; True once it
        closed, sent too much, or is gone."""
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return False
        except OSError:
            return True
        self._swallowed += len(data)
        return not data or self._swallowed >= LINGER_BYTES

    # ---- closing --------------------------------------------------------------------

    def close_fds(self):
        _close_all(self._fds)
        self._fds = []

    def close(self, budget):
        """Close the socket and whatever the connection still holds (not its Job)."""
        self.state = CLOSED
        self.close_fds()
        self._release_head(budget)
        if self._envelope_counted:
            budget.give(self._envelope_counted)
            self._envelope_counted = 0
        self._envelope = None
        self.sock.close()


class Job:
    """A complete SCAN request, handed from the loop to a worker.

    Exactly one reply is sent for it: the worker's, or the loop's ERROR time limit when
    the deadline came first. claim() decides which, once."""

    def __init__(self, conn, request, envelope, fds, counted, scan_id):
        self.conn = conn
        self.request = request
        self.envelope = envelope    # raw bytes (bytearray), not yet checked
        self.fds = fds              # (In, Out) received on a unix socket, or ()
        self.counted = counted      # bytes of the budget this job holds
        self.scan_id = scan_id
        self.peer = conn.name
        self.deadline = conn.deadline
        self.accepted = conn.accepted
        self.key = _fairness_key(request, conn)
        self._claimed = False
        self._lock = threading.Lock()

    @property
    def claimed(self):
        """Whether the reply is decided (a worker may skip a job the loop answered)."""
        return self._claimed

    def claim(self) -> bool:
        with self._lock:
            if self._claimed:
                return False
            self._claimed = True
            return True

    def release(self, budget):
        """Give back the descriptors and the buffer (idempotent)."""
        _close_all(self.fds)
        self.fds = ()
        self.envelope = None
        if self.counted:
            budget.give(self.counted)
            self.counted = 0


def _fairness_key(request, conn):
    """Whom the workers are shared between: the SMTP client if the client named it, else
    the user who ran fp-qmail, else the peer."""
    if request.client_ip:
        return "client " + request.client_ip
    if request.caller is not None:
        return f"uid {request.caller}"
    return conn.peer


def _descriptors(ancillary):
    fds = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            numbers = array.array("i")
            numbers.frombytes(data[:len(data) - len(data) % numbers.itemsize])
            fds.extend(numbers)
    return fds


def _close_all(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
