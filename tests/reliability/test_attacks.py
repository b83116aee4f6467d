"""Setuid attacks (issue 6, section 4). As root, the binary is installed setuid to a
test owner (the stand-in for qmailq, mode 4711 as the seed installs it) in a
root-owned directory, and run by another user (nobody) who prepares whatever a local
user can: programs, Python modules, shared objects and config files of theirs,
their environment, descriptors, limits, signals, argv, the current directory, and
objects planted in the shared temp directory. Nothing may run the caller's code or
write a file the caller chose with the owner's rights; each attempt ends in a clean
temporary failure or is ignored (the message is delivered as usual).

The caller is not a trusted uid: its environment counts for nothing, and the
administrator's /etc/f-prot.conf decides. That file lives in a /etc private to each run
(conftest.PrivateEtc): the machine's is never touched. The scanner is a TCP one, so that
the files have names: the temp directory is sticky and world-writable, like the default
/tmp, so the caller can plant names in it.
"""
import os
import pwd
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import scanner_double as sd
from conftest import (MESSAGE, TESTS, UNDER_TEST, PrivateEtc, Rig, become, ensure_user, envelope,
                      install_setuid_binary, standin_executable, then)
from scand_fixtures import EICAR

from .checks import SUCCESS, TEMPORARY, kind
from .conftest import CALLER, OWNER, SYSTEM_PYTHON, predictable_names, remove_all

pytestmark = pytest.mark.skipif(UNDER_TEST != "binary", reason=(
    "setuid attacks are about the installed binary: a Python script cannot be setuid "
    "(run them with FPQMAIL_UNDER_TEST=binary, as make test and make reliability do)"))
attack = pytest.mark.attack

EVIL_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
/* Proof of execution: a file named after the effective uid it ran with. */
__attribute__((constructor)) static void pwn(void) {
    char path[4096];
    snprintf(path, sizeof path, "%s/pwned-by-so-euid-%d", DROP, (int)geteuid());
    close(open(path, O_WRONLY | O_CREAT, 0666));
}
void *PyInit__codecs_jp(void) { pwn(); return 0; }
void *PyInit__multibytecodec(void) { pwn(); return 0; }
"""


class World:
    """The installed binary, its owner's files, and the caller's arsenal."""

    def __init__(self, root, scanner_address):
        self.owner = ensure_user(OWNER)
        self.caller = pwd.getpwnam(CALLER)
        self.root = root
        self.rig = Rig(root)
        self.rig.tmpdir.chmod(0o1777)                       # like /tmp
        os.chown(self.rig.queue_dir, self.owner.pw_uid, self.owner.pw_gid)
        self.rig.queue_dir.chmod(0o700)
        shutil.copy(TESTS / "qmail_queue_standin.py", root / "qmail_queue_standin.py")
        queue = standin_executable(root, python=SYSTEM_PYTHON)
        # -I: the stand-in plays a C program, deaf to the caller's PYTHON* variables
        # (which fp-qmail passes on with the rest of the environment).
        queue.write_text(queue.read_text().replace(str(TESTS / "qmail_queue_standin.py"),
                                                   str(root / "qmail_queue_standin.py"))
                         .replace(" -S ", " -I -S "))
        assert " -I -S " in queue.read_text()
        self.rig.queue = queue
        self.binary = install_setuid_binary(root, self.owner)
        # The owner's own files: what a confused deputy would overwrite.
        self.home = root / "owner-home"
        self.home.mkdir(mode=0o700)
        os.chown(self.home, self.owner.pw_uid, self.owner.pw_gid)
        self.precious = self.home / "precious"
        self.precious.write_bytes(b"the owner's data")
        os.chown(self.precious, self.owner.pw_uid, self.owner.pw_gid)
        self.precious.chmod(0o600)
        # The caller's directory (theirs, 0755) and a drop box anyone may write: code
        # of the caller's that ran, as whoever, leaves a file there.
        self.mine = root / "caller"
        self.mine.mkdir(mode=0o755)
        self.drop = self.mine / "drop"
        self.drop.mkdir()
        self.drop.chmod(0o777)
        self._arsenal()
        for p in [self.mine, *self.mine.rglob("*")]:
            if p != self.drop:
                os.lchown(p, self.caller.pw_uid, self.caller.pw_gid)
        self.scanner_address = scanner_address
        self.etc = PrivateEtc(root)
        self.rig.env = {"PATH": "/usr/bin:/bin", "QQ_STANDIN_DIR": str(self.rig.queue_dir)}

    def _arsenal(self):
        python_payload = ("import os\nopen(%r %% os.geteuid(), 'w').close()\n"
                          % str(self.drop / "pwned-by-python-euid-%d"))
        self.evil_program = self.mine / "evil-queue"
        self.evil_program.write_text("#!/bin/sh -p\ntouch %s/pwned-by-program-euid-$(id -u)\ncat >/dev/null\n"
                                     % self.drop)
        self.evil_program.chmod(0o755)
        self.evil_py = self.mine / "startup.py"
        self.evil_py.write_text(python_payload)
        # Modules a Python run from this directory or this PYTHONPATH would import.
        self.pythonpath = self.mine / "pylib"
        for name in ("fpqmail/__init__.py", "fpqmail/queue.py", "fpqmail/shconf.py", "syslog.py",
                     "fcntl.py", "errno.py", "time.py", "encodings/__init__.py", "sitecustomize.py",
                     "usercustomize.py", "evilwarn.py", "_socket.py"):
            for base in (self.pythonpath, self.mine):
                path = base / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(python_payload)
        # A fake PYTHONHOME whose stdlib is all payload.
        self.home_lib = self.mine / "home" / "lib" / "python3.11"
        for name in ("encodings/__init__.py", "os.py", "site.py", "codecs.py", "io.py", "abc.py"):
            path = self.home_lib / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(python_payload)
        # Shared objects under the names the binary could load.
        src = self.mine / "evil.c"
        src.write_text(EVIL_C)
        self.evil_so = self.mine / "evil.so"
        subprocess.run(["gcc", "-shared", "-fPIC", "-DDROP=\"%s\"" % self.drop, "-o", str(self.evil_so), str(src)],
                       check=True)
        self.libdir = self.mine / "lib"
        self.libdir.mkdir()
        for name in ("libz.so.1", "libm.so.6", "libexpat.so.1", "libc.so.6", "_codecs_jp.so",
                     "_multibytecodec.so"):
            shutil.copy(self.evil_so, self.libdir / name)
        self.evil_conf = self.mine / "evil.conf"
        self.evil_conf.write_text("FP_QMAIL_QUEUE=%s\nFP_QMAIL_TMPDIR=%s\nFP_QMAIL_LOGLEVEL=7\n"
                                  % (self.evil_program, self.drop))

    def configure(self, **more):
        """The administrator's /etc/f-prot.conf."""
        settings = dict(FP_QMAIL_QUEUE=self.rig.queue, FP_QMAIL_TMPDIR=self.rig.tmpdir,
                        FP_QMAIL_SCANNER=self.scanner_address, FP_QMAIL_LOGLEVEL=7, FP_QMAIL_LOG_STDERR="yes",
                        FP_QMAIL_TIMEOUT=3)
        settings.update(more)
        self.etc.put("f-prot.conf", "".join("%s='%s'\n" % kv for kv in settings.items()))

    def snapshot(self):
        """What the caller and the owner have on disk, to compare after an attack."""
        return {str(p): (p.lstat().st_ino, p.lstat().st_size, p.lstat().st_mtime_ns)
                for p in [self.precious, *self.mine.rglob("*")]}

    def run(self, env=None, command=None, preexec=None, as_caller=True, **kw):
        setup = then(self.etc.enter, become(CALLER) if as_caller else None, preexec)
        return self.rig.run(env=env, command=command or [str(self.binary)], preexec=setup, **kw)


@pytest.fixture
def world():
    if os.geteuid() != 0:
        raise RuntimeError("the setuid attacks install a setuid binary: run them as root")
    root = Path(tempfile.mkdtemp(prefix="fpq-attack-", dir="/var/tmp"))
    root.chmod(0o755)
    scanner = sd.ScannerDouble(sd.clean, tcp=True)
    try:
        w = World(root, scanner.address)
        w.scanner = scanner
        w.configure()
        w.before = w.snapshot()
        yield w
        w.rig.close()
        left = sorted(p.name for p in w.rig.tmpdir.iterdir())
        assert left == [], "files left in the temp directory: %r" % left
        assert w.snapshot() == w.before, "the caller's or the owner's files changed"
        assert sorted(os.listdir(w.drop)) == [], "the caller's code ran: %r" % os.listdir(w.drop)
        assert w.precious.read_bytes() == b"the owner's data"
        assert scanner.violations == []
    finally:
        scanner.close()
        shutil.rmtree(root)


def clean_outcome(world, r, expect=None):
    """Ignored (delivered as usual, as the owner) or a clean temporary failure."""
    outcome = kind(r)
    if expect:
        assert outcome == expect, r
    assert outcome in (SUCCESS, TEMPORARY), r
    if outcome == SUCCESS:
        [(message, env, state)] = r.delivered
        assert (message, env) == (sd.HEADER + MESSAGE, envelope())
        assert state["uid"] == world.caller.pw_uid and state["euid"] == world.owner.pw_uid
    else:
        assert r.delivered == []
    return outcome


def test_the_payloads_prove_execution_where_nothing_protects(world, tmp_path):
    """The control: the caller's program, Python modules and shared object do leave
    their proof when run plainly (not setuid), so their absence above means something."""
    plain = world.root / "plain"
    shutil.copytree(world.binary.parent, plain)
    (plain / world.binary.name).chmod(0o755)
    os.chown(plain / world.binary.name, 0, 0)
    plain_lib = plain / "lib"  # PYTHONPATH with only the caller's module in it
    plain_lib.mkdir()
    shutil.copy(world.pythonpath / "evilwarn.py", plain_lib)
    runs = [
        ([str(plain / world.binary.name)], {"LD_PRELOAD": str(world.evil_so)}, "pwned-by-so-euid-%d"),
        ([str(world.evil_program)], {}, "pwned-by-program-euid-%d"),
        ([SYSTEM_PYTHON, "-B", "-c", "import evilwarn"], {"PYTHONPATH": str(plain_lib)}, "pwned-by-python-euid-%d"),
        ([SYSTEM_PYTHON, "-B", "-i"], {"PYTHONSTARTUP": str(world.evil_py)}, "pwned-by-python-euid-%d"),
    ]
    for command, env, proof in runs:
        subprocess.run(command, env=dict(env, PATH="/usr/bin:/bin"), stdin=subprocess.DEVNULL,
                       capture_output=True, preexec_fn=become(CALLER), timeout=30)
        assert os.listdir(world.drop) == [proof % world.caller.pw_uid], (command, os.listdir(world.drop))
        os.unlink(world.drop / os.listdir(world.drop)[0])
    shutil.rmtree(plain)
    world.before = world.snapshot()  # the drop box's time stamp changed, nothing else


# ---- the environment ---------------------------------------------------------------------

PATHS = {
    "FP_QMAIL_QUEUE": lambda w: str(w.evil_program), "FP_QMAIL_CONF": lambda w: str(w.evil_conf),
    "FP_QMAIL_TMPDIR": lambda w: str(w.drop), "FP_QMAIL_SCANNER": lambda w: str(w.mine / "scanner.sock"),
}


@attack("FP_QMAIL_* paths from the environment")
@pytest.mark.parametrize("variable", sorted(PATHS))
def test_path_setting_from_the_environment_is_ignored(world, variable):
    r = world.run(env={variable: PATHS[variable](world)})
    clean_outcome(world, r, SUCCESS)
    assert [q["in"].startswith(str(world.rig.tmpdir) + "/fi") for q in world.scanner.requests] == [True]


PYTHON_VARIABLES = [
    "PYTHONPATH={pythonpath}", "PYTHONHOME={mine}/home", "PYTHONSTARTUP={startup} PYTHONINSPECT=1",
    "PYTHONINSPECT=1", "PYTHONWARNINGS=error::evilwarn.Evil PYTHONPATH={pythonpath}",
    "PYTHONPYCACHEPREFIX={drop}", "PYTHONUSERBASE={mine} PYTHONNOUSERSITE=",
    "PYTHONPLATLIBDIR=../../../../../..{mine}", "PYTHONEXECUTABLE={mine}/python",
    "PYTHONBREAKPOINT=evilwarn.x PYTHONPATH={pythonpath}", "PYTHONIOENCODING=cp932",
    "PYTHONIOENCODING=cp932 LD_LIBRARY_PATH={lib}", "LD_PRELOAD={evil_so}", "LD_LIBRARY_PATH={lib}",
    "LD_AUDIT={evil_so}", "GCONV_PATH={mine}", "PYTHONVERBOSE=2", "PYTHONDEBUG=1",
    "PYTHONTRACEMALLOC=5 PYTHONDUMPREFS=1", "PYTHONPROFILEIMPORTTIME=1", "PYTHONCASEOK=1",
    "PYTHONDEVMODE=1", "PYTHONMALLOC=debug", "PYTHONMALLOC=malloc", "PYTHONIOENCODING=rot13",
    "PYTHONHASHSEED=0", "PYTHONUTF8=1 LC_ALL=ja_JP.SJIS",
]


def expand(world, spec):
    values = {"pythonpath": world.pythonpath, "mine": world.mine, "startup": world.evil_py,
              "drop": world.drop, "lib": world.libdir, "evil_so": world.evil_so}
    return dict(item.split("=", 1) for item in spec.format(**values).split())


@attack("PYTHON* and loader variables")
@pytest.mark.parametrize("spec", PYTHON_VARIABLES)
def test_python_and_loader_variables_run_nothing_of_the_caller(world, spec):
    # The message is Python that leaves a proof if an interactive interpreter ran it.
    payload = b"open(%r, 'w').close()\n" % str(world.drop / "pwned-by-stdin").encode()
    r = world.run(env=expand(world, spec), message=MESSAGE + payload)
    outcome = kind(r)
    assert outcome in (SUCCESS, TEMPORARY), r
    if outcome == SUCCESS:
        [(message, env, state)] = r.delivered
        assert message == sd.HEADER + MESSAGE + payload and env == envelope()
        assert state["euid"] == world.owner.pw_uid
    else:
        assert r.delivered == []


@attack("current directory full of the caller's modules")
def test_current_directory_of_the_caller(world):
    r = world.run(preexec=lambda: os.chdir(world.mine))
    clean_outcome(world, r, SUCCESS)


@attack("argv: Python options, a spoofed argv[0]")
@pytest.mark.parametrize("argv", [
    ["-c", "import os; os.system('touch {drop}/pwned-by-argv')"], ["-m", "evilwarn"], ["{startup}"],
    ["-i"], ["-X", "importtime", "-W", "error::evilwarn.Evil"]])
def test_arguments_are_not_interpreted(world, argv):
    argv = [a.format(drop=world.drop, startup=world.evil_py) for a in argv]
    r = world.run(command=[str(world.binary)] + argv)
    clean_outcome(world, r)  # Nuitka refuses -c and -m itself (exit 2: temporary)


@attack("argv: Python options, a spoofed argv[0]")
def test_spoofed_argv0_with_a_codec_to_load(world):
    """The dist folder is found through /proc/self/exe, not argv[0]: a caller's folder
    named as argv[0] with an evil _codecs_jp.so next to it is never looked at."""
    fake_dir = world.mine / "dist"
    fake_dir.mkdir()
    for name in ("_codecs_jp.so", "_multibytecodec.so"):
        shutil.copy(world.evil_so, fake_dir / name)
    for p in (fake_dir, *fake_dir.iterdir()):
        os.chown(p, world.caller.pw_uid, world.caller.pw_gid)
    world.before = world.snapshot()
    launcher = [SYSTEM_PYTHON, "-c", "import os, sys; os.execv(sys.argv[1], [sys.argv[2]])",
                str(world.binary), str(fake_dir / "fp-qmail")]
    r = world.run(command=launcher, env={"PYTHONIOENCODING": "cp932"})
    clean_outcome(world, r, SUCCESS)


@attack("hard link of the setuid binary into the caller's directory")
def test_the_caller_cannot_hard_link_the_setuid_binary(world):
    """Were it possible, /proc/self/exe would name the caller's directory, and a codec
    lookup (PYTHONIOENCODING=cp932) would load the caller's _codecs_jp.so as the owner.
    The kernel refuses (fs.protected_hardlinks=1): installations rely on it."""
    with open("/proc/sys/fs/protected_hardlinks") as f:
        assert f.read().strip() == "1", "fs.protected_hardlinks must be 1 where fp-qmail is setuid"
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import os, sys; os.link(sys.argv[1], sys.argv[2])",
                            str(world.binary), str(world.drop / "fp-qmail")],
                           preexec_fn=become(CALLER), capture_output=True, text=True)
    assert probe.returncode != 0 and "Operation not permitted" in probe.stderr, probe


# ---- descriptors, limits, signals ------------------------------------------------------------

def limit(resource_id, value):
    return lambda: resource.setrlimit(resource_id, (value, value))


@attack("limits: files, descriptors, memory, CPU, core dumps")
@pytest.mark.parametrize("what", ["fsize 1", "nofile 4", "nofile 5", "as 64 MB", "cpu 0", "core with a crash"])
def test_limits_end_in_a_clean_failure(world, what):
    def core_dump_in_the_drop_box():  # a setuid process must not dump core where the caller says
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        os.chdir(world.drop)

    preexec = {"fsize 1": limit(resource.RLIMIT_FSIZE, 1), "nofile 4": limit(resource.RLIMIT_NOFILE, 4),
               "nofile 5": limit(resource.RLIMIT_NOFILE, 5), "as 64 MB": limit(resource.RLIMIT_AS, 64 << 20),
               "cpu 0": limit(resource.RLIMIT_CPU, 0), "core with a crash": core_dump_in_the_drop_box}[what]
    env = {"PYTHONMALLOC": "debug"} if what == "core with a crash" else {}
    r = world.run(env=env, preexec=preexec)
    clean_outcome(world, r)
    assert os.listdir(world.drop) == []


@attack("descriptors: closed, odd, many")
@pytest.mark.parametrize("what", ["all of 0 1 2 closed", "fd 0 a directory", "fd 1 write-only",
                                  "fd 6 the owner-readable precious file", "200 descriptors of the caller's"])
def test_odd_descriptors(world, what):
    opened = []

    def preexec():
        if what == "all of 0 1 2 closed":
            for fd in (0, 1, 2):
                os.close(fd)
        elif what == "fd 0 a directory":
            os.dup2(os.open(str(world.mine), os.O_RDONLY), 0)
        elif what == "fd 1 write-only":
            os.dup2(os.open("/dev/null", os.O_WRONLY), 1)
        elif what == "fd 6 the owner-readable precious file":
            try:  # the caller cannot open it: fd 6 stays closed, fp-qmail must not find it open
                os.dup2(os.open(str(world.precious), os.O_WRONLY), 6)
            except PermissionError:
                pass
        else:
            for n in range(200):
                fd = os.open(str(world.evil_py), os.O_RDONLY)
                os.set_inheritable(fd, True)
                opened.append(fd)

    r = world.run(preexec=preexec)
    outcome = clean_outcome(world, r)
    if what in ("fd 6 the owner-readable precious file", "200 descriptors of the caller's"):
        assert outcome == SUCCESS
        assert set(r.delivered[0][2]["fds"]) <= {0, 1, 2, 3}  # none of the caller's passed on
    else:
        assert outcome == TEMPORARY


@attack("signals from the caller mid-scan")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM,
                                    signal.SIGSTOP, signal.SIGKILL])
def test_caller_signals_mid_scan(world, signum):
    """The caller may signal its own setuid process (same real uid). Each signal ends in
    a clean temporary failure; a SIGKILL leaves fi/fo for the daemon's janitor, which
    the fault matrix shows; here the test removes them."""
    world.scanner.behaviour = sd.silent

    def signal_when_scanning(proc):
        deadline = time.monotonic() + 20
        while not world.scanner.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        subprocess.run(["kill", "-%d" % signum, str(proc.pid)], preexec_fn=become(CALLER), check=True)
        if signum == signal.SIGSTOP:
            time.sleep(0.5)
            subprocess.run(["kill", "-CONT", str(proc.pid)], preexec_fn=become(CALLER), check=True)

    r = world.run(after_start=signal_when_scanning)
    clean_outcome(world, r, TEMPORARY)
    if signum == signal.SIGKILL:
        for p in world.rig.tmpdir.iterdir():
            assert re.fullmatch(r"f[io]\d+\.[0-9a-f]{16}", p.name) and p.stat().st_uid == world.owner.pw_uid
            p.unlink()


# ---- the shared temp directory ---------------------------------------------------------------

@attack("symlinks and hard links planted at the temp names")
def test_planted_links_at_the_very_names_drawn(world):
    """The worst case: the caller knows the names fp-qmail will draw (made predictable
    for the test, see predictable_names) and plants, as itself, links to the owner's
    file, a hard link to it (what fs.protected_hardlinks=0 would allow), a dangling link
    into the owner's directory, a file of its own, and a free fi whose fo is taken.
    fp-qmail, running as the owner, opens none of them and uses the first free pair."""
    command, names = predictable_names(world.rig, [str(world.binary)], strace_user=CALLER,
                                       spool=world.rig.tmpdir, preexec=world.etc.enter)
    t = world.rig.tmpdir
    mine = t / ("fi" + names[3])
    plants = [(t / ("fi" + names[0]), lambda p: os.symlink(world.precious, p), True),
              (t / ("fi" + names[1]), lambda p: os.link(world.precious, p), False),  # the owner's inode
              (t / ("fi" + names[2]), lambda p: os.symlink(world.home / "created-by-owner", p), True),
              (mine, lambda p: p.write_bytes(b""), True),
              (t / ("fo" + names[4]), lambda p: os.symlink(world.precious, p), True)]
    for path, make, the_callers in plants:
        make(path)
        if the_callers:
            os.lchown(path, world.caller.pw_uid, world.caller.pw_gid)
    mine.chmod(0o666)
    planted = {p.name: os.lstat(p) for p in t.iterdir()}
    try:
        r = world.run(command=command, as_caller=False)
    finally:
        after = {p.name: os.lstat(p) for p in t.iterdir()}
        remove_all(t)
    clean_outcome(world, r, SUCCESS)
    assert [q["in"] for q in world.scanner.requests] == [str(t / ("fi" + names[5]))]
    assert sorted(after) == sorted(planted)
    for name, st in planted.items():
        assert (after[name].st_ino, after[name].st_size, after[name].st_mtime_ns) == \
            (st.st_ino, st.st_size, st.st_mtime_ns), name
    assert not (world.home / "created-by-owner").exists()


@attack("the caller's own scanner, by TCP or unix socket")
@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_a_scanner_of_the_callers_is_never_asked(world, transport):
    """The caller's environment does not count: a scanner of theirs that would answer
    CLEAN to anything is never connected to; the administrator's scanner is."""
    theirs = sd.ScannerDouble(sd.clean, tcp=transport == "tcp")
    try:
        r = world.run(env={"FP_QMAIL_SCANNER": theirs.address, "FP_QMAIL_CONNECT_TIMEOUT": "0.001"})
    finally:
        theirs.close()
    clean_outcome(world, r, SUCCESS)
    assert theirs.connections == 0 and len(world.scanner.requests) == 1


@attack("the issue's environment: ON_ERROR=pass, a dead scanner, LOGLEVEL=0, GROUP_ACCESS=yes")
@pytest.mark.parametrize("queue", ["the caller's program", "the real stand-in", "not set"])
@pytest.mark.parametrize("policy", ["reject", "deliver"])
def test_eicar_is_never_queued_whatever_the_environment(world, start_scand, queue, policy):
    """Issue 10's acceptance: a local user runs the setuid binary with
    FP_QMAIL_ON_ERROR=pass FP_QMAIL_SCANNER=127.0.0.1:1 FP_QMAIL_LOGLEVEL=0
    FP_QMAIL_GROUP_ACCESS=yes (and a queue program) in its environment and EICAR attached.
    The real daemon, the administrator's policy and logging decide: rejected (31), or
    delivered with EICAR replaced; never queued as it came."""
    # The daemon serves the setuid binary's owner, as an installed one serves qmailq.
    daemon = start_scand(world.rig.tmpdir, config={"FP_SCAND_CLIENTS": "root " + world.owner.pw_name})
    world.configure(FP_QMAIL_SCANNER=daemon.address, FP_QMAIL_ON_VIRUS=policy)
    env = {"FP_QMAIL_ON_ERROR": "pass", "FP_QMAIL_SCANNER": "127.0.0.1:1", "FP_QMAIL_LOGLEVEL": "0",
           "FP_QMAIL_GROUP_ACCESS": "yes"}
    if queue != "not set":
        env["FP_QMAIL_QUEUE"] = str(world.evil_program if queue == "the caller's program" else world.rig.queue)
    message = (b"From: mallory@example.org\nSubject: x\nMIME-Version: 1.0\n"
               b"Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\nhi\n"
               b"--b\nContent-Type: application/octet-stream\nContent-Disposition: attachment; filename=e.com\n\n"
               + EICAR + b"\n--b--\n")
    r = world.run(env=env, message=message)
    assert "threats=EICAR-Test-File" in r.stderr  # the administrator's log level and stderr copy
    if policy == "reject":
        assert r.code == 31 and r.delivered == [], r
    else:
        assert r.code == 0, r
        [(delivered, _, state)] = r.delivered
        assert EICAR not in delivered and b"EICAR-Test-File" in delivered
        assert state["euid"] == world.owner.pw_uid
