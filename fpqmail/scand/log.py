"""Logging for the daemon and its tool: syslog (facility mail) and stderr, one line each.

Levels are syslog priorities, as in every F-PROT *_LOGLEVEL setting: a line is logged
when its priority is at most the configured level (0 emerg .. 7 debug).
"""

import logging
import sys
import syslog

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
