"""The accepting thread and the workers: the listening sockets, the connections, the
time limits, the signals.

One thread (the loop) does every socket operation, non-blocking, around one selector:
it accepts, reads each request as its bytes arrive (connection.py), hands complete
requests to the workers through the FairQueue (dispatch.py), sends the replies and
lingers. A client that connects and sends nothing, or one byte now and then, costs a
descriptor and a small buffer until its 10 seconds are up, never a worker. Workers
only run handler.handle() on complete requests, and never touch a socket.

Limits, each with its outcome:
- FP_SCAND_CONNECTIONS connections still being read or answered, and
  FP_SCAND_PEER_CONNECTIONS of one peer: past them the oldest is closed (a client
  that sends its request at once, as fp-qmail does, is never the oldest);
- FP_SCAND_REQUEST_MEMORY bytes of heads and envelopes: past it, ERROR busy;
- FP_SCAND_QUEUE complete requests waiting for a worker: past it, ERROR busy for the
  newest of the caller with the longest line (dispatch.py);
- FP_SCAND_TIMEOUT from accept: ERROR time limit, and the worker abandons the request
  at its next deadline check (deadline.py).
- Out of descriptors (EMFILE, ENFILE) the loop stops accepting for a moment and closes
  the oldest pending connections, instead of spinning on accept.

Signals (through a wakeup pipe, so they are handled in the loop):
- SIGTERM, SIGINT: stop accepting, let every accepted request finish or reach its
  deadline, exit 0.
- SIGHUP: read the config file again and build new engines (or reload the signatures
  of unchanged ones); requests already handed to a worker keep the runtime they got.
"""

import collections
import errno
import heapq
import itertools
import logging
import os
import resource
import selectors
import signal
import socket
import threading
import time

from . import handler, listeners, log, protocol
from .connection import (LINGER, LINGERING, PINGING, READING, REPLYING, SEND_TIMEOUT, WORKING,
                         Connection, OverBudget, Probe)
from .dispatch import Budget, FairQueue
from .janitor import Janitor
from .log import logger
from .runtime import build_runtime, tcp_exposure
from .settings import RESTART_ONLY, SettingsError

BUSY = protocol.error_reply("busy")
ACCEPT_BATCH = 64        # accepts in a row before the loop looks at everything else
BACKOFF = 0.2            # seconds without accepting after EMFILE/ENFILE
BACKOFF_EVICT = 8        # pending connections closed then, to free descriptors
HEALTH_TTL = 1.0         # seconds a PING reuses the last health check
PING_TIMEOUT = 10.0      # seconds a PING waits for the engines' health check
FDS_PER_CONNECTION = 3   # its socket and, on a unix socket, In and Out
FDS_RESERVED = 64        # for the listeners, the log, engines' sockets, stores...
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Server:
    def __init__(self, settings, runtime, reload_settings):
        self.runtime = runtime
        self._reload_settings = reload_settings  # () -> Settings, for SIGHUP
        self._nofile = _raise_nofile_limit()
        self._listeners = listeners.open_all(settings, backlog=max(128, settings.connections))
        self._selector = selectors.DefaultSelector()
        self._queue = FairQueue()
        self._budget = Budget(settings.request_memory)
        self._conns = set()                            # every open connection
        self._pending = collections.OrderedDict()      # evictable ones (not with a worker), oldest first
        self._by_peer = collections.defaultdict(collections.OrderedDict)
        self._timers = []                              # heap of (time, seq, Connection)
        self._seq = itertools.count()
        self._finished = collections.deque()           # (Connection, reply) from the workers
        self._post_r, self._post_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pings = []                               # connections waiting for the health check
        self._health = None                            # (time, (problem, spam problem)) of the last check
        self._health_running = False
        self._backoff_until = None
        self._stopping = False
        self._max_connections = self._connection_cap(settings)
        self._workers = [threading.Thread(target=self._work, name=f"worker-{n}", daemon=True)
                         for n in range(settings.workers)]
        self._janitor = Janitor(lambda: self.runtime)

    @property
    def addresses(self):
        return [listener.address for listener in self._listeners]

    def serve(self) -> int:
        signal_r, signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(signal_w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda *_: None)  # the wakeup fd carries the number
        for listener in self._listeners:
            self._selector.register(listener.sock, selectors.EVENT_READ, listener)
        self._selector.register(signal_r, selectors.EVENT_READ, "signal")
        self._selector.register(self._post_r, selectors.EVENT_READ, "finished")
        for worker in self._workers:
            worker.start()
        self._janitor.start()
        settings = self.runtime.settings
        exposure = tcp_exposure(settings)
        if exposure:
            logger.warning("%s", exposure)
        log.notice("listening on %s with %d workers, queue %d, engines %s",
                   ", ".join(self.addresses), len(self._workers), settings.queue, _engine_names(self.runtime))
        next_flush = time.monotonic() + 1
        try:
            while not (self._stopping and self._all_done()):
                for key, mask in self._selector.select(self._timeout(next_flush)):
                    what = key.data
                    if isinstance(what, listeners.Listener):
                        self._accept(what)
                    elif what == "signal":
                        self._signals(os.read(signal_r, 64))
                    elif what == "finished":
                        self._replies_from_workers()
                    else:
                        self._ready(what, mask)
                now = time.monotonic()
                self._run_timers(now)
                if self._backoff_until is not None and now >= self._backoff_until:
                    self._resume_accepting()
                if now >= next_flush:
                    log.flush_throttled()
                    next_flush = now + 1
        finally:
            self._shut_down()
            signal.set_wakeup_fd(-1)
            os.close(signal_r)
            os.close(signal_w)
        return 0

    # ---- accepting ----------------------------------------------------------------

    def _accept(self, listener):
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in _OUT_OF_FDS:
                    self._back_off(e)
                else:  # the client reset it before we got to it: nothing to do
                    log.throttled("accept", logging.WARNING, "accept on %s failed: %s",
                                  listener.address, e.strerror)
                return
            sock.setblocking(False)
            try:
                conn = Connection(sock, listener.unix, address, time.monotonic(), self.runtime.settings.timeout)
            except OSError as e:  # gone before SO_PEERCRED
                sock.close()
                log.throttled("accept", logging.WARNING, "accept on %s failed: %s",
                              listener.address, e.strerror)
                continue
            self._conns.add(conn)
            self._make_pending(conn)
            self._limit_pending(conn.peer)
            self._set_timer(conn, conn.read_until)
            self._read(conn)  # fp-qmail's request is usually there already

    def _back_off(self, e):
        if self._backoff_until is not None:
            return
        for listener in self._listeners:
            self._selector.unregister(listener.sock)
        self._backoff_until = time.monotonic() + BACKOFF
        closed = 0
        while self._pending and closed < BACKOFF_EVICT:
            self._evict(next(iter(self._pending)), "out of descriptors")
            closed += 1
        log.throttled("backoff", logging.ERROR,
                      "accept failed: %s: not accepting for %g s, closed %d pending connections "
                      "(%d connections open)", e.strerror, BACKOFF, closed, len(self._conns))

    def _resume_accepting(self):
        self._backoff_until = None
        for listener in self._listeners:
            self._selector.register(listener.sock, selectors.EVENT_READ, listener)

    def _connection_cap(self, settings):
        """FP_SCAND_CONNECTIONS, or fewer if the descriptor limit cannot hold them
        beside the requests in work and waiting."""
        fits = (self._nofile - FDS_RESERVED) // FDS_PER_CONNECTION - settings.workers - settings.queue
        cap = max(1, min(settings.connections, fits))
        if cap < settings.connections:
            log.notice("FP_SCAND_CONNECTIONS=%d does not fit in %d descriptors: at most %d connections",
                       settings.connections, self._nofile, cap)
        return cap

    # ---- pending connections and their limits ---------------------------------------

    def _make_pending(self, conn):
        self._pending[conn] = None
        self._by_peer[conn.peer][conn] = None

    def _not_pending(self, conn):
        if self._pending.pop(conn, False) is None:
            peer = self._by_peer[conn.peer]
            del peer[conn]
            if not peer:
                del self._by_peer[conn.peer]

    def _limit_pending(self, peer):
        settings = self.runtime.settings
        mine = self._by_peer.get(peer, ())
        while len(mine) > settings.peer_connections:
            self._evict(next(iter(mine)), f"more than {settings.peer_connections} from {peer}")
        while len(self._pending) > self._max_connections:
            self._evict(next(iter(self._pending)), f"more than {self._max_connections} in all")

    def _evict(self, conn, why):
        log.throttled("evict", logging.WARNING, "closed the oldest pending connection (%s, %s): %s",
                      conn.name, conn.state, why)
        if conn.state in (READING, PINGING):
            try:
                conn.sock.send(BUSY, socket.MSG_DONTWAIT)
            except OSError:
                pass
        self._close(conn)

    # ---- one connection ---------------------------------------------------------------

    def _ready(self, conn, mask):
        if conn.state == READING:
            self._read(conn)
        elif conn.state == REPLYING:
            self._send(conn)
        elif conn.state == LINGERING:
            if conn.swallow():
                self._close(conn)

    def _read(self, conn):
        try:
            request = conn.read(self._budget, self.runtime.clients)
        except Probe:
            logger.debug("connection from %s closed without a request", conn.name)
            self._close(conn)
            return
        except OverBudget:
            log.throttled("memory", logging.WARNING,
                          "request from %s: %d bytes of requests buffered, the most FP_SCAND_REQUEST_MEMORY "
                          "allows: answered ERROR busy", conn.name, self._budget.used)
            self._reply(conn, BUSY)
            return
        except protocol.ProtocolError as e:
            log.throttled("refused " + str(e), logging.WARNING, "refused a request from %s: %s", conn.name, e)
            self._reply(conn, protocol.error_reply(str(e)))
            return
        except OSError as e:
            log.throttled("reset", logging.WARNING, "connection from %s failed: %s", conn.name,
                          e.strerror or e)
            self._close(conn)
            return
        if request is None:
            self._watch(conn, selectors.EVENT_READ)
        elif request.command == protocol.PING:
            self._ping(conn)
        else:
            self._dispatch(conn)

    def _dispatch(self, conn):
        job = conn.take_job()
        conn.state = WORKING
        self._not_pending(conn)
        self._watch(conn, 0)
        self._set_timer(conn, conn.deadline)
        dropped = self._queue.put(job, self.runtime.settings.queue)
        if dropped is not None:
            log.throttled("busy", logging.WARNING,
                          "busy: %d requests wait for a worker; answered ERROR busy to %s (%s)",
                          self.runtime.settings.queue, dropped.peer, dropped.key)
            dropped.claim()
            dropped.release(self._budget)
            self._reply(dropped.conn, BUSY)

    def _reply(self, conn, reply):
        """Send reply (non-blocking; the rest when the client takes it), then close, or
        linger if the request was not read to its end."""
        if conn.state == WORKING:
            self._make_pending(conn)
        conn.state = REPLYING
        conn.close_fds()
        conn.start_reply(reply)
        self._set_timer(conn, time.monotonic() + SEND_TIMEOUT)
        self._send(conn)

    def _send(self, conn):
        try:
            done = conn.send()
        except OSError:
            self._close(conn)
            return
        if not done:
            self._watch(conn, selectors.EVENT_WRITE)
        elif conn.fully_read:
            self._close(conn)
        else:  # closing now with unread input would reset the connection, reply and all
            conn.state = LINGERING
            self._watch(conn, selectors.EVENT_READ)
            self._set_timer(conn, time.monotonic() + LINGER)

    def _close(self, conn):
        self._watch(conn, 0)
        self._not_pending(conn)
        self._conns.discard(conn)
        conn.wake_at = None
        conn.close(self._budget)

    def _watch(self, conn, events):
        if events == conn.events:
            return
        if not conn.events:
            self._selector.register(conn.sock, events, conn)
        elif not events:
            self._selector.unregister(conn.sock)
        else:
            self._selector.modify(conn.sock, events, conn)
        conn.events = events

    # ---- time limits --------------------------------------------------------------------

    def _set_timer(self, conn, when):
        conn.wake_at = when
        heapq.heappush(self._timers, (when, next(self._seq), conn))

    def _timeout(self, next_flush):
        times = [next_flush]
        while self._timers and self._timers[0][2].wake_at != self._timers[0][0]:
            heapq.heappop(self._timers)  # a timer replaced by a later one, or closed
        if self._timers:
            times.append(self._timers[0][0])
        if self._backoff_until is not None:
            times.append(self._backoff_until)
        if self._stopping:
            times.append(time.monotonic() + 0.05)
        return max(0, min(times) - time.monotonic())

    def _run_timers(self, now):
        while self._timers and self._timers[0][0] <= now:
            when, _, conn = heapq.heappop(self._timers)
            if conn.wake_at != when:
                continue
            conn.wake_at = None
            if conn.state == READING:
                reason = "time limit" if conn.read_until >= conn.deadline else "request not received in time"
                log.throttled("late", logging.WARNING, "request from %s: %s, answered ERROR", conn.name, reason)
                self._reply(conn, protocol.error_reply(reason))
            elif conn.state == PINGING:
                self._pings.remove(conn)
                self._reply(conn, protocol.error_reply("health check did not finish in time"))
            elif conn.state == WORKING:
                self._expire(conn)
            else:  # replying or lingering too long
                self._close(conn)

    def _expire(self, conn):
        job = conn.job
        if not job.claim():
            return  # the worker's reply is on its way
        if self._queue.remove(job):
            job.release(self._budget)
        logger.warning("scan %s from %s: time limit reached, answered ERROR", job.scan_id, conn.name)
        self._reply(conn, handler.TIME_LIMIT)

    # ---- PING ----------------------------------------------------------------------------

    def _ping(self, conn):
        conn.state = PINGING
        self._watch(conn, 0)
        now = time.monotonic()
        if self._queue.full(self.runtime.settings.queue):
            self._reply(conn, BUSY)
        elif self._health and now - self._health[0] < HEALTH_TTL:
            self._reply(conn, self._pong(self._health[1]))
        else:
            self._pings.append(conn)
            self._set_timer(conn, now + PING_TIMEOUT)
            if not self._health_running:
                self._health_running = True
                threading.Thread(target=self._check_health, args=(self.runtime,), name="health",
                                 daemon=True).start()

    def _check_health(self, runtime):
        problem = runtime.health()
        self._post(None, (problem, runtime.spam_health() if problem is None else None))

    def _pong(self, health):
        """PONG when every virus engine answers. A spam engine that does not is only
        reported (Spam: unknown (why)): mail still flows, as the policy's spam-down says."""
        problem, spam_problem = health
        if problem:
            return protocol.error_reply(problem)
        headers = [("Engines", ",".join(e.name for e in self.runtime.virus_engines))]
        if self.runtime.spam:
            headers.append(("Spam", f"unknown ({spam_problem})" if spam_problem else
                            f"ok ({self.runtime.spam_engine.name})"))
        return protocol.format_reply("PONG", headers)

    # ---- workers ---------------------------------------------------------------------------

    def _work(self):
        while True:
            job = self._queue.take()
            if job is None:
                return
            try:
                if not job.claimed:  # else the loop answered it already (time limit)
                    reply, line = handler.handle(job, self.runtime)
                    if job.claim():
                        if line:
                            logger.info("%s", line)
                        self._post(job.conn, reply)
                    elif line:
                        logger.warning("scan %s: finished after the time limit; the ERROR reply stands",
                                       job.scan_id)
            except Exception as e:  # a bug of ours: the client still gets an answer
                logger.error("internal error on a request from %s: %r", job.peer, e)
                logger.debug("traceback", exc_info=True)
                if job.claim():
                    self._post(job.conn, protocol.error_reply("internal error"))
            finally:
                job.release(self._budget)
                self._queue.done(job)

    def _post(self, conn, reply):
        """From a worker (or the health check): hand a reply to the loop."""
        self._finished.append((conn, reply))
        try:
            os.write(self._post_w, b"\0")
        except BlockingIOError:
            pass  # the loop has wakeups pending already

    def _replies_from_workers(self):
        try:
            os.read(self._post_r, 4096)
        except BlockingIOError:
            pass
        while self._finished:
            conn, reply = self._finished.popleft()
            if conn is None:  # the health check
                self._health = (time.monotonic(), reply)
                self._health_running = False
                for waiting in self._pings:
                    if waiting.state == PINGING:  # not closed meanwhile
                        self._reply(waiting, self._pong(reply))
                self._pings = []
            elif conn.state == WORKING:
                self._reply(conn, reply)

    # ---- signals, reload, stop --------------------------------------------------------------

    def _signals(self, numbers):
        for signum in numbers:
            if signum in (signal.SIGTERM, signal.SIGINT) and not self._stopping:
                log.notice("%s: no new requests; finishing %d connections",
                           signal.Signals(signum).name, len(self._conns))
                self._stopping = True
                for listener in self._listeners:
                    if self._backoff_until is None:
                        self._selector.unregister(listener.sock)
                    listener.close()
                self._listeners = []
                self._backoff_until = None
            elif signum == signal.SIGHUP and not self._stopping:
                self._reload()

    def _reload(self):
        old = self.runtime.settings
        try:
            settings = self._reload_settings()
            runtime = build_runtime(settings, self.runtime)
        except SettingsError as e:
            logger.error("SIGHUP: reload failed, the running configuration stays: %s", e)
            return
        changed = [k for k in RESTART_ONLY if settings.raw.get(k) != old.raw.get(k)]
        if changed:
            logger.warning("SIGHUP: %s changed: takes effect only after a restart", ", ".join(changed))
        log.set_level(settings.loglevel)
        self._budget.limit = settings.request_memory
        self._max_connections = self._connection_cap(settings)
        self.runtime = runtime
        log.notice("SIGHUP: configuration and signatures reloaded; engines %s; policy %s",
                   _engine_names(runtime), settings.policy or "none")

    def _all_done(self):
        """While stopping: every connection answered (lingering ones do not count)."""
        return all(conn.state == LINGERING for conn in self._conns)

    def _shut_down(self):
        for listener in self._listeners:
            listener.close()
        self._janitor.stop()
        for conn in list(self._conns):
            if conn.state == WORKING and conn.job.claim() and self._queue.remove(conn.job):
                conn.job.release(self._budget)
            self._close(conn)
        self._queue.close()
        give_up = time.monotonic() + 1.0
        for worker in self._workers:  # idle ones leave at once; a stuck one is abandoned
            worker.join(max(0, give_up - time.monotonic()))
        log.notice("stopped")


def _engine_names(runtime):
    names = [engine.name for engine in runtime.virus_engines]
    if runtime.spam:
        names.append(runtime.spam_engine.name + " (spam)")
    return ", ".join(names)


def _raise_nofile_limit():
    """Raise the soft limit of descriptors to the hard one; the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            logger.warning("cannot raise the descriptor limit from %d to %d: %s", soft, hard, e)
    return soft
