"""The controller: the listening socket, the workers, the time limits and the signals.

The main thread accepts connections, hands them to a fixed number of worker threads
through a queue, answers `ERROR busy` at once when workers and queue are full,
answers `ERROR time limit` for a request past its deadline (counted from accept, so
waiting in the queue counts), and handles signals between two of those:

- SIGTERM, SIGINT: stop accepting, let every accepted request finish or reach its
  deadline, exit 0.
- SIGHUP: read the config file again and build new engines (or reload the signatures
  of unchanged ones); requests in flight keep the runtime they started with.

Workers run handler.handle(); the main thread never waits on a client or an engine.
"""

import heapq
import itertools
import os
import queue
import selectors
import signal
import socket
import stat
import threading
import time

from . import handler, log, protocol
from .engines import EngineError, make_engine
from .examine import Limits, examine
from .janitor import Janitor
from .log import logger
from .quarantine import Store, StoreError
from fpqmail import values

from .settings import RESTART_ONLY, SettingsError

LINGER = 2.0            # seconds to wait for a client to close after an early reply
LINGER_BYTES = 1 << 20  # and the most of its unread request to swallow meanwhile
SEND_TIMEOUT = 10.0     # seconds for a worker to hand a reply to a slow client
BUSY = protocol.error_reply("busy")
TIME_LIMIT = protocol.error_reply("time limit")


class Runtime:
    """What a request is served with; replaced whole on SIGHUP."""

    def __init__(self, settings, engines, quarantine, backup, mappable_owners, limits):
        self.settings = settings
        self.engines = engines
        self.limits = limits
        self.quarantine = quarantine
        self.backup = backup
        self.mappable_owners = mappable_owners

    def examine(self, message, fd, deadline):
        return examine(message, fd, self.engines, deadline, self.limits)


def _engine_settings(settings):
    return {k: v for k, v in settings.raw.items() if k.startswith("FP_SCAND_")}


def build_runtime(settings, previous=None) -> Runtime:
    """Engines and stores for settings; raises SettingsError for anything unusable.

    Engines are kept (and told to reload their signatures) when neither the engine list
    nor any FP_SCAND_* setting changed, else built anew."""
    engine_settings = _engine_settings(settings)
    limits = Limits.from_settings(settings.raw)
    if previous and previous.settings.engines == settings.engines and \
            _engine_settings(previous.settings) == engine_settings:
        engines = previous.engines
        for engine in engines:
            try:
                engine.reload()
            except EngineError as e:
                logger.error("engine %s: reload failed, it keeps its old signatures: %s", engine.name, e)
    else:
        engines = []
        for spec in settings.engines:
            try:
                engines.append(make_engine(spec, engine_settings))
            except (ValueError, EngineError) as e:
                raise SettingsError(f"engine {spec}: {e}") from None
    # Only to tell the administrator early; in a thread of its own, because a hung
    # engine must not stop the main thread from accepting and enforcing time limits.
    threading.Thread(target=_ping, args=(engines,), name="ping", daemon=True).start()
    if not os.path.isdir(settings.tmpdir):
        raise SettingsError(f"FP_SCAND_TMPDIR={settings.tmpdir}: not a directory")
    stores = []
    for directory in (settings.quarantine, settings.backup):
        try:
            stores.append(Store(directory).create() if directory else None)
        except (OSError, StoreError) as e:
            raise SettingsError(f"{directory}: cannot use as a store: {e}") from None
    return Runtime(settings, engines, stores[0], stores[1], _mappable_owners(), limits)


def _ping(engines):
    for engine in engines:
        try:
            engine.ping()
        except EngineError as e:
            logger.warning("engine %s does not answer now (requests fail until it does): %s", engine.name, e)


def _mappable_owners():
    """Users whose files we map: root, ourselves and qmailq (fp-qmail's user), who do
    not truncate a file under a scan. Anyone else's In is read into memory instead."""
    owners = {0, os.geteuid()}
    try:
        import pwd
        owners.add(pwd.getpwnam("qmailq").pw_uid)
    except KeyError:
        pass
    return frozenset(owners)


class Connection:
    """One accepted client. Exactly one reply is ever sent on it: the worker's, or the
    main thread's ERROR when the deadline passed first."""

    def __init__(self, sock, peer, deadline):
        self.sock = sock
        self.peer = peer
        self.deadline = deadline
        self.fully_read = False
        self._lock = threading.Lock()
        self._answered = False

    def recv(self, size, until):
        """Bytes from the client, waiting until `until` (monotonic) at most."""
        remaining = until - time.monotonic()
        if remaining <= 0:
            raise handler.Refused(self._late(until))
        self.sock.settimeout(remaining)
        try:
            return self.sock.recv(size)
        except TimeoutError:
            raise handler.Refused(self._late(until)) from None
        except OSError as e:
            raise handler.Refused(f"connection failed: {e.strerror}") from None

    def _late(self, until):
        return "time limit" if until >= self.deadline else "request not received in time"

    def expired(self):
        return self._answered or time.monotonic() >= self.deadline

    def answer(self, reply) -> bool:
        """Send reply unless one was sent already; True if this one went out."""
        with self._lock:
            if self._answered:
                return False
            self._answered = True
            try:
                self.sock.settimeout(SEND_TIMEOUT)
                self.sock.sendall(reply)
                self.sock.shutdown(socket.SHUT_WR)
            except OSError as e:
                logger.warning("cannot reply to %s: %s", self.peer, e.strerror or e)
            return True

    def expire(self):
        """From the main thread: answer ERROR time limit unless a reply is under way."""
        if not self._lock.acquire(blocking=False):
            return  # the worker is replying right now
        try:
            if self._answered:
                return
            self._answered = True
            try:
                self.sock.send(TIME_LIMIT, socket.MSG_DONTWAIT)
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        finally:
            self._lock.release()
        logger.warning("request from %s: time limit reached, answered ERROR", self.peer)

    @property
    def answered(self):
        return self._answered

    def close(self):
        """Close; a client whose request was not read to its end is given time to read
        the reply first (closing with unread input would reset the connection)."""
        if not self.fully_read:
            try:
                self.sock.settimeout(LINGER)
                swallowed = 0
                while swallowed < LINGER_BYTES:
                    data = self.sock.recv(65536)
                    if not data:
                        break
                    swallowed += len(data)
            except OSError:
                pass
        self.sock.close()


class Server:
    def __init__(self, settings, runtime, reload_settings):
        self.runtime = runtime
        self._reload_settings = reload_settings  # () -> Settings, for SIGHUP
        self._limit = settings.workers + settings.queue
        self._listener, self._unix_path = _listen(settings)
        self._queue = queue.SimpleQueue()
        self._in_flight = 0           # accepted and not yet finished by a worker
        self._count_lock = threading.Lock()
        self._deadlines = []          # heap of (deadline, seq, Connection)
        self._seq = itertools.count()
        self._selector = selectors.DefaultSelector()
        self._lingering = {}          # busy-refused socket -> time to give up on it
        self._stopping = False
        self._workers = [threading.Thread(target=self._work, name=f"worker-{n}", daemon=True)
                         for n in range(settings.workers)]
        self._janitor = Janitor(lambda: self.runtime)

    @property
    def address(self):
        return self._listener.getsockname()

    def serve(self) -> int:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda *_: None)  # the wakeup fd carries the number
        self._listener.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(wake_r, selectors.EVENT_READ)
        for worker in self._workers:
            worker.start()
        self._janitor.start()
        log.notice("listening on %s with %d workers, queue %d, engines %s",
                      _describe(self.address), len(self._workers), self._limit - len(self._workers),
                      ", ".join(e.name for e in self.runtime.engines))
        try:
            while not (self._stopping and self._all_answered()):
                timeout = self._next_timeout()
                for key, _ in self._selector.select(timeout):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj == wake_r:
                        self._signals(os.read(wake_r, 64))
                    else:
                        self._linger(key.fileobj)
                self._expire_due()
        finally:
            self._shut_down()
            signal.set_wakeup_fd(-1)
            os.close(wake_r)
            os.close(wake_w)
        return 0

    # ---- main thread ------------------------------------------------------------

    def _accept(self):
        for _ in range(64):  # then look at signals and deadlines again
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of descriptors, a reset before accept...
                logger.error("accept failed: %s", e.strerror)
                return
            if self._in_flight >= self._limit:
                self._refuse_busy(sock)
                continue
            conn = Connection(sock, _describe(peer) if peer else "unix", time.monotonic() + self.runtime.settings.timeout)
            with self._count_lock:
                self._in_flight += 1
            heapq.heappush(self._deadlines, (conn.deadline, next(self._seq), conn))
            self._queue.put(conn)

    def _refuse_busy(self, sock):
        logger.warning("busy: %d requests in flight, answered ERROR busy", self._in_flight)
        try:
            sock.send(BUSY, socket.MSG_DONTWAIT)
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
        except OSError:
            sock.close()
            return
        self._lingering[sock] = time.monotonic() + LINGER
        self._selector.register(sock, selectors.EVENT_READ)

    def _linger(self, sock):
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop_lingering(sock)

    def _drop_lingering(self, sock):
        self._selector.unregister(sock)
        del self._lingering[sock]
        sock.close()

    def _expire_due(self):
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            conn = heapq.heappop(self._deadlines)[2]
            conn.expire()
        for sock, give_up in list(self._lingering.items()):
            if give_up <= now:
                self._drop_lingering(sock)

    def _next_timeout(self):
        times = [self._deadlines[0][0]] if self._deadlines else []
        times += self._lingering.values()
        timeout = min(times) - time.monotonic() if times else None
        if self._stopping:  # look often whether the last request was answered
            timeout = 0.05 if timeout is None else min(timeout, 0.05)
        return None if timeout is None else max(timeout, 0)

    def _all_answered(self):
        # Deadlines are popped only when they pass; a connection still in the heap
        # unanswered is in flight.
        self._deadlines = [d for d in self._deadlines if not d[2].answered]
        heapq.heapify(self._deadlines)
        return not self._deadlines

    def _signals(self, numbers):
        for signum in numbers:
            if signum in (signal.SIGTERM, signal.SIGINT) and not self._stopping:
                log.notice("%s: no new requests; finishing %d in flight",
                              signal.Signals(signum).name, self._in_flight)
                self._stopping = True
                self._selector.unregister(self._listener)
                self._close_listener()
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
        self.runtime = runtime
        log.notice("SIGHUP: configuration and signatures reloaded; engines %s",
                      ", ".join(e.name for e in runtime.engines))

    def _close_listener(self):
        if self._unix_path:
            path, identity = self._unix_path
            try:  # remove the socket's name only if it is still ours
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) == identity:
                    os.unlink(path)
            except OSError:
                pass
        self._listener.close()

    def _shut_down(self):
        if not self._stopping:
            self._close_listener()
        self._janitor.stop()
        for sock in list(self._lingering):
            self._drop_lingering(sock)
        for _ in self._workers:
            self._queue.put(None)
        give_up = time.monotonic() + 1.0
        for worker in self._workers:  # idle ones leave at once; a stuck one is abandoned
            worker.join(max(0, give_up - time.monotonic()))
        log.notice("stopped")

    # ---- worker threads -----------------------------------------------------------

    def _work(self):
        while True:
            conn = self._queue.get()
            if conn is None:
                return
            try:
                if not conn.answered:
                    handler.handle(conn, self.runtime)
            except Exception as e:  # a bug of ours: the client still gets an answer
                logger.error("internal error on a request from %s: %r", conn.peer, e)
                logger.debug("traceback", exc_info=True)
                conn.answer(protocol.error_reply("internal error"))
            finally:
                conn.close()
                with self._count_lock:
                    self._in_flight -= 1


def _listen(settings):
    """The bound, listening socket, and for a unix socket (path, (st_dev, st_ino))."""
    family, address = values.endpoint(settings.listen, listen=True)
    unix = None
    backlog = max(128, settings.workers + settings.queue)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_UNIX:
            _remove_stale_socket(address)
            sock.bind(address)
            os.chmod(address, settings.socket_mode)
            st = os.lstat(address)
            unix = (address, (st.st_dev, st.st_ino))
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {settings.listen}: {e.strerror}") from None
    return sock, unix


def _remove_stale_socket(path):
    """A socket file left by a daemon that died is removed; a live one is an error."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(17, "exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(98, "another daemon is listening there")


def _describe(address):
    if isinstance(address, tuple):
        host, port = address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return address
