"""The janitor: removes what a killed fp-qmail (SIGKILL, a crash, a power cut) leaves in
the temp directory, and what an interrupted store write leaves in a store's tmp/.

A file counts as left behind when nothing changed it (mtime and ctime) for
FP_SCAND_STALE_AGE seconds, longer than any scan may last: fp-qmail only ever waits
FP_QMAIL_TIMEOUT for its reply, then removes both names itself, and a store write
takes a moment. remove_stale() is the one sweep for both directories: only regular
files are touched (in the temp directory only names of fp-qmail's pattern,
fi<pid>.<random> and fo<pid>.<random>); symlinks and anything else are left alone,
and nothing is followed (lstat, then unlink of the name, both relative to the
directory's descriptor).
"""

import os
import stat
import threading
import time

from .log import logger
from .protocol import SPOOL_NAME
from .quarantine import StoreError


def remove_stale(dir_fd, where, stale_age, pattern=None, now=None) -> int:
    """Remove the stale regular files (whose names match pattern, if given) from the
    directory open at dir_fd; `where` names it in the log. Returns how many went."""
    now = time.time() if now is None else now
    limit = now - stale_age
    removed = 0
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            if pattern is not None and not pattern.match(entry.name):
                continue
            try:
                st = os.stat(entry.name, dir_fd=dir_fd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode) or max(st.st_mtime, st.st_ctime) >= limit:
                    continue
                os.unlink(entry.name, dir_fd=dir_fd)
            except FileNotFoundError:
                continue  # its owner removed or renamed it meanwhile, as it should
            except OSError as e:
                logger.warning("janitor: cannot remove %s: %s", os.path.join(where, entry.name), e.strerror)
                continue
            logger.info("janitor: removed %s, left behind %d s ago",
                        os.path.join(where, entry.name), now - st.st_mtime)
            removed += 1
    return removed


def sweep_tmpdir(tmpdir, stale_age, now=None) -> int:
    """Remove stale fi/fo files from fp-qmail's temp directory; return how many."""
    fd = os.open(tmpdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return remove_stale(fd, tmpdir, stale_age, SPOOL_NAME, now)
    finally:
        os.close(fd)


class Janitor(threading.Thread):
    """Sweeps at start and then every FP_SCAND_JANITOR_INTERVAL seconds."""

    def __init__(self, current_runtime):
        super().__init__(name="janitor", daemon=True)
        self._runtime = current_runtime  # () -> the server's runtime, reloaded on SIGHUP
        self._quit = threading.Event()

    def run(self):
        while True:
            settings = self._runtime().settings
            self.sweep()
            if self._quit.wait(settings.janitor_interval):
                return

    def sweep(self):
        """One sweep of every directory; one that fails is logged and the others swept."""
        runtime = self._runtime()
        settings = runtime.settings
        try:
            sweep_tmpdir(settings.tmpdir, settings.stale_age)
        except OSError as e:
            logger.error("janitor: cannot sweep %s: %s", settings.tmpdir, e.strerror or e)
        for store in (runtime.quarantine, runtime.backup):
            if store:
                try:
                    with store.temp_directory() as fd:
                        remove_stale(fd, store.temp_path, settings.stale_age)
                except (OSError, StoreError) as e:
                    logger.error("janitor: cannot sweep %s: %s", store.root, e)

    def stop(self):
        self._quit.set()
