"""The quarantine: the store itself, what the daemon puts in it, and fpqmail-quarantine
(list, show, export, release through the strict qmail-queue stand-in, delete)."""

import json
import os
import re
import stat
import subprocess
import sys

import pytest

from conftest import REPO, become, read_deliveries
from fpqmail.scand.protocol import Envelope
from fpqmail.scand.quarantine import ID, Store
from scand_fixtures import ATTACHED, EICAR, HEADER, TEMPORARY, connect, exchange, parse_reply, request_bytes, spool

ODD_ENVELOPE = Envelope(b"", (b"b\xe9b@example.net", b"carol@example.org"))  # bounce, 8-bit address


def tool(*args, env=None, python=sys.executable, preexec_fn=None):
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    environment.update(env or {})
    return subprocess.run([python, "-m", "fpqmail.scand.quarantine_tool", *map(os.fsencode, args)],
                          capture_output=True, env=environment, preexec_fn=preexec_fn)


def test_store_layout_modes_and_zstd_compatibility(tmp_path):
    store = Store(str(tmp_path / "q")).create()
    message = b"Subject: x\r\n\r\n\x00\xff binary " * 1000
    first = store.put(message, ODD_ENVELOPE, kind="quarantine", status="infected", fate="rejected",
                      threats=["Eicar in a.zip"], engines=["builtin"], now=1764000000)
    second = store.put(b"m2", ODD_ENVELOPE, kind="quarantine", status="cleaned", fate="delivered",
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
    assert (meta["status"], meta["fate"], meta["threats"], meta["engines"], meta["time"]) == \
        ("infected", "rejected", ["Eicar in a.zip"], ["builtin"], "2025-11-24T16:00:00Z")
    from fpqmail.scand.quarantine import envelope_of
    assert envelope_of(meta) == ODD_ENVELOPE
    assert os.listdir(tmp_path / "q" / "tmp") == []


def test_a_damaged_entry_is_refused_not_released(tmp_path):
    store = Store(str(tmp_path)).create()
    entry = store.put(b"original", ODD_ENVELOPE, kind="quarantine", status="infected", fate="rejected",
                      threats=["X"], engines=["builtin"])
    meta_path = store.message_path(entry).replace(".eml.zst", ".json")
    meta = json.loads(open(meta_path).read())
    meta["sha256"] = "0" * 64
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    r = tool("--dir", tmp_path, "release", entry, env={"FP_QMAIL_QUEUE": "/bin/false"})
    assert r.returncode == 1 and b"does not match its SHA-256" in r.stderr


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
    entry, when, status, _fate, shown_sender, shown_rcpts, threats = line.split("\t")  # fates: below
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
    entry = store.put(ATTACHED, ODD_ENVELOPE, kind="quarantine", status="infected", fate="rejected",
                      threats=["X"], engines=["b"])
    r = tool("--dir", tmp_path / "q", "release", entry,
             env={"FP_QMAIL_QUEUE": str(rig.queue), "QQ_STANDIN_DIR": str(rig.queue_dir), "QQ_STANDIN_EXIT": "71"})
    assert r.returncode == 1 and b"did not accept" in r.stderr and b"exit 71" in r.stderr
    assert store.meta(entry)["released"] == []


def test_queue_program_comes_from_the_config_file_when_not_in_the_environment(rig, tmp_path):
    store = Store(str(tmp_path / "q")).create()
    entry = store.put(b"Subject: m\n\nbody\n", ODD_ENVELOPE, kind="quarantine", status="infected",
                      fate="rejected", threats=["X"], engines=["b"])
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


def test_an_empty_dir_is_a_usage_error_not_the_configured_store(tmp_path):
    store = Store(str(tmp_path / "q")).create()
    entry = store.put(b"m", ODD_ENVELOPE, kind="quarantine", status="cleaned", fate="delivered",
                      threats=["X"], engines=["b"])
    config = tmp_path / "f-prot.conf"
    config.write_text(f"FP_SCAND_QUARANTINE={tmp_path / 'q'}\n")
    r = tool("--config", config, "--dir", "", "delete", entry)
    assert r.returncode == 2 and b"--dir: an empty name" in r.stderr
    assert list(store.ids()) == [entry]
    assert tool("--config", "", "list").returncode == 2


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


# ---- what became of the message (On-Virus) ------------------------------------------------

BARE = b"Subject: bare\n\n" + EICAR + b"\n"  # nothing to cut out: infected


@pytest.mark.parametrize("message, on_virus, status, fate", [
    (ATTACHED, "deliver", "cleaned", "delivered"),
    (ATTACHED, "reject", "cleaned", "rejected"),
    (ATTACHED, "drop", "cleaned", "dropped"),
    (ATTACHED, None, "cleaned", "unknown"),
    (BARE, "deliver", "infected", "rejected"),
    (BARE, "drop", "infected", "dropped"),
], ids=lambda v: v if isinstance(v, str) else "none" if v is None else "attached" if v == ATTACHED else "bare")
def test_the_quarantine_records_the_fate_the_request_announces(start_scand, tmp_path, message, on_virus,
                                                               status, fate):
    daemon = start_scand(tmp_path, quarantine=tmp_path / "q")
    fi, fo = spool(tmp_path, message)
    data = request_bytes(fi, fo, len(message), headers=b"On-Virus: %s\n" % on_virus.encode() if on_virus else b"")
    reply_status, headers = parse_reply(exchange(daemon.port, data))
    assert reply_status in ("CLEANED", "INFECTED") and headers["Id"], headers
    [line] = tool("--dir", tmp_path / "q", "list").stdout.decode().splitlines()
    assert line.split("\t")[:4] == [headers["Id"][0], line.split("\t")[1], status, fate]
    shown = tool("--dir", tmp_path / "q", "show", headers["Id"][0]).stdout
    assert f"Status: {status}\nFate: {fate}\n".encode() in shown


def test_an_on_virus_of_another_value_is_a_malformed_request(start_scand, tmp_path):
    daemon = start_scand(tmp_path, quarantine=tmp_path / "q")
    fi, fo = spool(tmp_path, ATTACHED)
    data = request_bytes(fi, fo, len(ATTACHED), headers=b"On-Virus: quarantine\n")
    assert parse_reply(exchange(daemon.port, data)) == \
        ("ERROR", {"Reason": ["malformed request: On-Virus is not deliver, reject or drop"]})


def test_entries_stored_before_fates_were_recorded_show_unknown(tmp_path):
    store = Store(str(tmp_path)).create()
    entry = store.put(b"m", ODD_ENVELOPE, kind="quarantine", status="cleaned", fate="delivered",
                      threats=["X"], engines=["b"])
    rewrite_meta(store, entry, lambda meta: meta.pop("fate"))
    assert tool("--dir", tmp_path, "list").stdout.decode().split("\t")[3] == "unknown"


# ---- no tracebacks: damaged entries, hostile arguments, other users ------------------------

def rewrite_meta(store, entry, change):
    path = store.message_path(entry).replace(".eml.zst", ".json")
    meta = json.loads(open(path).read())
    change(meta)
    with open(path, "w") as f:
        json.dump(meta, f)


def damaged_store(tmp_path):
    """A store of three entries, the middle one damaged by the test."""
    store = Store(str(tmp_path / "q")).create()
    entries = [store.put(b"Subject: %d\n\nbody\n" % n, ODD_ENVELOPE, kind="quarantine", status="infected",
                         fate="rejected", threats=["X"], engines=["b"], now=1764000000 + n) for n in range(3)]
    return store, entries


@pytest.mark.parametrize("damage, text", [
    (lambda m: m.pop("recipients"), "damaged metadata: no recipients"),
    (lambda m: m.pop("sha256"), "damaged metadata: no sha256"),
    (lambda m: m.update(recipients=[5]), "damaged metadata: recipients not of the right type"),
    (lambda m: m.update(recipients="bob@example.net"), "damaged metadata: recipients not of the right type"),
    (lambda m: m.update(sender=None, threats=[["X"]]), "damaged metadata: sender, threats not of the right type"),
    (lambda m: m.update(size="12"), "damaged metadata: size not of the right type"),
    (lambda m: m.update(fate=1), "damaged metadata: fate not of the right type"),
    (lambda m: m.update(sender="\ud800"), "damaged metadata: sender or recipients not of the right type"),
    ("[1, 2]", "damaged metadata: not a JSON object"),
    ("{", "damaged metadata: Expecting property name"),
    ("[" * 100000, "damaged metadata:"),
    ("", "damaged metadata:"),
], ids=["no recipients", "no sha256", "recipient a number", "recipients a string", "sender null",
        "size a string", "fate a number", "lone surrogate", "a list", "cut short", "deep nesting", "empty"])
def test_a_damaged_entry_is_named_and_skipped_and_the_rest_still_works(rig, tmp_path, damage, text):
    store, entries = damaged_store(tmp_path)
    bad = entries[1]
    if callable(damage):
        rewrite_meta(store, bad, damage)
    else:
        with open(store.message_path(bad).replace(".eml.zst", ".json"), "w") as f:
            f.write(damage)
    listing = tool("--dir", tmp_path / "q", "list")
    assert listing.returncode == 1, listing
    assert [line.split("\t")[0] for line in listing.stdout.decode().splitlines()] == [entries[0], entries[2]]
    assert listing.stderr.decode().startswith(f"fpqmail-quarantine: {bad}: {text}")
    for action in ("show", "export", "release"):
        r = tool("--dir", tmp_path / "q", action, bad, env={"FP_QMAIL_QUEUE": "/bin/false"})
        assert r.returncode == 1 and r.stderr.decode().startswith(f"fpqmail-quarantine: {bad}: {text}")
        assert b"Traceback" not in r.stderr
    released = tool("--dir", tmp_path / "q", "release", entries[2],
                    env={"FP_QMAIL_QUEUE": str(rig.queue), "QQ_STANDIN_DIR": str(rig.queue_dir)})
    assert released.returncode == 0, released.stderr
    assert tool("--dir", tmp_path / "q", "delete", bad).returncode == 0  # and it can be removed


def test_symlinks_and_fifos_planted_in_an_entry_are_not_followed(tmp_path):
    store, entries = damaged_store(tmp_path)
    secret = tmp_path / "secret"
    secret.write_text('{"not": "yours"}')
    meta = store.message_path(entries[0]).replace(".eml.zst", ".json")
    os.unlink(meta)
    os.symlink(secret, meta)
    message = store.message_path(entries[1])
    os.unlink(message)
    os.mkfifo(message)
    r = tool("--dir", tmp_path / "q", "show", entries[0])
    assert r.returncode == 1 and b"unreadable metadata: Too many levels of symbolic links" in r.stderr
    r = tool("--dir", tmp_path / "q", "export", entries[1])
    assert r.returncode == 1 and b"damaged: its message is not a regular file" in r.stderr
    assert tool("--dir", tmp_path / "q", "export", entries[2]).returncode == 0


@pytest.fixture
def open_tmp():
    """A directory others may pass through (tmp_path is 0700 root)."""
    import tempfile
    from pathlib import Path
    directory = Path(tempfile.mkdtemp(prefix="fpq-admin-"))
    directory.chmod(0o711)
    yield directory
    subprocess.run(["rm", "-rf", str(directory)], check=True)


# fpqmail-quarantine by another user, with Debian's interpreter (the launcher's): the
# tests' own may live where others cannot read.
def as_nobody(*args):
    return tool(*args, python="/usr/bin/python3", preexec_fn=become("nobody"))


def test_a_store_of_another_user_gets_a_clear_line_not_a_traceback(open_tmp):
    store = Store(str(open_tmp / "q")).create()  # 0700 root, as the daemon makes it
    entry = store.put(b"m", ODD_ENVELOPE, kind="quarantine", status="cleaned", fate="delivered",
                      threats=["X"], engines=["b"])
    for args in (["list"], ["delete", entry], ["show", entry]):
        r = as_nobody("--dir", open_tmp / "q", *args)
        assert (r.returncode, r.stdout) == (2, b""), r
        assert r.stderr == f"fpqmail-quarantine: {open_tmp}/q: cannot open: Permission denied\n".encode()
    # readable but not writable: delete fails with a line of its own, the entry stays
    for directory in (open_tmp / "q", open_tmp / "q" / entry[:8], open_tmp / "q" / entry[:11]):
        directory.chmod(0o755)
    r = as_nobody("--dir", open_tmp / "q", "delete", entry)
    assert r.returncode == 1 and r.stderr == f"fpqmail-quarantine: {entry}: cannot delete: Permission denied\n".encode()
    assert list(store.ids()) == [entry]


@pytest.mark.parametrize("prepare, text", [
    (lambda d: (d / "q").symlink_to(d / "real"), "q: a symlink or not a directory: refused"),
    (lambda d: (d / "q").mkdir() or (d / "q").chmod(0o770), "q: writable by group or others (mode 0770): refused"),
    (lambda d: (d / "q").write_bytes(b""), "q: a symlink or not a directory: refused"),
    (lambda d: None, "q: no such directory"),
], ids=["symlink", "group-writable", "file", "absent"])
def test_a_store_others_could_write_in_or_a_symlink_is_refused_by_the_tool(tmp_path, prepare, text):
    (tmp_path / "real").mkdir()
    prepare(tmp_path)
    r = tool("--dir", tmp_path / "q", "list")
    assert r.returncode == 2 and r.stderr == f"fpqmail-quarantine: {tmp_path}/{text}\n".encode(), r


def test_a_release_by_root_leaves_the_metadata_to_the_stores_owner(rig, tmp_path):
    store = Store(str(tmp_path / "q")).create()
    entry = store.put(b"Subject: m\n\nbody\n", ODD_ENVELOPE, kind="quarantine", status="infected",
                      fate="rejected", threats=["X"], engines=["b"])
    for directory in (tmp_path / "q", tmp_path / "q" / "tmp", tmp_path / "q" / entry[:8], tmp_path / "q" / entry[:11]):
        os.chown(directory, 65534, 65534)  # the daemon's user's store, looked after by root
    released = tool("--dir", tmp_path / "q", "release", entry,
                    env={"FP_QMAIL_QUEUE": str(rig.queue), "QQ_STANDIN_DIR": str(rig.queue_dir)})
    assert released.returncode == 0, released.stderr
    meta = os.stat(store.message_path(entry).replace(".eml.zst", ".json"))
    assert (meta.st_uid, meta.st_gid, stat.S_IMODE(meta.st_mode)) == (65534, 65534, 0o600)


def test_without_zstandard_the_tool_lists_and_refuses_to_open_with_a_clear_line(tmp_path):
    store = Store(str(tmp_path / "q")).create()
    entry = store.put(b"m", ODD_ENVELOPE, kind="quarantine", status="cleaned", fate="delivered",
                      threats=["X"], engines=["b"])
    hidden = tmp_path / "no-zstandard"
    hidden.mkdir()
    (hidden / "zstandard.py").write_text("raise ImportError(\"No module named 'zstandard'\")\n")
    env = {"PYTHONPATH": f"{hidden}:{REPO}"}
    assert tool("--dir", tmp_path / "q", "list", env=env).returncode == 0
    r = tool("--dir", tmp_path / "q", "export", entry, env=env)
    assert r.returncode == 1 and r.stderr == (b"fpqmail-quarantine: the Python module zstandard cannot be "
                                              b"imported (No module named 'zstandard'): install python3-zstandard\n")


@pytest.mark.parametrize("args, code, text", [
    (["show", b"\xff"], 1, b"not an entry ID"),
    (["show", ""], 1, b"not an entry ID"),
    (["show", "20260101/ab/1.0123456789abcdef\n"], 1, b"not an entry ID"),
    (["release"], 2, b"usage:"),
    (["nosuch"], 2, b"usage:"),
    (["--dir", b"/tmp/\xff/q", "list"], 2, b"no such directory"),
    (["--config", "/", "list"], 2, b"/: cannot read"),
    (["export", "ENTRY", "-o", "/nonexistent/dir/x"], 1, b"cannot create: No such file or directory"),
    (["export", "ENTRY", "-o", "LINK"], 1, b"cannot create: File exists"),
])
def test_hostile_arguments_get_a_clear_line(tmp_path, args, code, text):
    store = Store(str(tmp_path / "q")).create()
    entry = store.put(b"m", ODD_ENVELOPE, kind="quarantine", status="cleaned", fate="delivered",
                      threats=["X"], engines=["b"])
    os.symlink(tmp_path / "target", tmp_path / "link")
    args = [{"ENTRY": entry, "LINK": str(tmp_path / "link")}.get(a, a) for a in args]
    if args[0] != "--dir":
        args = ["--dir", tmp_path / "q"] + args
    r = tool(*args)
    assert r.returncode == code and text in r.stderr and b"Traceback" not in r.stderr, r
    assert not (tmp_path / "target").exists()


@pytest.mark.parametrize("action", ["list", "show", "export"])
def test_a_closed_or_full_standard_output_is_a_clear_failure(tmp_path, action):
    store = Store(str(tmp_path / "q")).create()
    entry = store.put(b"m", ODD_ENVELOPE, kind="quarantine", status="cleaned", fate="delivered",
                      threats=["X"], engines=["b"])
    args = [action] + ([entry] if action != "list" else [])
    with open("/dev/full", "wb") as full:
        r = subprocess.run([sys.executable, "-m", "fpqmail.scand.quarantine_tool", "--dir", str(tmp_path / "q"),
                            *args], stdout=full, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 1 and r.stderr == b"fpqmail-quarantine: cannot write: No space left on device\n", r
    r = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-m", "fpqmail.scand.quarantine_tool",
                        "--dir", str(tmp_path / "q"), *args], stderr=subprocess.PIPE,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 1 and b"cannot write" in r.stderr and b"Traceback" not in r.stderr, r


def test_a_release_that_cannot_be_recorded_says_it_was_released(rig, tmp_path):
    store = Store(str(tmp_path / "q")).create()
    entry = store.put(b"Subject: m\n\nbody\n", ODD_ENVELOPE, kind="quarantine", status="infected",
                      fate="rejected", threats=["X"], engines=["b"])
    os.rmdir(tmp_path / "q" / "tmp")  # the tool never makes a store's directories (as root)
    r = tool("--dir", tmp_path / "q", "release", entry,
             env={"FP_QMAIL_QUEUE": str(rig.queue), "QQ_STANDIN_DIR": str(rig.queue_dir)})
    assert r.returncode == 1 and r.stderr.decode() == \
        f"fpqmail-quarantine: {rig.queue} accepted {entry}, but the release is not recorded: " \
        f"{tmp_path}/q/tmp: no such directory\n"
    assert len(read_deliveries(rig.queue_dir)) == 1 and not (tmp_path / "q" / "tmp").exists()
