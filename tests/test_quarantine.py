"""The quarantine: the store itself, what the daemon puts in it, and fpqmail-quarantine
(list, show, export, release through the strict qmail-queue stand-in, delete)."""

import json
import os
import re
import stat
import subprocess
import sys

import pytest

from conftest import REPO, read_deliveries
from fpqmail.scand.protocol import Envelope
from fpqmail.scand.quarantine import ID, Store
from scand_fixtures import ATTACHED, EICAR, HEADER, TEMPORARY, connect

ODD_ENVELOPE = Envelope(b"", (b"b\xe9b@example.net", b"carol@example.org"))  # bounce, 8-bit address


def tool(*args, env=None):
    environment = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", "fpqmail.scand.quarantine_tool", *map(str, args)],
                          capture_output=True, env=environment)


def test_store_layout_modes_and_zstd_compatibility(tmp_path):
    store = Store(str(tmp_path / "q")).create()
    message = b"Subject: x\r\n\r\n\x00\xff binary " * 1000
    first = store.put(message, ODD_ENVELOPE, kind="quarantine", status="infected",
                      threats=["Eicar in a.zip"], engines=["builtin"], now=1764000000)
    second = store.put(b"m2", ODD_ENVELOPE, kind="quarantine", status="cleaned",
                       threats=["X"], engines=["builtin"], now=1764090000)  # the next day
    assert ID.match(first) and first.startswith("20251124/")
    assert list(store.ids()) == [first, second]
    path = store.message_path(first)
    assert path == os.path.join(str(tmp_path / "q"), first + ".eml.zst")
    for p in (path, path.replace(".eml.zst", ".json")):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    for d in (tmp_path / "q" / first[:8], tmp_path / "q" / first[:11]):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert os.path.getsize(path) < len(message) / 10
    # the standard zstd command opens it
    assert subprocess.run(["zstd", "-d", "-c", path], capture_output=True, check=True).stdout == message
    assert store.original(first) == message
    meta = store.meta(first)
    assert (meta["status"], meta["threats"], meta["engines"], meta["time"]) == \
        ("infected", ["Eicar in a.zip"], ["builtin"], "2025-11-24T16:00:00Z")
    from fpqmail.scand.quarantine import envelope_of
    assert envelope_of(meta) == ODD_ENVELOPE
    assert os.listdir(tmp_path / "q" / "tmp") == []


def test_a_damaged_entry_is_refused_not_released(tmp_path):
    store = Store(str(tmp_path)).create()
    entry = store.put(b"original", ODD_ENVELOPE, kind="quarantine", status="infected",
                      threats=["X"], engines=["builtin"])
    meta_path = store.message_path(entry).replace(".eml.zst", ".json")
    meta = json.loads(open(meta_path).read())
    meta["sha256"] = "0" * 64
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    r = tool("--dir", tmp_path, "release", entry, env={"FP_QMAIL_QUEUE": "/bin/false"})
    assert r.returncode == 1 and b"does not match its SHA-256" in r.stderr


def test_stale_temp_files_of_an_interrupted_write_are_swept(tmp_path):
    store = Store(str(tmp_path)).create()
    leftover = tmp_path / "tmp" / "123.0123456789abcdef"
    leftover.write_bytes(b"half")
    assert store.sweep_temp(3600) == 0
    os.utime(leftover, (0, 0))  # ctime stays now: the later of the two counts
    assert store.sweep_temp(3600) == 0
    assert store.sweep_temp(0) == 1 and not leftover.exists()


def test_round_trip_through_daemon_tool_and_qmail_queue(rig, start_scand, tmp_path):
    """Infected original kept by the daemon; list, show, export; release hands the
    original and its envelope, byte for byte, to qmail-queue.orig; then delete."""
    qdir = tmp_path / "q"
    connect(rig, start_scand(rig.tmpdir, quarantine=qdir))
    sender, recipients = b"", (b"b\xe9b@example.net", b"carol@example.org")
    raw_envelope = Envelope(sender, recipients).raw()
    r = rig.run(ATTACHED, env_bytes=raw_envelope)
    assert r.code == 0, r
    [(delivered, _, _)] = r.delivered
    assert EICAR not in delivered
    os.unlink(next(rig.queue_dir.glob("*.msg")))  # forget the cleaned delivery

    listing = tool("--dir", qdir, "list")
    assert listing.returncode == 0, listing.stderr
    [line] = listing.stdout.decode().splitlines()
    entry, when, status, shown_sender, shown_rcpts, threats = line.split("\t")
    assert ID.match(entry) and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", when)
    assert (status, shown_sender, shown_rcpts, threats) == \
        ("cleaned", "<>", "b?b@example.net,carol@example.org", "EICAR-Test-File in tool.com")

    shown = tool("--dir", qdir, "show", entry)
    assert shown.returncode == 0
    assert b"Status: cleaned\n" in shown.stdout and b"Released: never\n" in shown.stdout
    assert shown.stdout.endswith(ATTACHED.split(b"\n\n")[0] + b"\n\n")  # the original's header

    assert tool("--dir", qdir, "export", entry).stdout == ATTACHED
    exported = tmp_path / "original.eml"
    assert tool("--dir", qdir, "export", entry, "-o", exported).returncode == 0
    assert exported.read_bytes() == ATTACHED
    again = tool("--dir", qdir, "export", entry, "-o", exported)  # never overwrites
    assert again.returncode == 1 and b"File exists" in again.stderr

    queue_env = {"FP_QMAIL_QUEUE": str(rig.queue), "QQ_STANDIN_DIR": str(rig.queue_dir)}
    released = tool("--dir", qdir, "release", entry, env=queue_env)
    assert released.returncode == 0, released.stderr
    [(message, env, _)] = read_deliveries(rig.queue_dir)
    assert message == ATTACHED and env == raw_envelope
    twice = tool("--dir", qdir, "release", entry, env=queue_env)
    assert twice.returncode == 1 and b"--again" in twice.stderr
    assert len(read_deliveries(rig.queue_dir)) == 1
    assert b"Released: 20" in tool("--dir", qdir, "show", entry).stdout

    assert tool("--dir", qdir, "delete", entry).returncode == 0
    assert tool("--dir", qdir, "list").stdout == b""
    gone = tool("--dir", qdir, "show", entry)
    assert gone.returncode == 1 and gone.stderr == f"fpqmail-quarantine: {entry}: no such entry\n".encode()


def test_release_refused_by_qmail_queue_leaves_the_entry_unreleased(rig, tmp_path):
    store = Store(str(tmp_path / "q")).create()
    entry = store.put(ATTACHED, ODD_ENVELOPE, kind="quarantine", status="infected", threats=["X"], engines=["b"])
    r = tool("--dir", tmp_path / "q", "release", entry,
             env={"FP_QMAIL_QUEUE": str(rig.queue), "QQ_STANDIN_DIR": str(rig.queue_dir), "QQ_STANDIN_EXIT": "71"})
    assert r.returncode == 1 and b"did not accept" in r.stderr and b"exit 71" in r.stderr
    assert store.meta(entry)["released"] == []


def test_queue_program_comes_from_the_config_file_when_not_in_the_environment(rig, tmp_path):
    store = Store(str(tmp_path / "q")).create()
    entry = store.put(b"Subject: m\n\nbody\n", ODD_ENVELOPE, kind="quarantine", status="infected",
                      threats=["X"], engines=["b"])
    config = tmp_path / "f-prot.conf"
    config.write_text(f"FP_QMAIL_QUEUE={rig.queue}\nFP_SCAND_QUARANTINE={tmp_path / 'q'}\n")
    env = {k: v for k, v in os.environ.items() if k != "FP_QMAIL_QUEUE"}
    env.update(PYTHONPATH=str(REPO), QQ_STANDIN_DIR=str(rig.queue_dir))
    r = subprocess.run([sys.executable, "-m", "fpqmail.scand.quarantine_tool", "--config", str(config),
                        "release", entry], capture_output=True, env=env)
    assert r.returncode == 0, r.stderr
    [(message, envelope, _)] = read_deliveries(rig.queue_dir)
    assert message == b"Subject: m\n\nbody\n" and envelope == ODD_ENVELOPE.raw()


@pytest.mark.parametrize("args, code, text", [
    (["show", "../../etc/passwd"], 1, b"not an entry ID"),
    (["show", "20260101/ab/1.0123456789abcdef"], 1, b"no such entry"),
    (["delete", "20260101/ab/1.0123456789abcdef"], 1, b"no such entry"),
])
def test_bad_ids_are_refused_clearly(tmp_path, args, code, text):
    Store(str(tmp_path)).create()
    r = tool("--dir", tmp_path, *args)
    assert r.returncode == code and text in r.stderr and b"Traceback" not in r.stderr


def test_no_store_named_is_a_usage_error(tmp_path):
    r = tool("--config", tmp_path / "absent.conf", "list")
    assert r.returncode == 2 and b"no such file" in r.stderr
    (tmp_path / "empty.conf").write_text("")
    r = tool("--config", tmp_path / "empty.conf", "list")
    assert r.returncode == 2 and b"give --dir DIR or set FP_SCAND_QUARANTINE" in r.stderr


def test_backup_keeps_every_message_and_quarantine_only_infected(rig, start_scand, tmp_path):
    connect(rig, start_scand(rig.tmpdir, quarantine=tmp_path / "q", args=["--backup", tmp_path / "b"]))
    clean = b"Subject: clean\n\nhello\n"
    assert rig.run(clean).code == 0
    assert rig.run(ATTACHED).code == 0
    backups = Store(str(tmp_path / "b"))
    kept = [backups.original(i) for i in backups.ids()]
    assert sorted(kept) == sorted([clean, ATTACHED])
    assert {backups.meta(i)["kind"] for i in backups.ids()} == {"backup"}
    quarantined = Store(str(tmp_path / "q"))
    assert [quarantined.original(i) for i in quarantined.ids()] == [ATTACHED]
    delivered = sorted(m for m, _, _ in read_deliveries(rig.queue_dir))
    assert HEADER + clean in delivered


def test_a_quarantine_that_cannot_be_written_means_no_delivery(rig, start_scand, tmp_path):
    qdir = tmp_path / "q"
    daemon = connect(rig, start_scand(rig.tmpdir, quarantine=qdir))
    os.rmdir(qdir / "tmp")
    (qdir / "tmp").write_bytes(b"in the way")
    r = rig.run(ATTACHED)
    assert r.code in TEMPORARY and r.delivered == [], r
    assert "cannot store the original in the quarantine" in daemon.log()
    assert rig.run(b"Subject: clean\n\nhello\n").code == 0  # clean mail needs no quarantine
