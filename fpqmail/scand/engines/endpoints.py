"""An engine's endpoints (unix socket paths, host:port, [v6]:port): the load spread over
them, failover within a request, and a back-off for an endpoint that fails.

A site with a farm of engine hosts lists them all (`clamd:10.0.0.5:3310,10.0.0.6:3310`)
and every daemon of every MX host spreads its requests over them:

- **Spread.** A request goes to the healthy endpoint with the fewest requests of this
  daemon in flight; of those, to the one used least recently (round robin among the
  healthy ones, however many are skipped), in an order drawn at random when the daemon
  starts, so that many daemons started together do not all begin with the first.
- **Failover.** A failure (refused, reset, timed out, an error reply) moves the request
  on to the next endpoint, until one completes it or the request's deadline passes.
- **Back-off.** An endpoint whose connection failed (refused, reset, silent past the
  timeout) is skipped for BACKOFF[0] seconds, doubled on every further failure in a row
  up to BACKOFF[1]; then requests try it again, and one success makes it healthy. An
  error *reply* does not count: the endpoint answered, the message was the trouble.
  Endpoints in back-off are still tried, last, when every healthy one failed: a request
  never fails without trying every endpoint there is time for.

Thread-safe: the daemon's worker threads share one Endpoints per engine; the lock is
held only to choose and to record, never during a conversation.
"""

import logging
import random
import socket
import threading
import time

from fpqmail import values

from . import EngineError
from .. import log
from ..log import logger

#: seconds an endpoint is skipped after its first failure in a row, and at most
BACKOFF = (5.0, 60.0)


class Endpoints:
    """A comma-separated list of endpoints of one engine."""

    def __init__(self, engine_name, spec, connect_timeout, timeout, allow_unix=True, backoff=BACKOFF):
        self.engine_name = engine_name
        self.addresses = [(family, address) for family, address, _ in values.endpoints(spec)]
        if not allow_unix and any(family == socket.AF_UNIX for family, _ in self.addresses):
            raise ValueError(f"{engine_name}: endpoints are host:port or [v6]:port")
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.backoff = backoff
        self._names = [address if family == socket.AF_UNIX else _host_port(address)
                       for family, address in self.addresses]
        self._lock = threading.Lock()
        self._used = random.sample(range(-len(self.addresses), 0), len(self.addresses))  # last use
        self._uses = 0
        self._in_flight = [0] * len(self.addresses)
        self._failures = [0] * len(self.addresses)   # connection failures in a row
        self._retry_at = [0.0] * len(self.addresses)  # monotonic end of the back-off

    def ask(self, conversation, deadline=None):
        """conversation(sock, is_unix) on one endpoint after another (in the order
        above) until one completes it; its result. Every blocking call on sock ends by
        the engine's timeout and by `deadline` (a time.monotonic() value), whichever
        comes first. EngineError naming every endpoint's problem when none succeeded."""
        problems = []
        for index in self._order():
            if deadline is not None and time.monotonic() >= deadline:
                problems.append("time limit reached")
                break
            family, address = self.addresses[index]
            outcome = "unknown"
            with self._lock:
                self._in_flight[index] += 1
                self._uses += 1
                self._used[index] = self._uses
            try:
                with _Connection(family, socket.SOCK_STREAM) as sock:
                    sock.deadline = deadline
                    sock.limit = self.connect_timeout
                    sock.connect(address)
                    sock.limit = self.timeout
                    result = conversation(sock, family == socket.AF_UNIX)
                outcome = "ok"
                return result
            except EngineError as e:
                outcome = "ok"  # it answered: the trouble was the request, not the endpoint
                problems.append(f"{self._names[index]}: {e}")
            except OSError as e:
                # Running out of the request's own time says nothing about the endpoint.
                if deadline is not None and time.monotonic() >= deadline:
                    problems.append(f"{self._names[index]}: time limit reached")
                else:
                    outcome = "failed"
                    problems.append(f"{self._names[index]}: " + (
                        "timed out" if isinstance(e, TimeoutError) else e.strerror or str(e)))
            finally:
                self._record(index, outcome, problems[-1] if outcome == "failed" else "")
        raise EngineError(f"{self.engine_name}: " + "; ".join(problems))

    def _order(self):
        """Every endpoint, in the order this request tries them: the healthy ones by load,
        then least recently used; then those in back-off, the soonest due first."""
        now = time.monotonic()
        with self._lock:
            return sorted(range(len(self.addresses)), key=lambda i: (
                (1, self._retry_at[i], 0) if self._retry_at[i] > now else (0, self._in_flight[i], self._used[i])))

    def _record(self, index, outcome, problem):
        """The end of one attempt: "ok" (the endpoint answered), "failed" (its
        connection failed: back off) or "unknown" (the request ran out of time)."""
        with self._lock:
            self._in_flight[index] -= 1
            failures = self._failures[index]
            if outcome == "ok":
                self._failures[index] = 0
                self._retry_at[index] = 0.0
            elif outcome == "failed":
                self._failures[index] = failures + 1
                pause = min(self.backoff[0] * 2 ** min(failures, 30), self.backoff[1])
                self._retry_at[index] = time.monotonic() + pause
        name = self._names[index]
        if outcome == "ok" and failures:
            log.notice("engine %s: endpoint %s answers again", self.engine_name, name)
        elif outcome == "failed":
            # One warning when it goes down; while it stays down, every retry only at debug.
            logger.log(logging.WARNING if not failures else logging.DEBUG,
                       "engine %s: endpoint %s failed (%s); skipped for %g s",
                       self.engine_name, name, problem[len(name) + 2:], pause)


class _Connection(socket.socket):
    """A socket whose every blocking call ends after `limit` seconds and by `deadline`
    (monotonic; None: no deadline), whichever comes first. Conversations use it like a
    plain socket (sendall, recv, makefile, socket.send_fds)."""

    __slots__ = ("deadline", "limit")

    def _arm(self):
        limit = self.limit
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("time limit reached")
            limit = min(limit, remaining)
        self.settimeout(limit)

    def connect(self, address):
        self._arm()
        return super().connect(address)

    def sendall(self, data, *flags):
        self._arm()
        return super().sendall(data, *flags)

    def sendmsg(self, *args):
        self._arm()
        return super().sendmsg(*args)

    def send(self, data, *flags):
        self._arm()
        return super().send(data, *flags)

    def recv(self, size, *flags):
        self._arm()
        return super().recv(size, *flags)

    def recv_into(self, buffer, *args):
        self._arm()
        return super().recv_into(buffer, *args)


def _host_port(address):
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
