"""Logging for the daemon and its tool: syslog (facility mail) and stderr, one line each.

Levels are syslog priorities, as in every F-PROT *_LOGLEVEL setting: a line is logged
when its priority is at most the configured level (0 emerg .. 7 debug).

What a stranger can make happen as often as he likes (a refused connection, a failed
accept) is logged through throttled(): at most one line per kind and THROTTLE seconds,
and the next one says how many were left out, so a flood cannot flood the log.
"""

import logging
import sys
import syslog
import threading
import time

NOTICE = 25  # between INFO and WARNING, as syslog's LOG_NOTICE
logging.addLevelName(NOTICE, "NOTICE")

_PRIORITY = {logging.DEBUG: syslog.LOG_DEBUG, logging.INFO: syslog.LOG_INFO,
             NOTICE: syslog.LOG_NOTICE, logging.WARNING: syslog.LOG_WARNING,
             logging.ERROR: syslog.LOG_ERR, logging.CRITICAL: syslog.LOG_CRIT}
_LEVEL = {7: logging.DEBUG, 6: logging.INFO, 5: NOTICE, 4: logging.WARNING, 3: logging.ERROR}

logger = logging.getLogger("fpqmail.scand")


class _Syslog(logging.Handler):
    def emit(self, record):
        try:
            syslog.syslog(_PRIORITY.get(record.levelno, syslog.LOG_ERR), self.format(record))
        except Exception:  # logging must never take a request down with it
            self.handleError(record)


def setup(ident, loglevel, stderr=True):
    """Send the `fpqmail.scand` logger to syslog (mail) and, if asked, stderr."""
    syslog.openlog(ident, syslog.LOG_PID, syslog.LOG_MAIL)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handlers = [_Syslog()]
    if stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
        handlers[-1].setFormatter(logging.Formatter(f"{ident}[%(process)d]: %(levelname)s: %(message)s"))
    for handler in handlers:
        logger.addHandler(handler)
    logger.propagate = False
    set_level(loglevel)


def notice(message, *args):
    logger.log(NOTICE, message, *args)


def set_level(loglevel):
    logger.setLevel(_LEVEL.get(loglevel, logging.DEBUG if loglevel > 7 else logging.CRITICAL))


THROTTLE = 10.0  # seconds


class _Throttle:
    def __init__(self):
        self._lock = threading.Lock()
        self._kinds = {}  # kind -> [window end, lines left out, level, sample message]

    def log(self, kind, level, message, *args):
        now = time.monotonic()
        with self._lock:
            state = self._kinds.get(kind)
            if state is not None and now < state[0]:
                state[1] += 1
                return
            left_out = state[1] if state else 0
            self._kinds[kind] = [now + THROTTLE, 0, level, message % args if args else message]
        if left_out:
            message += " (and %d more like it in the last %d s)" % (left_out, THROTTLE)
        logger.log(level, message, *args)

    def flush(self):
        """Say how many lines of a kind were left out once its window has passed."""
        now = time.monotonic()
        with self._lock:
            ended = [(kind, state) for kind, state in self._kinds.items() if now >= state[0]]
            for kind, _ in ended:
                del self._kinds[kind]
        for kind, (_, left_out, level, sample) in ended:
            if left_out:
                logger.log(level, "%d more like \"%s\" in the last %d s", left_out, sample, THROTTLE)


_throttle = _Throttle()


def throttled(kind, level, message, *args):
    """Log at level (logging.WARNING...), at most once per kind and THROTTLE seconds."""
    _throttle.log(kind, level, message, *args)


def flush_throttled():
    """Called now and then by the server's loop: report what throttled() left out."""
    _throttle.flush()
