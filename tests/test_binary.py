"""The Nuitka binary (build.py) as it is installed and run: from any directory, with an
empty environment, setuid, loading no library from its own folder, and starting
without the imports build.py removed. The rest of the suite runs against the binary
too (`make test`, FPQMAIL_UNDER_TEST=binary); these tests are about the binary itself.
"""
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import scanner_double as sd
from conftest import (BINARY, MESSAGE, UNDER_TEST, PrivateEtc, become, ensure_user, envelope, free_port,
                      install_setuid_binary, read_deliveries, standin_executable, then)

binary_only = pytest.mark.skipif(UNDER_TEST != "binary",
                                 reason="about the Nuitka binary: FPQMAIL_UNDER_TEST=binary")

TEMPORARY_SCANNER_TROUBLE = {71, 72, 73, 74}
SETUID_OWNER = "fpqtest"   # the test's stand-in for qmailq
CALLER = "nobody"
# Modules the reduced `inspect` of fpqmail/nuitka/*.yml keeps out of every start, and
# the stdlib modules fp-qmail avoids on purpose (posix, not os; _socket, not socket).
HEAVY_MODULES = {"ast", "dis", "enum", "re", "tokenize", "linecache", "collections",
                 "functools", "contextlib", "socket", "selectors", "signal", "subprocess",
                 "logging", "tempfile", "random", "typing"}


def leftovers_in(directory, pid):
    return sorted(p.name for p in Path(directory).glob("f[io]%d.*" % pid))


def run_bare(env, cwd, preexec=None):
    """The binary with exactly this environment: message on fd 0, envelope on fd 1."""
    env_r, env_w = os.pipe()
    os.write(env_w, envelope())
    os.close(env_w)
    proc = subprocess.Popen([str(BINARY)], stdin=subprocess.PIPE, stdout=env_r,
                            stderr=subprocess.PIPE, env=env, cwd=cwd, preexec_fn=preexec)
    os.close(env_r)
    _, stderr = proc.communicate(MESSAGE, timeout=60)
    return proc, stderr.decode("utf-8", "replace")


@binary_only
def test_starts_with_an_empty_environment_from_the_root_directory(tmp_path):
    # Settings come from the defaults (no /etc/f-prot.conf in this run's private /etc):
    # the default scanner socket, missing here: a temporary failure, nothing left in /tmp.
    etc = PrivateEtc(tmp_path)
    etc.hide("f-prot.conf")
    proc, stderr = run_bare({}, "/", preexec=etc.enter)
    assert proc.returncode in TEMPORARY_SCANNER_TROUBLE, (proc.returncode, stderr)
    assert "Traceback" not in stderr
    assert leftovers_in("/tmp", proc.pid) == []


@binary_only
def test_delivers_without_PATH_HOME_or_any_PYTHON_variable_from_another_directory(rig):
    rig.scan_with(sd.clean)
    r = rig.run(env={"PATH": None}, preexec=lambda: os.chdir("/"))
    assert r.code == 0, r
    [(message, env, _)] = r.delivered
    assert (message, env) == (sd.HEADER + MESSAGE, envelope())


@binary_only
def test_loads_no_shared_library_from_its_own_folder(rig):
    rig.scan_with(sd.clean)
    r = rig.run(env={"LD_DEBUG": "libs"})
    assert r.code == 0, r
    loaded = re.findall(r"calling init: (\S+)", r.stderr)
    assert loaded, r.stderr[:2000]
    dist = str(BINARY.resolve().parent) + "/"
    assert [lib for lib in loaded if lib.startswith(dist)] == []


@binary_only
def test_start_up_imports_none_of_the_heavy_modules(rig):
    # No scanner listening: fp-qmail's whole path up to the exec, without the stand-in
    # qmail-queue.orig (a Python program) adding its own imports to stderr.
    rig.env["FP_QMAIL_SCANNER"] = "127.0.0.1:%d" % free_port()
    r = rig.run(env={"PYTHONVERBOSE": "1"})
    assert r.code == 73, r
    imported = set(re.findall(r"^import '([\w.]+)'", r.stderr, re.M))
    assert {"fpqmail.queue", "_socket", "inspect"} <= imported  # the log is read right
    assert imported & HEAVY_MODULES == set()
    # The config parser is imported only when the file must be read.
    assert "fpqmail.shconf" not in imported


@pytest.mark.parametrize("variable", [
    "PYTHONDEVMODE=1", "PYTHONMALLOC=debug", "PYTHONIOENCODING=rot13",
    "PYTHONHASHSEED=bad", "PYTHONWARNINGS=error", "PYTHONFAULTHANDLER=1"])
def test_python_variables_from_the_caller_never_make_a_silent_success(rig, variable):
    # A Nuitka binary does not ignore these (shared/reference/nuitka.md): some crash it
    # at start. That is a temporary failure qmail retries; it must never be exit 0
    # without the message handed to qmail-queue.orig.
    rig.scan_with(sd.clean)
    name, value = variable.split("=")
    r = rig.run(env={name: value})
    assert (r.code == 0) == (len(r.delivered) == 1), r
    assert r.code == 0 or r.delivered == []


@pytest.fixture
def setuid_binary():
    """The binary installed setuid to a test user in a root-owned directory."""
    assert os.geteuid() == 0, "this test installs a setuid binary: run it as root (make test)"
    owner = ensure_user(SETUID_OWNER)
    root = Path(tempfile.mkdtemp(prefix="fpq-setuid-", dir="/var/tmp"))
    try:
        root.chmod(0o755)
        yield install_setuid_binary(root, owner), owner
    finally:
        shutil.rmtree(root)


@binary_only
def test_setuid_binary_run_by_another_user_scans_as_its_owner(rig, setuid_binary):
    """Run by another user, whose environment does not count: the administrator's
    /etc/f-prot.conf (private to this run) names the scanner and qmail-queue.orig."""
    exe, owner = setuid_binary
    root = exe.parent.parent
    queue = standin_executable(root, python="/usr/bin/python3.11")
    queue_dir = root / "queue"
    queue_dir.mkdir()
    os.chown(queue_dir, owner.pw_uid, owner.pw_gid)
    seen = []

    def record_owner(conn, request):
        info = os.stat(request["in"])
        seen.append((request["in"], info.st_uid, info.st_mode & 0o777))
        sd.clean(conn, request)

    scanner = rig.scan_with(record_owner, tcp=True)
    etc = PrivateEtc(root)
    etc.put("f-prot.conf", "FP_QMAIL_SCANNER=%s\nFP_QMAIL_QUEUE=%s\n" % (scanner.address, queue))
    pids = []
    r = rig.run(command=[str(exe)], preexec=then(etc.enter, become(CALLER)), env={"QQ_STANDIN_DIR": str(queue_dir)},
                after_start=lambda p: pids.append(p.pid))
    assert r.code == 0, r
    [(message, _, state)] = read_deliveries(queue_dir)
    assert message == sd.HEADER + MESSAGE
    assert (state["uid"], state["euid"]) == (65534, owner.pw_uid)
    [(fi, uid, mode)] = seen  # the default temp directory, files of the owner's only
    assert re.fullmatch(r"/tmp/fi%d\.[0-9a-f]{16}" % pids[0], fi)
    assert (uid, mode) == (owner.pw_uid, 0o600)
    assert leftovers_in("/tmp", pids[0]) == []


@binary_only
def test_setuid_binary_with_the_scanner_down_fails_temporarily_and_leaves_nothing(rig, setuid_binary):
    exe, _ = setuid_binary
    etc = PrivateEtc(exe.parent.parent)
    etc.put("f-prot.conf", "FP_QMAIL_SCANNER=127.0.0.1:%d\nFP_QMAIL_LOG_STDERR=yes\n" % free_port())
    pids = []
    r = rig.run(command=[str(exe)], preexec=then(etc.enter, become(CALLER)), after_start=lambda p: pids.append(p.pid))
    assert r.code == 73, r
    assert "connection refused" in r.stderr.lower()
    assert leftovers_in("/tmp", pids[0]) == []
