"""The janitor: removes what a killed fp-qmail (SIGKILL, a crash, a power cut) leaves in
the temp directory, and what an interrupted store write leaves in a store's tmp/.

An fi/fo file counts as left behind when nothing changed it for FP_SCAND_STALE_AGE
seconds, longer than any scan may last: fp-qmail only ever waits FP_QMAIL_TIMEOUT for
its reply, then removes both names itself. Only names of fp-qmail's pattern
(fi<pid>.<random>, fo<pid>.<random>) that are regular files are touched; symlinks and
anything else are left alone, and nothing is followed (lstat, unlink of the name).
"""

import os
import stat
import threading
import time

from .log import logger
from .protocol import SPOOL_NAME



def sweep_tmpdir(tmpdir, stale_age, now=None) -> int:
    """Remove stale fi/fo files from tmpdir; return how many were removed."""
    limit = (time.time() if now is None else now) - stale_age
    removed = 0
    with os.scandir(tmpdir) as entries:
        for entry in entries:
            if not SPOOL_NAME.match(entry.name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode) or max(st.st_mtime, st.st_ctime) >= limit:
                    continue
                os.unlink(entry.path)
            except FileNotFoundError:
                continue  # fp-qmail removed it meanwhile, as it should
            except OSError as e:
                logger.warning("janitor: cannot remove %s: %s", entry.path, e.strerror)
                continue
            logger.info("janitor: removed %s, left behind %d s ago", entry.path, time.time() - st.st_mtime)
            removed += 1
    return removed


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
        runtime = self._runtime()
        settings = runtime.settings
        try:
            sweep_tmpdir(settings.tmpdir, settings.stale_age)
            for store in (runtime.quarantine, runtime.backup):
                if store:
                    store.sweep_temp(settings.stale_age)
        except OSError as e:
            logger.error("janitor: cannot sweep: %s", e)

    def stop(self):
        self._quit.set()
