"""Trusted callers and the setuid rules (fp-qmail(8), "Trusted callers").

Installed setuid qmailq, fp-qmail trusts the environment of its caller only when the
caller's real uid is root's or is listed in /etc/fp-qmail/trusted-uids (qmail's own
services). A trusted caller keeps the seed's shortcut (settings from the environment,
/etc/f-prot.conf not even opened when FP_QMAIL_LOGLEVEL is set), except for the settings
that name a file or a program. Anybody else's environment is ignored entirely.

Binary mode: a setuid copy of the Nuitka binary, owned by a test user, run by others.
Module mode: Debian's python3.11 running `-m fpqmail` with the caller's real ids and the
owner's effective ids (a script cannot be setuid). /etc is private to each run (a mount
namespace with an overlay: conftest.PrivateEtc); the machine's is never touched.
"""
import os
import pwd
import shutil
import tempfile
from pathlib import Path

import pytest

import scanner_double as sd
from conftest import (MESSAGE, REPO, UNDER_TEST, PrivateEtc, Rig, ensure_user, envelope,
                      install_setuid_binary, standin_executable)

OWNER = "fpqowner"    # the test's qmailq
SERVICE = "fpqsmtpd"  # the test's qmaild: a trusted uid
CALLER = "nobody"     # any local user
SYSTEM_PYTHON = "/usr/bin/python3.11"
HOSTILE = {"FP_QMAIL_ON_ERROR": "pass", "FP_QMAIL_SCANNER": "127.0.0.1:1", "FP_QMAIL_LOGLEVEL": "0",
           "FP_QMAIL_GROUP_ACCESS": "yes", "FP_QMAIL_ON_VIRUS": "deliver", "FP_QMAIL_LOG_STDERR": "no",
           "FP_QMAIL_TIMEOUT": "0.001", "FP_QMAIL_REJECT_TEXT": "accepted", "TCPREMOTEIP": "192.0.2.66"}


class SetuidRig(Rig):
    """A Rig whose fp-qmail is setuid OWNER and runs as a given user, with a private /etc."""

    def __init__(self, root):
        super().__init__(root)
        self.owner = ensure_user(OWNER)
        for d in (self.tmpdir, self.queue_dir):
            os.chown(d, self.owner.pw_uid, self.owner.pw_gid)
        self.queue = standin_executable(root, python=SYSTEM_PYTHON)
        self.env["FP_QMAIL_QUEUE"] = str(self.queue)
        self.etc = PrivateEtc(root)
        self.etc.put("fp-qmail/trusted-uids", "# qmaild\n%d\n" % ensure_user(SERVICE).pw_uid)
        if UNDER_TEST == "binary":
            self.binary = [str(install_setuid_binary(root, self.owner))]
        else:
            self.binary = [SYSTEM_PYTHON, "-m", "fpqmail"]
            self.env["PYTHONPATH"] = str(REPO)

    def configure(self, **settings):
        """The administrator's /etc/f-prot.conf."""
        self.etc.put("f-prot.conf", "".join("%s='%s'\n" % kv for kv in settings.items()))

    def as_user(self, user, command=None):
        """fp-qmail's command run by user: setpriv (so that strace, run as root, may wrap
        it), then the setuid binary; in module mode the owner's effective ids come from
        setpriv itself."""
        real = pwd.getpwnam(user)
        effective = real if UNDER_TEST == "binary" else self.owner
        return ["setpriv", "--ruid=%d" % real.pw_uid, "--rgid=%d" % real.pw_gid, "--euid=%d" % effective.pw_uid,
                "--egid=%d" % effective.pw_gid, "--clear-groups", "--"] + (command or self.binary)

    def run_as(self, user, env=None, command=None, **kw):
        return self.run(env=env, command=command or self.as_user(user), preexec=self.etc.enter, **kw)

    def traced(self, user, env=None):
        """Run as user under strace (as root, outside the drop); return (result, the
        paths fp-qmail tried to open)."""
        trace = self.root / "trace"
        command = ["strace", "-f", "-qq", "-e", "trace=open,openat", "-o", str(trace)] + self.as_user(user)
        r = self.run_as(user, env=env, command=command)
        return r, trace.read_text()


@pytest.fixture
def setuid_rig():
    if os.geteuid() != 0:
        raise RuntimeError("the setuid tests need root (CI runs as root)")
    root = Path(tempfile.mkdtemp(prefix="fpq-setuid-", dir="/var/tmp"))
    root.chmod(0o755)
    rig = SetuidRig(root)
    yield rig
    rig.close()
    left = rig.leftovers()
    violations = rig.scanner.violations if rig.scanner else []
    shutil.rmtree(root)
    assert left == [], left
    assert violations == [], violations


def caller_files(rig):
    """What a hostile caller prepares: a program of theirs, a config of theirs, a
    directory of theirs, and a marker that proves their program ran."""
    caller = rig.root / "caller"
    caller.mkdir(mode=0o777)
    caller.chmod(0o777)
    marker = caller / "pwned"
    evil = caller / "evil"
    evil.write_text("#!/bin/sh\ntouch %s\ncat >/dev/null\nexit 0\n" % marker)
    evil.chmod(0o755)
    conf = caller / "evil.conf"
    conf.write_text("FP_QMAIL_QUEUE=%s\nFP_QMAIL_TMPDIR=%s\nFP_QMAIL_ON_VIRUS=deliver\n" % (evil, caller))
    return caller, evil, conf, marker


# ---- an untrusted caller ------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_an_untrusted_callers_environment_changes_nothing(setuid_rig, transport):
    """The issue's attack: EICAR (here a scanner that finds it) is never queued, whatever
    queue program, scanner, policy, log level or group access the environment names;
    the administrator's settings hold, logging included."""
    rig = setuid_rig
    scanner = rig.scan_with(sd.infected("EICAR-Test-File"), tcp=transport == "tcp")
    caller, evil, conf, marker = caller_files(rig)
    rig.configure(FP_QMAIL_SCANNER=scanner.address, FP_QMAIL_TMPDIR=rig.tmpdir, FP_QMAIL_QUEUE=rig.queue,
                  FP_QMAIL_ON_VIRUS="reject", FP_QMAIL_LOGLEVEL="6", FP_QMAIL_LOG_STDERR="yes")
    env = dict(HOSTILE, FP_QMAIL_QUEUE=str(evil), FP_QMAIL_TMPDIR=str(caller), FP_QMAIL_CONF=str(conf))
    r = rig.run_as(CALLER, env=env)
    assert r.code == 31, r
    assert r.delivered == [] and not marker.exists()
    assert "verdict=rejected threats=EICAR-Test-File exit 31" in r.stderr  # the admin's log settings
    [request] = scanner.requests
    assert request["on-virus"] == "reject" and request["caller"] == str(pwd.getpwnam(CALLER).pw_uid)
    assert "client-ip" not in request
    if transport == "unix":
        assert request["peer_uid"] == rig.owner.pw_uid
    else:
        assert request["in"].startswith(str(rig.tmpdir) + "/fi")
    assert sorted(os.listdir(caller)) == ["evil", "evil.conf"]


def test_an_untrusted_caller_cannot_open_the_files_to_a_group(setuid_rig):
    """FP_QMAIL_GROUP_ACCESS=yes from the environment (a setgid temp directory of the
    caller's group, even) makes no file group-accessible: the file says no."""
    rig = setuid_rig
    modes = []

    def record(conn, request):
        modes.append([(os.stat(request[k]).st_uid, os.stat(request[k]).st_mode & 0o777) for k in ("in", "out")])
        sd.clean(conn, request)

    scanner = rig.scan_with(record, tcp=True)
    os.chown(rig.tmpdir, rig.owner.pw_uid, pwd.getpwnam(CALLER).pw_gid)
    rig.tmpdir.chmod(0o2770)
    rig.configure(FP_QMAIL_SCANNER=scanner.address, FP_QMAIL_TMPDIR=rig.tmpdir, FP_QMAIL_QUEUE=rig.queue)
    r = rig.run_as(CALLER, env={"FP_QMAIL_GROUP_ACCESS": "yes", "FP_QMAIL_LOGLEVEL": "7"})
    assert r.code == 0, r
    assert modes == [[(rig.owner.pw_uid, 0o600)] * 2]  # the owner's, for the owner alone


def test_an_untrusted_caller_gets_the_file_read_even_with_a_log_level_in_its_environment(setuid_rig):
    rig = setuid_rig
    scanner = rig.scan_with(sd.infected("Worm.A"))
    rig.configure(FP_QMAIL_SCANNER=scanner.address, FP_QMAIL_QUEUE=rig.queue, FP_QMAIL_ON_VIRUS="drop")
    r, trace = rig.traced(CALLER, env={"FP_QMAIL_LOGLEVEL": "7", "FP_QMAIL_ON_VIRUS": "deliver"})
    assert '"/etc/f-prot.conf"' in trace
    assert r.code == 0 and r.delivered == [], r  # dropped, as the file says


def test_the_default_settings_hold_when_there_is_no_config_file(setuid_rig):
    """No /etc/f-prot.conf: the built-in defaults, whatever the environment says: the
    default scanner socket (missing here), so a temporary failure, never a delivery."""
    rig = setuid_rig
    rig.etc.hide("f-prot.conf")
    r = rig.run_as(CALLER, env=dict(HOSTILE, FP_QMAIL_QUEUE=str(rig.queue)))
    assert r.code == 73, r
    assert r.delivered == []


# ---- a trusted caller ---------------------------------------------------------------------

def test_a_run_script_that_sources_the_file_keeps_the_seeds_shortcut(setuid_rig):
    """qmail-smtpd's run script (as root) sources /etc/f-prot.conf and runs the service as
    its user, a trusted uid: fp-qmail never opens the file and takes the environment,
    while the settings that name files or programs still come from the defaults."""
    rig = setuid_rig
    scanner = rig.scan_with(sd.infected("Worm.A"), tcp=True)
    caller, evil, _, marker = caller_files(rig)
    # A TCP scanner: a unix socket named in the environment would not count (a file name).
    rig.configure(FP_QMAIL_SCANNER=scanner.address, FP_QMAIL_ON_VIRUS="reject", FP_QMAIL_LOGLEVEL="6",
                  FP_QMAIL_LOG_STDERR="yes", FP_QMAIL_QUEUE=evil, FP_QMAIL_TMPDIR=caller)
    trace = rig.root / "trace"
    run_script = ("set -a; . /etc/f-prot.conf; set +a; "
                  'exec strace -f -qq -e trace=open,openat -o "$0" "$@"')
    command = ["sh", "-c", run_script, str(trace)] + rig.as_user(SERVICE)
    r = rig.run_as(SERVICE, command=command, fd6=True,
                   env={"FP_QMAIL_LOGLEVEL": None, "TCPREMOTEIP": "192.0.2.7", "TCPREMOTEHOST": "mx.example.org"})
    assert "f-prot.conf" not in trace.read_text()
    assert r.code == 82 and r.fd6_text.startswith(b"DThis message contains a virus (Worm.A)"), r
    [request] = scanner.requests
    assert (request["client-ip"], request["client-host"]) == ("192.0.2.7", "mx.example.org")
    assert request["caller"] == str(pwd.getpwnam(SERVICE).pw_uid)
    assert not marker.exists() and sorted(os.listdir(caller)) == ["evil", "evil.conf"]


def test_a_trusted_callers_environment_still_names_no_file_or_program(setuid_rig):
    rig = setuid_rig
    scanner = rig.scan_with(sd.clean, tcp=True)
    caller, evil, conf, marker = caller_files(rig)
    unix_scanner = sd.ScannerDouble(sd.clean, unix_path=str(caller / "scanner.sock"))
    rig.configure(FP_QMAIL_QUEUE=rig.queue, FP_QMAIL_TMPDIR=rig.tmpdir, FP_QMAIL_LOGLEVEL="7",
                  FP_QMAIL_LOG_STDERR="yes")
    try:
        r = rig.run_as(SERVICE, env={
            "FP_QMAIL_LOGLEVEL": None,  # so that the config file is read
            "FP_QMAIL_QUEUE": str(evil), "FP_QMAIL_TMPDIR": str(caller), "FP_QMAIL_CONF": str(conf),
            "FP_QMAIL_SCANNER": "%s,%s" % (unix_scanner.address, scanner.address)})
    finally:
        unix_scanner.close()
    assert r.code == 0, r
    assert not marker.exists()
    [(message, env, state)] = r.delivered
    assert message == sd.HEADER + MESSAGE and env == envelope()
    assert state["uid"] == pwd.getpwnam(SERVICE).pw_uid  # qmail-queue names the real uid
    assert state["euid"] == rig.owner.pw_uid
    [request] = scanner.requests
    assert request["in"].startswith(str(rig.tmpdir) + "/fi")
    assert unix_scanner.requests == []
    assert sorted(os.listdir(caller)) == ["evil", "evil.conf", "scanner.sock"]


def test_with_loglevel_in_a_trusted_environment_paths_are_the_builtin_defaults(setuid_rig):
    rig = setuid_rig
    scanner = rig.scan_with(sd.clean, tcp=True)
    caller, evil, conf, marker = caller_files(rig)
    rig.configure(FP_QMAIL_QUEUE=rig.queue)  # never read: LOGLEVEL is in the environment
    r = rig.run_as(SERVICE, env={"FP_QMAIL_QUEUE": str(evil), "FP_QMAIL_TMPDIR": str(caller),
                                 "FP_QMAIL_CONF": str(conf), "FP_QMAIL_SCANNER": scanner.address})
    assert not marker.exists()
    assert [req["in"][:7] for req in scanner.requests] == ["/tmp/fi"]
    # The built-in default, not the caller's (missing here: the machine's qmail is out of sight).
    assert "to /var/qmail/bin/qmail-queue.orig" in r.stderr and r.code == 71, r
    assert sorted(os.listdir(caller)) == ["evil", "evil.conf"]


def test_root_is_trusted(setuid_rig):
    rig = setuid_rig
    scanner = rig.scan_with(sd.infected("Worm.A"))
    rig.configure(FP_QMAIL_SCANNER=scanner.address, FP_QMAIL_QUEUE=rig.queue, FP_QMAIL_ON_VIRUS="reject")
    r = rig.run_as("root", env={"FP_QMAIL_LOGLEVEL": None, "FP_QMAIL_ON_VIRUS": "drop"})
    assert r.code == 0 and r.delivered == [], r  # the environment's drop, not the file's reject


# ---- the list of trusted uids ----------------------------------------------------------------

@pytest.mark.parametrize("problem", ["owned by another user", "group-writable", "a symbolic link", "a directory",
                                     "too large"])
def test_a_trusted_uid_list_that_root_alone_does_not_control_is_ignored(setuid_rig, problem):
    rig = setuid_rig
    scanner = rig.scan_with(sd.infected("Worm.A"))
    rig.configure(FP_QMAIL_SCANNER=scanner.address, FP_QMAIL_QUEUE=rig.queue, FP_QMAIL_ON_VIRUS="reject",
                  FP_QMAIL_LOG_STDERR="yes")
    uids = "%d\n" % pwd.getpwnam(SERVICE).pw_uid
    listed = rig.etc.layer / "fp-qmail" / "trusted-uids"
    if problem == "owned by another user":
        rig.etc.put("fp-qmail/trusted-uids", uids, uid=rig.owner.pw_uid)
    elif problem == "group-writable":
        rig.etc.put("fp-qmail/trusted-uids", uids, mode=0o664)
    elif problem == "a symbolic link":
        real = rig.etc.put("fp-qmail/real-uids", uids)
        listed.unlink()
        listed.symlink_to(real.name)
    elif problem == "a directory":
        listed.unlink()
        listed.mkdir()
    else:
        rig.etc.put("fp-qmail/trusted-uids", "# padding\n" * 7000 + uids)
    r = rig.run_as(SERVICE, env={"FP_QMAIL_ON_VIRUS": "drop", "FP_QMAIL_LOGLEVEL": "4"})
    assert r.code == 31, r  # the file's reject: the environment did not count
    assert "/etc/fp-qmail/trusted-uids ignored" in r.stderr


def test_the_trusted_uid_list_allows_comments_and_skips_what_is_not_a_uid(setuid_rig):
    rig = setuid_rig
    scanner = rig.scan_with(sd.infected("Worm.A"))
    rig.configure(FP_QMAIL_SCANNER=scanner.address, FP_QMAIL_QUEUE=rig.queue, FP_QMAIL_ON_VIRUS="reject",
                  FP_QMAIL_LOG_STDERR="yes")
    rig.etc.put("fp-qmail/trusted-uids", "0 # root\n\tqmaild  -1 %d\n" % pwd.getpwnam(SERVICE).pw_uid)
    r = rig.run_as(SERVICE, env={"FP_QMAIL_LOGLEVEL": None, "FP_QMAIL_ON_VIRUS": "drop"})
    assert r.code == 0 and r.delivered == [], r  # trusted: the environment's drop
    assert "'qmaild' is not a uid, skipped" in r.stderr and "'-1' is not a uid, skipped" in r.stderr
