"""make install / make uninstall into a DESTDIR holding a stand-in qmail tree: twice
install then uninstall leaves the qmail tree exactly as before; the installed
qmail-queue (a lone copy of the binary, no dist folder beside it) delivers and runs
setuid; every refusal changes nothing. Needs root and build/fp-qmail.dist (make build).
"""
import os
import pwd
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

import scanner_double as sd
from conftest import MESSAGE, REPO, Rig, become, free_port, standin_executable
from deb_root import snapshot

BINARY = REPO / "build" / "fp-qmail.dist" / "fp-qmail"
SYSTEM_PYTHON = "/usr/bin/python3.11"


def ensure_qmail_users():
    """qmail's group and queue user, as qmail's install creates them."""
    if subprocess.run(["getent", "group", "qmail"], capture_output=True).returncode:
        subprocess.run(["groupadd", "--system", "qmail"], check=True)
    try:
        pwd.getpwnam("qmailq")
    except KeyError:
        subprocess.run(["useradd", "--system", "-g", "qmail", "-M", "-d", "/var/qmail",
                        "-s", "/usr/sbin/nologin", "qmailq"], check=True)
    return pwd.getpwnam("qmailq")


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
    queue = qmail / "bin" / "qmail-queue"
    st = queue.stat()
    assert queue.read_bytes() == BINARY.read_bytes()
    assert (st.st_uid, st.st_gid) == (pwd.getpwnam("qmailq").pw_uid, pwd.getpwnam("qmailq").pw_gid)
    assert stat.S_IMODE(st.st_mode) == 0o4711
    assert snapshot(qmail / "bin")["qmail-queue.orig"] == before["bin/qmail-queue"]
    assert (qmail / "bin" / "qmail-queue.orig").stat().st_ino == original_inode
    assert (destdir / "etc" / "f-prot.conf").read_bytes() == (REPO / "packaging" / "f-prot.conf").read_bytes()
    for path in ("usr/local/lib/fp-qmail/standalone/fp-qmail", "usr/local/sbin/fpqmail-scand",
                 "usr/local/bin/fpqmail-quarantine", "usr/local/share/man/man8/fp-qmail.8",
                 "usr/local/share/man/man5/f-prot.conf.5", "usr/local/lib/systemd/system/fpqmail-scand.service",
                 "usr/local/share/fp-qmail/service/fpqmail-scand/run"):
        assert (destdir / path).is_file(), path
    spool = (destdir / "var" / "spool" / "fp-qmail").stat()
    assert stat.S_IMODE(spool.st_mode) == 0o2770 and spool.st_uid == pwd.getpwnam("qmailq").pw_uid
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


def test_installed_qmail_queue_runs_setuid(destdir, qmail):
    """Run by nobody it starts as qmailq from bin/ (no $ORIGIN, no folder), reads the
    envelope, spools, and reports the scanner it cannot reach as a temporary failure."""
    assert make("install", destdir).returncode == 0
    (destdir / "rig").mkdir()
    rig = Rig(destdir / "rig")
    rig.env.update({"FP_QMAIL_SCANNER": "127.0.0.1:%d" % free_port(), "FP_QMAIL_ON_ERROR": "tempfail"})
    result = rig.run(command=[str(qmail / "bin" / "qmail-queue")], preexec=become("nobody"))
    assert result.code == 73, result
    assert "fp-qmail[" in result.stderr and result.delivered == []


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
