"""The Debian package in a throwaway Debian root (tests/deb_root.py) holding a stand-in
qmail: install diverts qmail-queue, puts fp-qmail there setuid, locks qmail-queue.orig
to qmailq and root and writes the trusted uids; a message goes through the installed
qmail-queue to the real fpqmail-scand; reinstall, reconfigure and upgrade keep it so;
remove and purge give back the original byte for byte with owner and mode.

Slow (a debootstrap on the first run): marked `deb`, run by `make test-deb` and CI.
"""
import socket
import stat
import subprocess
import time

import pytest

from conftest import MESSAGE, REPO, Rig, free_port, read_deliveries
from deb_root import DELIVERIES, DebRoot, run, snapshot

pytestmark = pytest.mark.deb

QUEUE = "/var/qmail/bin/qmail-queue"
ORIG = QUEUE + ".orig"
BINARY = REPO / "build" / "fp-qmail.dist" / "fp-qmail"


def package():
    debs = sorted((REPO / "dist").glob("fp-qmail_*_amd64.deb"))
    if not debs:
        raise RuntimeError("no dist/fp-qmail_*_amd64.deb: run make deb (make test-deb does)")
    return debs[-1]


@pytest.fixture
def root():
    r = DebRoot()
    yield r
    r.close()


def dpkg_install(root, deb, check=True):
    target = root.host("/tmp") / deb.name
    target.write_bytes(deb.read_bytes())
    return root.chroot("dpkg", "-i", "/tmp/" + deb.name, check=check)


def upgraded_copy(deb, tmp_path):
    """The same package with the next Debian revision, to test an upgrade."""
    tree = tmp_path / "tree"
    run("dpkg-deb", "-R", deb, tree)
    control = tree / "DEBIAN" / "control"
    text = control.read_text()
    version = next(line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("Version: "))
    upstream, revision = version.rsplit("-", 1)
    new_version = "%s-%d" % (upstream, int(revision) + 1)
    control.write_text(text.replace("Version: " + version, "Version: " + new_version))
    out = tmp_path / ("fp-qmail_%s_amd64.deb" % new_version)
    run("dpkg-deb", "--root-owner-group", "--build", tree, out)
    return out, new_version


def assert_fp_qmail_in_place(root, original):
    queue = root.host(QUEUE)
    st = queue.stat()
    assert queue.read_bytes() == BINARY.read_bytes()
    assert (st.st_uid, st.st_gid) == root.ids("qmailq", "qmail")
    assert stat.S_IMODE(st.st_mode) == 0o4711
    diversions = root.chroot("dpkg-divert", "--list").stdout
    assert "diversion of %s to %s by fp-qmail" % (QUEUE, ORIG) in diversions
    # qmail's own, the same bytes, now for qmailq (and root) alone: nobody else runs it.
    kind, content, _, _, _ = original
    assert snapshot(root.host("/var/qmail/bin"))["qmail-queue.orig"] == \
        (kind, content) + root.ids("qmailq", "qmail") + (stat.S_IFREG | 0o4700,)
    refused = root.chroot("chroot", "--userspec=nobody:nogroup", "/", ORIG, check=False)
    assert refused.returncode == 126 and "Permission denied" in refused.stderr, refused
    listed = [line.split("#")[0].split() for line in
              root.host("/etc/fp-qmail/trusted-uids").read_text().splitlines()]
    assert [int(w) for words in listed for w in words] == \
        [0, root.ids("qmaild", "qmail")[0], root.ids("alias", "qmail")[0]]


def send_message(root, tmp_path, transport):
    """One message through the installed qmail-queue, run by nobody (so setuid qmailq,
    an untrusted caller: the installed /etc/f-prot.conf decides), to the installed
    fpqmail-scand as user fpscand. unix: the installation's defaults (the socket's
    directory made as the supervise run script makes it); tcp: set up as docs/install.md
    tells a site that chooses it (a spool directory, four settings)."""
    settings = "FP_QMAIL_LOG_STDERR=yes\n"
    if transport == "unix":
        root.chroot("install", "-d", "-o", "fpscand", "-g", "fpscand", "-m", "0755", "/run/fpqmail-scand")
        socket_path = root.host("/run/fpqmail-scand/scand.sock")
        family, address = socket.AF_UNIX, str(socket_path)
    else:
        port = free_port()
        root.chroot("install", "-d", "-o", "qmailq", "-g", "fpscand", "-m", "2770", "/var/spool/fp-qmail")
        settings += ("FP_QMAIL_SCANNER=127.0.0.1:%d\nFP_QMAIL_TMPDIR=/var/spool/fp-qmail\n"
                     "FP_QMAIL_GROUP_ACCESS=yes\nFP_SCAND_LISTEN=127.0.0.1:%d\n" % (port, port))
        family, address = socket.AF_INET, ("127.0.0.1", port)
    conf = root.host("/etc/f-prot.conf")
    installed = conf.read_bytes()
    conf.write_bytes(installed + settings.encode())
    log = open(tmp_path / ("fpqmail-scand-%s.log" % transport), "wb")
    daemon = subprocess.Popen(
        ["chroot", "--userspec=fpscand:fpscand", str(root.path), "/usr/sbin/fpqmail-scand", "--loglevel", "7"],
        stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.socket(family) as s:
                    s.settimeout(1)
                    s.connect(address)
                break
            except OSError:
                assert daemon.poll() is None, (tmp_path / ("fpqmail-scand-%s.log" % transport)).read_text()
                assert time.monotonic() < deadline, "fpqmail-scand did not listen"
                time.sleep(0.1)
        (tmp_path / transport).mkdir()
        rig = Rig(tmp_path / transport)
        rig.queue_dir = root.host(DELIVERIES)
        # glibc honours LD_DEBUG in a setuid program only where /etc/suid-debug exists.
        root.host("/etc/suid-debug").touch()
        # The rig's FP_QMAIL_* variables do not count for nobody.
        env = {"QQ_STANDIN_DIR": DELIVERIES, "LD_DEBUG": "libs"}
        return rig.run(env=env, command=["/usr/sbin/chroot", "--userspec=nobody:nogroup", str(root.path), QUEUE])
    finally:
        daemon.terminate()
        daemon.wait(30)
        log.close()
        conf.write_bytes(installed)


def test_install_message_reinstall_upgrade_purge(root, tmp_path):
    deb = package()
    root.add_qmail()
    root.mount_proc()
    before = snapshot(root.host("/var/qmail"))
    original = snapshot(root.host("/var/qmail/bin"))["qmail-queue"]

    dpkg_install(root, deb)
    assert_fp_qmail_in_place(root, original)
    assert root.chroot("dpkg-statoverride", "--list", QUEUE).stdout.split() == \
        ["qmailq", "qmail", "4711", QUEUE]
    assert not root.host("/var/spool/fp-qmail").exists()  # for TCP sites, made by hand

    for transport in ("unix", "tcp"):
        result = send_message(root, tmp_path, transport)
        assert result.code == 0, result
        [(message, envelope_bytes, state)] = read_deliveries(root.host(DELIVERIES))
        assert message.endswith(MESSAGE.split(b"\n\n", 1)[1])
        assert b"X-Antivirus: " in message.split(b"\n\n", 1)[0]
        # Run by nobody, fp-qmail ran as qmailq and passed both ids on to qmail-queue.orig.
        assert (state["uid"], state["euid"]) == (65534, root.ids("qmailq", "qmail")[0])
        # The setuid program loaded the system's libraries only: no $ORIGIN, nothing of
        # its own folder or of /var/qmail/bin.
        loaded = [line.split("file=", 1)[1].split()[0] for line in result.stderr.splitlines()
                  if "trying file=" in line]
        assert loaded and all(p.startswith("/lib/x86_64-linux-gnu/") for p in loaded), loaded
        for delivered in root.host(DELIVERIES).iterdir():
            delivered.unlink()
    assert list(root.host("/var/spool/fp-qmail").iterdir()) == []
    root.chroot("rm", "-r", "/var/spool/fp-qmail")
    # The other launcher works too: the quarantine the daemon made is empty.
    assert root.chroot("/usr/bin/fpqmail-quarantine", "list").stdout == ""

    # Reinstall, reconfigure, upgrade: fp-qmail stays in place, qmail's stays .orig.
    dpkg_install(root, deb)
    assert_fp_qmail_in_place(root, original)
    root.chroot("dpkg-reconfigure", "fp-qmail")
    assert_fp_qmail_in_place(root, original)
    newer, new_version = upgraded_copy(deb, tmp_path)
    dpkg_install(root, newer)
    assert root.chroot("dpkg-query", "-W", "-f=${Version}", "fp-qmail").stdout == new_version
    assert_fp_qmail_in_place(root, original)

    # Remove: qmail's qmail-queue back, owner and mode included; the trusted uids stay
    # until purge.
    root.chroot("dpkg", "--remove", "fp-qmail")
    assert snapshot(root.host("/var/qmail")) == before
    assert QUEUE not in root.chroot("dpkg-divert", "--list").stdout
    assert root.chroot("dpkg-statoverride", "--list", QUEUE, check=False).stdout == ""
    assert sorted(p.name for p in root.host("/etc/fp-qmail").iterdir()) == ["trusted-uids"]
    root.chroot("dpkg", "--purge", "fp-qmail")
    assert snapshot(root.host("/var/qmail")) == before
    assert not root.host("/etc/f-prot.conf").exists() and not root.host("/etc/fp-qmail").exists()


@pytest.mark.parametrize("case", ["orig-exists", "no-qmailq", "no-qmail", "make-installed"])
def test_install_refuses_and_changes_nothing(root, case):
    deb = package()
    if case != "no-qmail":
        root.add_qmail()
    if case == "orig-exists":
        root.host(ORIG).write_bytes(b"#!/bin/sh\n# someone else's wrapper left this\n")
    elif case == "no-qmailq":
        root.chroot("userdel", "qmailq")
    elif case == "make-installed":
        queue = root.host(QUEUE)
        queue.rename(root.host(ORIG))
        queue.write_bytes(BINARY.read_bytes())
    before = snapshot(root.host("/var/qmail")) if case != "no-qmail" else None
    result = dpkg_install(root, deb, check=False)
    assert result.returncode != 0
    assert "nothing changed" in result.stderr
    if before is not None:
        assert snapshot(root.host("/var/qmail")) == before
    assert QUEUE not in root.chroot("dpkg-divert", "--list").stdout
    assert root.chroot("dpkg-statoverride", "--list", check=False).stdout == ""
    status = root.chroot("dpkg-query", "-W", "-f=${db:Status-Abbrev}", "fp-qmail", check=False).stdout
    assert not status.startswith("ii"), status
