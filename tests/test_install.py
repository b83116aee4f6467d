"""make install / make uninstall into a DESTDIR holding a stand-in qmail tree: twice
install then uninstall leaves the qmail tree exactly as before (qmail-queue.orig's owner
and mode included, locked to qmailq and root in between); the installed qmail-queue (a
lone copy of the binary, no dist folder beside it) delivers and runs setuid; every
refusal changes nothing. Needs root and build/fp-qmail.dist (make build).
"""
import os
import pwd
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

import scanner_double as sd
from conftest import MESSAGE, REPO, PrivateEtc, Rig, become, free_port, read_deliveries, standin_executable, then
from deb_root import snapshot

BINARY = REPO / "build" / "fp-qmail.dist" / "fp-qmail"
SYSTEM_PYTHON = "/usr/bin/python3.11"


def ensure_qmail_users():
    """qmail's group, its queue user and the user of qmail-smtpd, as qmail's install
    creates them."""
    if subprocess.run(["getent", "group", "qmail"], capture_output=True).returncode:
        subprocess.run(["groupadd", "--system", "qmail"], check=True)
    for user in ("qmailq", "qmaild"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            subprocess.run(["useradd", "--system", "-g", "qmail", "-M", "-d", "/var/qmail",
                            "-s", "/usr/sbin/nologin", user], check=True)
    return pwd.getpwnam("qmailq")


def trusted_uids_expected():
    """What packaging/trusted-uids writes here: root and those of qmail's users that exist."""
    uids = []
    for user in ("root", "qmaild", "qmails", "alias"):
        try:
            uids.append(pwd.getpwnam(user).pw_uid)
        except KeyError:
            pass
    return uids


def make(target, destdir, **variables):
    if not BINARY.exists():
        raise RuntimeError("%s is missing: run make build" % BINARY)
    command = ["make", "-s", target, "DESTDIR=%s" % destdir]
    command += ["%s=%s" % kv for kv in variables.items()]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True)


@pytest.fixture
def destdir():
    root = Path(tempfile.mkdtemp(prefix="fpq-install-", dir="/var/tmp"))
    root.chmod(0o755)
    yield root
    subprocess.run(["rm", "-rf", str(root)], check=True)


@pytest.fixture
def qmail(destdir):
    """A stand-in qmail tree: bin/qmail-queue (the recording stand-in, qmailq:qmail
    4711 like qmail's), another program, a control file."""
    qmailq = ensure_qmail_users()
    bin_dir = destdir / "var" / "qmail" / "bin"
    bin_dir.mkdir(parents=True)
    queue = standin_executable(bin_dir, python=SYSTEM_PYTHON).rename(bin_dir / "qmail-queue")
    os.chown(queue, qmailq.pw_uid, qmailq.pw_gid)
    queue.chmod(0o4711)
    (bin_dir / "qmail-inject").write_bytes(b"#!/bin/sh\nexit 111\n")
    (destdir / "var" / "qmail" / "control").mkdir()
    (destdir / "var" / "qmail" / "control" / "me").write_text("mx.example.net\n")
    return destdir / "var" / "qmail"


def test_install_twice_then_uninstall_leaves_qmail_as_before(destdir, qmail):
    before = snapshot(qmail)
    original_inode = (qmail / "bin" / "qmail-queue").stat().st_ino

    first = make("install", destdir)
    assert first.returncode == 0, first.stderr
    qmailq = pwd.getpwnam("qmailq")
    queue = qmail / "bin" / "qmail-queue"
    st = queue.stat()
    assert queue.read_bytes() == BINARY.read_bytes()
    assert (st.st_uid, st.st_gid) == (qmailq.pw_uid, qmailq.pw_gid)
    assert stat.S_IMODE(st.st_mode) == 0o4711
    # qmail's own: the same inode and bytes, now for qmailq (and root) alone.
    orig = qmail / "bin" / "qmail-queue.orig"
    kind, content, _, _, mode = before["bin/qmail-queue"]
    assert snapshot(qmail / "bin")["qmail-queue.orig"] == (kind, content, qmailq.pw_uid, qmailq.pw_gid,
                                                           stat.S_IFREG | 0o4700)
    assert orig.stat().st_ino == original_inode
    assert (destdir / "etc" / "fp-qmail" / "qmail-queue.orig.stat").read_text() == "%d:%d:%o\n" % (
        before["bin/qmail-queue"][2], before["bin/qmail-queue"][3], stat.S_IMODE(mode))
    trusted = destdir / "etc" / "fp-qmail" / "trusted-uids"
    listed = [int(line.split("#")[0]) for line in trusted.read_text().splitlines()
              if line.split("#")[0].strip()]
    assert listed == trusted_uids_expected() and pwd.getpwnam("qmaild").pw_uid in listed
    assert (trusted.stat().st_uid, stat.S_IMODE(trusted.stat().st_mode)) == (0, 0o644)
    assert (destdir / "etc" / "f-prot.conf").read_bytes() == (REPO / "packaging" / "f-prot.conf").read_bytes()
    for path in ("usr/local/lib/fp-qmail/standalone/fp-qmail", "usr/local/sbin/fpqmail-scand",
                 "usr/local/bin/fpqmail-quarantine", "usr/local/share/man/man8/fp-qmail.8",
                 "usr/local/share/man/man5/f-prot.conf.5", "usr/local/lib/systemd/system/fpqmail-scand.service",
                 "usr/local/share/fp-qmail/service/fpqmail-scand/run"):
        assert (destdir / path).is_file(), path
    assert not (destdir / "var" / "spool" / "fp-qmail").exists()  # only TCP sites need it, made by hand
    installed = snapshot(qmail)

    second = make("install", destdir)
    assert second.returncode == 0, second.stderr
    assert "is this fp-qmail already" in second.stdout
    assert snapshot(qmail) == installed

    undo = make("uninstall", destdir)
    assert undo.returncode == 0, undo.stderr
    assert snapshot(qmail) == before
    assert (qmail / "bin" / "qmail-queue").stat().st_ino == original_inode
    assert not (destdir / "usr" / "local" / "lib" / "fp-qmail").exists()
    assert not (destdir / "etc" / "f-prot.conf").exists()
    assert not (destdir / "etc" / "fp-qmail").exists()
    again = make("uninstall", destdir)
    assert again.returncode == 0 and "nothing to undo" in again.stdout
    assert snapshot(qmail) == before


def test_installed_qmail_queue_delivers_without_its_folder(destdir, qmail):
    """The lone copy at bin/qmail-queue, run by qmailq itself (not setuid, so the
    environment may name the stand-in and the temp dir), takes a message through."""
    assert make("install", destdir).returncode == 0
    qmailq = pwd.getpwnam("qmailq")
    (destdir / "rig").mkdir()
    rig = Rig(destdir / "rig")
    for d in (rig.tmpdir, rig.queue_dir):
        os.chown(d, qmailq.pw_uid, qmailq.pw_gid)
    rig.scan_with(sd.clean)
    rig.env["FP_QMAIL_QUEUE"] = str(qmail / "bin" / "qmail-queue.orig")
    try:
        result = rig.run(command=[str(qmail / "bin" / "qmail-queue")], preexec=become("qmailq"))
    finally:
        rig.close()
    assert result.code == 0, result
    [(message, _, state)] = result.delivered
    assert message == sd.HEADER + MESSAGE
    assert state["euid"] == qmailq.pw_uid
    assert rig.leftovers() == []


def test_uninstall_gives_back_an_unusual_owner_and_mode(destdir, qmail):
    queue = qmail / "bin" / "qmail-queue"
    os.chown(queue, 0, pwd.getpwnam("nobody").pw_gid)
    queue.chmod(0o2751)
    before = snapshot(qmail)
    assert make("install", destdir).returncode == 0
    assert stat.S_IMODE((qmail / "bin" / "qmail-queue.orig").stat().st_mode) == 0o4700
    assert make("uninstall", destdir).returncode == 0
    assert snapshot(qmail) == before


def test_installed_qmail_queue_runs_setuid(destdir, qmail):
    """Run by nobody it starts as qmailq from bin/ (no $ORIGIN, no folder), reads the
    envelope, spools, and reports the scanner it cannot reach as a temporary failure.
    Its settings come from /etc/f-prot.conf (this run's own): nobody is not trusted."""
    assert make("install", destdir).returncode == 0
    (destdir / "rig").mkdir()
    rig = Rig(destdir / "rig")
    etc = PrivateEtc(destdir / "rig")
    etc.put("f-prot.conf", "FP_QMAIL_SCANNER=127.0.0.1:%d\nFP_QMAIL_LOG_STDERR=yes\n" % free_port())
    result = rig.run(command=[str(qmail / "bin" / "qmail-queue")], preexec=then(etc.enter, become("nobody")))
    assert result.code == 73, result
    assert "fp-qmail[" in result.stderr and result.delivered == []


def test_only_qmailq_and_root_run_qmail_queue_orig_and_mail_still_flows(destdir, qmail):
    """After make install a local user cannot run qmail-queue.orig (to queue mail
    unscanned); fp-qmail, run by that user, still queues through it (euid qmailq), and
    root can still run it (qmail's own, a C program, would then run as qmailq through its
    setuid bit; the stand-in is a script, which the kernel runs without it)."""
    assert make("install", destdir).returncode == 0
    qmailq = pwd.getpwnam("qmailq")
    orig = qmail / "bin" / "qmail-queue.orig"
    with pytest.raises(PermissionError):
        subprocess.run([str(orig)], preexec_fn=become("nobody"), stdin=subprocess.DEVNULL)
    (destdir / "rig").mkdir()
    rig = Rig(destdir / "rig")
    for d in (rig.tmpdir, rig.queue_dir):
        os.chown(d, qmailq.pw_uid, qmailq.pw_gid)
    scanner = rig.scan_with(sd.clean)
    etc = PrivateEtc(destdir / "rig")
    etc.put("f-prot.conf", "FP_QMAIL_SCANNER=%s\nFP_QMAIL_QUEUE=%s\nFP_QMAIL_TMPDIR=%s\nFP_QMAIL_LOG_STDERR=yes\n"
            % (scanner.address, orig, rig.tmpdir))
    try:
        result = rig.run(command=[str(qmail / "bin" / "qmail-queue")], preexec=then(etc.enter, become("nobody")))
        by_root = rig.run(command=[str(orig)])  # root runs it directly: still as qmailq
    finally:
        rig.close()
    assert result.code == 0, result
    assert by_root.code == 0, by_root
    deliveries = sorted(read_deliveries(rig.queue_dir), key=lambda d: d[2]["uid"])
    assert [(message, state["uid"]) for message, _, state in deliveries] == [(MESSAGE, 0),
                                                                             (sd.HEADER + MESSAGE, 65534)]
    assert deliveries[1][2]["euid"] == qmailq.pw_uid
    assert rig.leftovers() == [] and scanner.violations == []


def foreign_orig(qmail):
    (qmail / "bin" / "qmail-queue.orig").write_bytes(b"#!/bin/sh\n# another wrapper's\n")


def fp_qmail_without_orig(qmail):
    (qmail / "bin" / "qmail-queue").write_bytes(BINARY.read_bytes())


def fp_qmail_twice(qmail):
    (qmail / "bin" / "qmail-queue").write_bytes(BINARY.read_bytes())
    (qmail / "bin" / "qmail-queue.orig").write_bytes(BINARY.read_bytes())


def no_qmail(qmail):
    subprocess.run(["rm", "-rf", str(qmail)], check=True)


@pytest.mark.parametrize("breakage, variables, why", [
    (no_qmail, {}, "qmail is not installed"),
    (None, {"QMAILDIR": "/opt/no-qmail-here"}, "qmail is not installed"),
    (None, {"QMAILQ_USER": "fpq-no-such-user"}, "the user fpq-no-such-user"),
    (None, {"QMAIL_GROUP": "fpq-no-such-group"}, "the group fpq-no-such-group"),
    (foreign_orig, {}, "another qmail-queue wrapper"),
    (fp_qmail_without_orig, {}, "qmail-queue.orig is missing"),
    (fp_qmail_twice, {}, "every message would loop"),
])
def test_install_refuses_and_changes_nothing(destdir, qmail, breakage, variables, why):
    if breakage:
        breakage(qmail)
    before = snapshot(destdir)
    result = make("install", destdir, **variables)
    assert result.returncode != 0
    assert why in result.stderr and "nothing changed" in result.stderr, result.stderr
    assert snapshot(destdir) == before
