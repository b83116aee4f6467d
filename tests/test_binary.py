"""The binary (build.py) as it is installed and run: from any directory, with an
empty environment, setuid, loading no library from its own folder, reading no file at
start but the system's libraries (its modules are built in), deaf to the caller's
PYTHON* variables, and never crashing: not on an early signal, not on an exception
that escapes fpqmail.queue.main(). The rest of the suite runs against the binary too
(`make test`, FPQMAIL_UNDER_TEST=binary); these tests are about the binary itself.
"""
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

import scanner_double as sd
from conftest import BINARY, MESSAGE, UNDER_TEST, PrivateEtc, envelope, free_port

binary_only = pytest.mark.skipif(UNDER_TEST != "binary",
                                 reason="about the Nuitka binary: FPQMAIL_UNDER_TEST=binary")

TEMPORARY_SCANNER_TROUBLE = {71, 72, 73, 74}
INTERNAL = 81
SETUID_OWNER = "fpqtest"   # the test's stand-in for qmailq
CALLER = "nobody"
# Variables CPython reads that change how it starts (the first two crashed the stock
# Nuitka binary); and those that say where its modules are.
PYTHON_VARIABLES = [
    "PYTHONDEVMODE=1", "PYTHONMALLOC=debug", "PYTHONIOENCODING=rot13", "PYTHONHASHSEED=bad",
    "PYTHONWARNINGS=error", "PYTHONFAULTHANDLER=1", "PYTHONVERBOSE=1", "PYTHONINSPECT=1",
    "PYTHONSTARTUP=/etc/passwd", "PYTHONTRACEMALLOC=5", "PYTHONUTF8=0", "PYTHONOPTIMIZE=2"]
PYTHON_PATH_VARIABLES = ["PYTHONPATH=/tmp", "PYTHONHOME=/nonexistent", "PYTHONPLATLIBDIR=/tmp"]


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
def test_reads_no_file_at_start_but_the_system_libraries(rig):
    # fp-qmail's modules are built into the binary: it looks for no module, in no
    # directory (its own, the working directory, a PYTHON* one). No scanner listening:
    # its whole path up to the exec, without the stand-in qmail-queue.orig's files.
    rig.env["FP_QMAIL_SCANNER"] = "127.0.0.1:%d" % free_port()
    trace = rig.root / "trace"
    r = rig.run(command=["strace", "-qq", "-e", "trace=%file", "-o", str(trace), str(BINARY)],
                env={"PYTHONPATH": str(rig.root), "PYTHONHOME": str(rig.root)})
    assert r.code == 73, r
    calls = re.findall(r'^(\w+)\((?:AT_FDCWD, )?"([^"]*)"', trace.read_text(), re.M)
    assert calls[0] == ("execve", str(BINARY))
    spool = str(rig.tmpdir) + "/"
    # The system's libraries and files of /etc (the dynamic loader's, the time zone's,
    # settings); fp-qmail's own temp files.
    expected = ("/lib/", "/usr/lib/", "/etc/", spool)
    assert [c for c in calls[1:] if not c[1].startswith(expected)] == []
    assert [c for c in calls if c[1].startswith(spool)], calls  # the log is read right


@pytest.mark.parametrize("variable", PYTHON_VARIABLES)
def test_python_variables_from_the_caller_never_make_a_silent_success(rig, variable):
    # python -m fpqmail reads these (some stop it at start): that is a temporary failure
    # qmail retries, but it must never be exit 0 without the message handed on.
    rig.scan_with(sd.clean)
    name, value = variable.split("=")
    r = rig.run(env={name: value})
    assert (r.code == 0) == (len(r.delivered) == 1), r
    assert r.code == 0 or r.delivered == []


@binary_only
@pytest.mark.parametrize("variable", PYTHON_VARIABLES + PYTHON_PATH_VARIABLES)
def test_python_variables_from_the_caller_change_nothing(rig, variable):
    # The binary's CPython starts from an isolated configuration: it reads none of them.
    # qmail-queue.orig gets them too: here a shell script (the rig's stand-in is Python).
    rig.scan_with(sd.clean)
    queue = rig.root / "queue.sh"
    queue.write_text('#!/bin/sh\ncat > "$0.message" && cat <&1 > "$0.envelope"\n')
    queue.chmod(0o755)
    name, value = variable.split("=")
    r = rig.run(env={name: value, "FP_QMAIL_QUEUE": str(queue)})
    assert r.code == 0, r
    assert Path(str(queue) + ".message").read_bytes() == sd.HEADER + MESSAGE
    assert Path(str(queue) + ".envelope").read_bytes() == envelope()
    assert [line for line in r.stderr.splitlines() if not line.startswith("fp-qmail[")] == []


@binary_only
def test_a_signal_in_its_first_milliseconds_never_crashes_it(rig):
    # Until fpqmail.queue.main() sets its handlers, SIGINT has its default action (the
    # process dies of it, nothing created yet) or, once the _signal module is imported,
    # CPython's (KeyboardInterrupt, which the launcher logs as an interruption, 71);
    # after, it is an interrupted run (71). Never a crash in the start-up, and never
    # "internal error", wherever the signal lands.
    rig.env["FP_QMAIL_SCANNER"] = "127.0.0.1:%d" % free_port()
    outcomes = set()
    for attempt in range(60):
        delay = attempt % 12 * 0.0005
        r = rig.run(after_start=lambda proc: (time.sleep(delay), proc.send_signal(signal.SIGINT)))
        assert r.code in (-signal.SIGINT, 71, 73), (delay, r)
        assert r.code != 71 or "interrupted by signal 2" in r.stderr, r
        outcomes.add(r.code)
    assert -signal.SIGINT in outcomes  # some landed before main(): the start-up was hit


@binary_only
def test_an_unexpected_exception_before_the_settings_is_logged_and_exit_81(rig):
    # fpqmail.queue.main() puts /dev/null in place of a closed fd 0 before anything can
    # fail "normally"; here there is no /dev/null (a private, empty /dev), so that raises.
    # Before the settings are known the line goes to stderr as well, as the launcher's.
    rig.scan_with(sd.clean)
    script = 'mount -t tmpfs tmpfs /dev && exec "$@" 0<&-'
    r = rig.run(command=["unshare", "--mount", "sh", "-c", script, "sh", str(BINARY)],
                env={"FP_QMAIL_LOG_STDERR": None})
    assert r.code == INTERNAL, r
    assert re.search(r"^fp-qmail\[\d+\]: .* verdict=failed .* exit 81 .*: internal error: "
                     r"FileNotFoundError: .*/dev/null", r.stderr, re.M), r
    assert r.delivered == []
