"""A throwaway Debian system for the package test: a minimal bookworm made with
debootstrap from Debian's archive (kept as a tarball in CACHE, so only the first run
downloads), with the package's dependencies, a stand-in qmail tree and qmail's users.

qmail itself cannot be installed, so /var/qmail/bin/qmail-queue is the strict stand-in
of tests/qmail_queue_standin.py (run by the root's own python3), owned qmailq:qmail,
mode 4711 like the real one.
"""
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path("/var/cache/fp-qmail-tests/bookworm-minbase.tar")
MIRROR = "http://deb.debian.org/debian"
# The package's Depends (python3-cffi-backend: debootstrap does not resolve the virtual
# package python3-zstandard needs).
PACKAGES = "python3,python3-zstandard,python3-cffi-backend,adduser"
STANDIN = "/opt/qmail-standin/qmail_queue_standin.py"
DELIVERIES = "/var/tmp/qq"  # inside the root: where the stand-in records what it got


def run(*command, check=True, **kw):
    return subprocess.run([str(c) for c in command], check=check, capture_output=True,
                          text=True, **kw)


def ensure_cache():
    if CACHE.exists():
        return
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fpq-debootstrap-", dir="/var/tmp"))
    try:
        run("debootstrap", "--variant=minbase", "--include=" + PACKAGES, "bookworm",
            work / "root", MIRROR)
        partial = CACHE.with_name("%s.%d.partial" % (CACHE.name, os.getpid()))  # others may make it too
        run("tar", "-C", work / "root", "-cf", partial, ".")
        partial.rename(CACHE)
    finally:
        shutil.rmtree(work)


class DebRoot:
    def __init__(self):
        ensure_cache()
        self.path = Path(tempfile.mkdtemp(prefix="fpq-debroot-", dir="/var/tmp"))
        self.path.chmod(0o755)
        run("tar", "-C", self.path, "-xf", CACHE)
        self.proc_mounted = False

    def chroot(self, *command, check=True, **kw):
        return run("chroot", self.path, *command, check=check, **kw)

    def host(self, path):
        return self.path / str(path).lstrip("/")

    def ids(self, user, group):
        uid = int(self.chroot("id", "-u", user).stdout)
        gid = int(self.chroot("getent", "group", group).stdout.split(":")[2])
        return uid, gid

    def add_qmail(self):
        """qmail's users (some) and a stand-in bin/qmail-queue, as qmail's install makes them."""
        self.chroot("groupadd", "--system", "qmail")
        for user in ("qmailq", "qmaild", "alias"):  # (no qmails: the package must cope)
            self.chroot("useradd", "--system", "-g", "qmail", "-d", "/var/qmail", "-M",
                        "-s", "/usr/sbin/nologin", user)
        standin = self.host(STANDIN)
        standin.parent.mkdir(parents=True)
        shutil.copy(REPO / "tests" / "qmail_queue_standin.py", standin)
        standin.chmod(0o644)
        bin_dir = self.host("/var/qmail/bin")
        bin_dir.mkdir(parents=True)
        queue = bin_dir / "qmail-queue"
        # sh -p keeps the effective uid, as the real (C) qmail-queue would see it.
        queue.write_text("#!/bin/sh -p\n# stand-in for qmail's qmail-queue\n"
                         "QQ_SIGIGN=$(sed -n 's/^SigIgn:\\t//p' /proc/$$/status) "
                         "exec /usr/bin/python3 -S %s\n" % STANDIN)
        uid, gid = self.ids("qmailq", "qmail")
        os.chown(queue, uid, gid)
        queue.chmod(0o4711)
        (bin_dir / "qmail-inject").write_bytes(b"#!/bin/sh\nexit 111\n")
        (bin_dir / "qmail-inject").chmod(0o755)
        deliveries = self.host(DELIVERIES)
        deliveries.mkdir()
        deliveries.chmod(0o1777)

    def mount_proc(self):
        run("mount", "-t", "proc", "proc", self.host("/proc"))
        self.proc_mounted = True

    def close(self):
        if self.proc_mounted:
            run("umount", self.host("/proc"))
        shutil.rmtree(self.path)


def snapshot(directory):
    """path -> (kind, bytes or link target, uid, gid, mode) for a whole tree."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(directory):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            if p.is_symlink():
                content = ("link", os.readlink(p))
            elif p.is_file():
                content = ("file", p.read_bytes())
            else:
                content = ("dir", None)
            out[str(p.relative_to(directory))] = content + (st.st_uid, st.st_gid, st.st_mode)
    return out
