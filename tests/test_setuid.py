"""The setuid rules: run as the caller (real uid nobody) with the owner's effective uid,
fp-qmail takes FP_QMAIL_QUEUE, FP_QMAIL_CONF, FP_QMAIL_TMPDIR and unix-socket scanners
only from /etc/f-prot.conf or its defaults, never from the caller's environment.

Binary mode: a setuid copy of the Nuitka binary, owned by a test user, run by nobody.
Module mode: Debian's python3.11 running `-m fpqmail` with real uid nobody and the test
user as effective uid (a script cannot be setuid). Both need root to set up.
"""
import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest

import scanner_double as sd
from conftest import (MESSAGE, REPO, UNDER_TEST, Rig, become, ensure_user, envelope,
                      install_setuid_binary, standin_executable)

OWNER = "fpqowner"
SYSTEM_PYTHON = "/usr/bin/python3.11"
CONF = Path("/etc/f-prot.conf")


@pytest.fixture
def setuid_rig():
    if os.geteuid() != 0:
        raise RuntimeError("the setuid tests need root (CI runs as root)")
    owner = ensure_user(OWNER)
    nobody = pwd.getpwnam("nobody")
    root = Path(tempfile.mkdtemp(prefix="fpq-setuid-", dir="/var/tmp"))
    root.chmod(0o755)
    rig = Rig(root)
    for d in (rig.tmpdir, rig.queue_dir):
        os.chown(d, owner.pw_uid, owner.pw_gid)
    rig.queue = standin_executable(root, python=SYSTEM_PYTHON)
    rig.env["QQ_STANDIN_DIR"] = str(rig.queue_dir)
    if UNDER_TEST == "binary":
        rig.command = [str(install_setuid_binary(root, owner))]
        become_caller = become("nobody")
    else:
        rig.command = [SYSTEM_PYTHON, "-m", "fpqmail"]
        rig.env["PYTHONPATH"] = str(REPO)

        def become_caller():
            os.setgroups([])
            os.setresgid(nobody.pw_gid, owner.pw_gid, owner.pw_gid)
            os.setresuid(nobody.pw_uid, owner.pw_uid, owner.pw_uid)
    rig.become_caller = become_caller
    saved = CONF.read_bytes() if CONF.exists() else None
    yield rig
    rig.close()
    if saved is None:
        CONF.unlink(missing_ok=True)
    else:
        CONF.write_bytes(saved)
    left = rig.leftovers()
    shutil.rmtree(root)
    assert left == [], left


def caller_files(rig):
    """What a hostile caller prepares: a program of theirs, a config of theirs, a
    directory of theirs, and a marker that proves their program ran."""
    caller = rig.root / "caller"
    caller.mkdir(mode=0o777)
    marker = caller / "pwned"
    evil = caller / "evil"
    evil.write_text("#!/bin/sh\ntouch %s\ncat >/dev/null\nexit 0\n" % marker)
    evil.chmod(0o755)
    conf = caller / "evil.conf"
    conf.write_text("FP_QMAIL_QUEUE=%s\nFP_QMAIL_TMPDIR=%s\nFP_QMAIL_LOGLEVEL=7\n" % (evil, caller))
    return caller, evil, conf, marker


def run_as_caller(rig, env):
    return rig.run(env=env, command=rig.command, preexec=rig.become_caller)


def test_path_settings_from_the_environment_are_ignored_under_setuid(setuid_rig):
    rig = setuid_rig
    scanner = rig.scan_with(sd.clean)
    caller, evil, conf, marker = caller_files(rig)
    sock = caller / "scanner.sock"
    unix_scanner = sd.ScannerDouble(sd.clean, unix_path=str(sock))
    CONF.write_text("FP_QMAIL_QUEUE=%s\nFP_QMAIL_TMPDIR=%s\nFP_QMAIL_LOGLEVEL=7\nFP_QMAIL_LOG_STDERR=yes\n"
                    % (rig.queue, rig.tmpdir))
    try:
        r = run_as_caller(rig, {
            "FP_QMAIL_LOGLEVEL": None,  # so that the config file is read
            "FP_QMAIL_QUEUE": str(evil), "FP_QMAIL_TMPDIR": str(caller), "FP_QMAIL_CONF": str(conf),
            "FP_QMAIL_SCANNER": "%s,%s" % (sock, scanner.address)})
    finally:
        unix_scanner.close()
    assert r.code == 0, r
    assert not marker.exists()
    [(message, env, state)] = r.delivered
    assert message == sd.HEADER + MESSAGE and env == envelope()
    assert state["uid"] == pwd.getpwnam("nobody").pw_uid  # qmail-queue names the real uid
    assert state["euid"] == pwd.getpwnam(OWNER).pw_uid
    [request] = scanner.requests
    assert request["in"].startswith(str(rig.tmpdir) + "/fi")
    assert unix_scanner.requests == []
    assert sorted(os.listdir(caller)) == ["evil", "evil.conf", "scanner.sock"]


def test_with_loglevel_in_the_environment_paths_are_the_builtin_defaults(setuid_rig):
    rig = setuid_rig
    scanner = rig.scan_with(sd.clean)
    caller, evil, conf, marker = caller_files(rig)
    CONF.write_text("FP_QMAIL_QUEUE=%s\n" % rig.queue)  # never read: LOGLEVEL is in the environment
    r = run_as_caller(rig, {"FP_QMAIL_QUEUE": str(evil), "FP_QMAIL_TMPDIR": str(caller),
                            "FP_QMAIL_CONF": str(conf)})
    assert not marker.exists()
    assert [req["in"][:7] for req in scanner.requests] == ["/tmp/fi"]
    assert "to /var/qmail/bin/qmail-queue.orig" in r.stderr  # the built-in default, not the caller's
    assert sorted(os.listdir(caller)) == ["evil", "evil.conf"]
