"""What an administrator meets in fpqmail-scand (issue 9, section 4): --check reaches
every engine and the quarantine's needs, bad option values and hostile arguments get
one clear line and exit 2, a store directory someone else made is refused, the
janitor's one sweep."""

import datetime
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import MESSAGE, REPO
from fpqmail.scand import janitor
from fpqmail.scand.quarantine import Store
from scand_fixtures import ATTACHED, ask, spool

NOBODY = 65534


def scand(tmp_path, *args, env=None, timeout=60):
    """fpqmail-scand run to its end (it must not start serving): (code, stdout, stderr).
    An empty config file comes first; a later --config wins, as argparse does."""
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    environment.update(env or {})
    config = tmp_path / "empty.conf"
    config.write_text("")
    r = subprocess.run([sys.executable, "-m", "fpqmail.scand", "--config", str(config),
                        "--listen", "127.0.0.1:0", "--tmpdir", str(tmp_path), *map(os.fsencode, args)],
                       capture_output=True, env=environment, cwd=str(tmp_path), timeout=timeout)
    return r.returncode, r.stdout.decode(), r.stderr.decode(errors="replace")


def hide_zstandard(tmp_path):
    """A PYTHONPATH directory whose zstandard module cannot be imported, as on a
    machine without python3-zstandard."""
    directory = tmp_path / "no-zstandard"
    directory.mkdir()
    (directory / "zstandard.py").write_text("raise ImportError(\"No module named 'zstandard'\")\n")
    return {"PYTHONPATH": f"{directory}:{REPO}"}


# ---- zstandard ------------------------------------------------------------------------

@pytest.mark.parametrize("check", [True, False], ids=["--check", "start"])
def test_without_zstandard_a_quarantine_refuses_to_start(tmp_path, check):
    code, out, err = scand(tmp_path, "--quarantine", tmp_path / "q", *(["--check"] if check else []),
                           env=hide_zstandard(tmp_path))
    assert code == 2, (out, err)
    assert f"configuration: {tmp_path}/q: cannot use as a store: the Python module zstandard " \
           "cannot be imported" in err and "install python3-zstandard" in err
    assert "Traceback" not in err and "listening on" not in err


def test_without_zstandard_a_daemon_without_store_starts(tmp_path):
    code, out, err = scand(tmp_path, "--check", env=hide_zstandard(tmp_path))
    assert code == 0 and "FP_SCAND_QUARANTINE=\n" in out, err


# ---- --check reaches every engine ------------------------------------------------------

def test_check_names_an_engine_that_does_not_answer_and_still_prints_the_settings(tmp_path):
    dead = tmp_path / "nonexistent.sock"
    code, out, err = scand(tmp_path, "--check", "--engine", "builtin", "--engine", f"clamd:{dead}")
    assert code == 3, (out, err)
    assert f"FP_SCAND_ENGINES=builtin clamd:{dead}\n" in out
    assert f"--check: engine clamd:{dead} does not answer: clamd: {dead}: No such file or directory" in err
    assert "Traceback" not in err and "requests fail until it does" not in err  # said once, for --check


def test_check_names_a_hung_engine_after_its_own_timeout(tmp_path):
    (tmp_path / "with-timeout.conf").write_text("FP_SCAND_CLAMD_TIMEOUT=1\n")
    with socket.socket() as hung:  # connects (the kernel's backlog), never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        spec = "clamd:127.0.0.1:%d" % hung.getsockname()[1]
        started = time.monotonic()
        code, out, err = scand(tmp_path, "--config", tmp_path / "with-timeout.conf", "--check",
                               "--engine", spec)
    assert code == 3 and f"--check: engine {spec} does not answer" in err, (out, err)
    assert time.monotonic() - started < 50  # its 1 s timeout, not the default 60 s


def test_check_passes_when_every_engine_answers(tmp_path, clamd):
    code, out, err = scand(tmp_path, "--check", "--engine", "builtin", "--engine", clamd.unix_spec,
                           "--engine", clamd.tcp_spec)
    assert code == 0, err
    assert "does not answer" not in err


def test_a_daemon_starts_while_clamd_is_down_and_says_so(start_scand, tmp_path):
    dead = tmp_path / "down.sock"
    daemon = start_scand(tmp_path, engines=("builtin", f"clamd:{dead}"))
    daemon.wait_log(r"engine clamd.*does not answer now \(requests fail until it does\)")
    status, headers = ask(daemon.port, *spool(tmp_path, MESSAGE))
    assert status == "ERROR" and headers["Reason"][0].startswith("engine failure"), headers


# ---- bad option values: one clear line, exit 2 -----------------------------------------

@pytest.mark.parametrize("args, text", [
    (["--listen", b"\xff:1"], "FP_SCAND_LISTEN='?:1': expected host:port"),
    (["--listen", ""], "FP_SCAND_LISTEN"),
    (["--listen", "[::1]:99999"], "FP_SCAND_LISTEN='[::1]:99999'"),
    (["--workers", b"\xff"], "FP_SCAND_WORKERS='?': not a decimal number"),
    (["--workers", "1e9"], "FP_SCAND_WORKERS='1e9'"),
    (["--queue", "-1"], "FP_SCAND_QUEUE='-1'"),
    (["--timeout", "nan"], "FP_SCAND_TIMEOUT='nan'"),
    (["--timeout", "inf"], "FP_SCAND_TIMEOUT='inf'"),
    (["--loglevel", "99"], "FP_SCAND_LOGLEVEL='99'"),
    (["--tmpdir", "relative"], "FP_SCAND_TMPDIR='relative'"),
    (["--tmpdir", b"/tmp/\xff"], "FP_SCAND_TMPDIR='/tmp/?'"),
    (["--tmpdir", "/nonexistent"], "FP_SCAND_TMPDIR=/nonexistent: not a directory"),
    (["--quarantine", "relative"], "FP_SCAND_QUARANTINE='relative'"),
    (["--backup", b"/tmp/b\xff\n"], "FP_SCAND_BACKUP='/tmp/b??'"),
    (["--quarantine", "/nonexistent/q"], "/nonexistent/q: cannot use as a store: /nonexistent/q: cannot create"),
    (["--engine", ""], "FP_SCAND_ENGINES: no engine given"),
    (["--engine", "clamd:"], "engine clamd:: unknown engine"),
    (["--engine", "clamd:nohost"], "engine clamd:nohost:"),
    (["--engine", b"fpscand:\xff:1"], "engine fpscand:"),
    (["--config", b"/tmp/\xff"], "configuration: /tmp/"),
    (["--config", "/"], "configuration: /: cannot read"),
    (["--engine", b"clamd:/tmp/\x01\x1b[2J"], "configuration: engine clamd:/tmp/??[2J: a unix socket path"),
])
def test_bad_option_values_exit_2_with_one_clear_line(tmp_path, args, text):
    code, out, err = scand(tmp_path, "--check", *args)
    assert code == 2, (out, err)
    assert text in err and "Traceback" not in err and "Logging error" not in err, err
    assert out == ""  # the settings are printed only once they all hold


def test_a_config_file_of_any_name_and_bytes_gets_clear_warnings(tmp_path):
    config = os.path.join(os.fsencode(tmp_path), b"f\xff.conf")
    with open(config, "wb") as f:
        f.write(b"FP_SCAND_WORKERS=2\n\xff\xfe not an assignment $(reboot)\n")
    code, out, err = scand(tmp_path, "--config", config, "--check")
    assert code == 0 and "FP_SCAND_WORKERS=2\n" in out, err
    assert f"WARNING: {tmp_path}/f?.conf line 2 skipped: not an assignment:" in err
    assert "Traceback" not in err and "Logging error" not in err


def test_bad_command_lines_exit_2_with_usage(tmp_path):
    for args in (["--nosuch"], ["--listen"], ["extra"], ["--config", ""]):
        code, out, err = scand(tmp_path, *args)
        assert code == 2 and "usage: fpqmail-scand" in err and "Traceback" not in err, (args, err)


# ---- the store directory is ours or refused --------------------------------------------

def _prepare(tmp_path, how):
    q = tmp_path / "q"
    outside = tmp_path / "outside"
    outside.mkdir()
    if how == "another user's":
        q.mkdir(0o700)
        os.chown(q, NOBODY, NOBODY)
        return q, f"{q}: belongs to uid {NOBODY}, not to this daemon's user (uid 0) or root: refused"
    if how == "writable by others":
        q.mkdir()
        q.chmod(0o777)
        return q, f"{q}: writable by group or others (mode 0777): refused"
    if how == "group-writable tmp":
        (q / "tmp").mkdir(parents=True)
        (q / "tmp").chmod(0o770)
        return q, f"{q}/tmp: writable by group or others (mode 0770): refused"
    if how == "a symlink":
        q.symlink_to(outside)
        return q, f"{q}: a symlink or not a directory: refused"
    if how == "tmp a symlink":
        q.mkdir()
        (q / "tmp").symlink_to(outside)
        return q, f"{q}/tmp: a symlink or not a directory: refused"
    if how == "a file":
        q.write_bytes(b"")
        return q, f"{q}: a symlink or not a directory: refused"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["another user's", "writable by others", "group-writable tmp", "a symlink",
                                 "tmp a symlink", "a file"])
@pytest.mark.parametrize("option", ["--quarantine", "--backup"])
def test_a_store_directory_not_ours_is_refused_at_start(tmp_path, how, option):
    q, text = _prepare(tmp_path, how)
    code, out, err = scand(tmp_path, option, q)
    assert code == 2 and f"configuration: {q}: cannot use as a store: {text}" in err, err
    assert os.listdir(tmp_path / "outside") == [] and "Traceback" not in err


def _days():
    """Today's and tomorrow's UTC day directories (a test may run across midnight)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return [f"{now + datetime.timedelta(days=d):%Y%m%d}" for d in (0, 1)]


def test_a_day_directory_planted_later_is_refused_per_message(start_scand, tmp_path):
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    q = tmp_path / "q"
    daemon = start_scand(spool_dir, quarantine=q)
    outside = tmp_path / "outside"
    outside.mkdir()
    for day in _days():
        (q / day).symlink_to(outside)
    status, headers = ask(daemon.port, *spool(spool_dir, ATTACHED))
    assert (status, headers) == ("ERROR", {"Reason": ["cannot store the original in the quarantine"]})
    assert os.listdir(outside) == []
    daemon.wait_log(f"cannot store the original in the quarantine: {q}/{_days()[0]}: a symlink or not "
                    "a directory: refused")
    # a prefix directory of another user's: refused too
    for day in _days():
        (q / day).unlink()
        (q / day).mkdir()
        for prefix in range(256):
            (q / day / ("%02x" % prefix)).mkdir()
            os.chown(q / day / ("%02x" % prefix), NOBODY, NOBODY)
    status, headers = ask(daemon.port, *spool(spool_dir, ATTACHED))
    assert status == "ERROR", headers
    daemon.wait_log(f"belongs to uid {NOBODY}, not to this daemon's user")
    assert all(os.listdir(q / day / ("%02x" % p)) == [] for day in _days() for p in range(256))
    assert ask(daemon.port, *spool(spool_dir, MESSAGE))[0] == "CLEAN"  # clean mail flows on


# ---- the janitor's one sweep -----------------------------------------------------------

def _litter(directory, outside, name):
    """A stale regular file, a symlink to a file elsewhere, a FIFO and a directory,
    each under a name the sweep would take."""
    (directory / name).write_bytes(b"left behind")
    (directory / (name[:-1] + "1")).symlink_to(outside)
    os.mkfifo(directory / (name[:-1] + "2"))
    (directory / (name[:-1] + "3")).mkdir()


@pytest.mark.parametrize("where", ["tmpdir", "store"])
def test_one_sweep_removes_stale_regular_files_only_and_follows_nothing(tmp_path, where):
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    if where == "tmpdir":
        directory = tmp_path / "spool"
        directory.mkdir()
        name = "fi42.0123456789abcdef0"
        (directory / "unrelated").write_bytes(b"x")  # not fp-qmail's pattern: kept

        def sweep(now):
            return janitor.sweep_tmpdir(str(directory), 600, now=now)
    else:
        store = Store(str(tmp_path / "q")).create()
        directory = tmp_path / "q" / "tmp"
        name = "42.0123456789abcdef0"

        def sweep(now):
            with store.temp_directory() as fd:
                return janitor.remove_stale(fd, store.temp_path, 600, now=now)
    _litter(directory, outside, name)
    assert sweep(time.time()) == 0  # fresh: kept
    assert sweep(time.time() + 601) == 1
    assert not (directory / name).exists()
    assert outside.read_bytes() == b"keep"
    assert sorted(os.listdir(directory)) == sorted({name[:-1] + s for s in "123"} |
                                                   ({"unrelated"} if where == "tmpdir" else set()))


def test_the_running_janitor_sweeps_the_stores_and_logs_each_removal(start_scand, tmp_path):
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    q, b = tmp_path / "q", tmp_path / "b"
    for store in (q, b):
        Store(str(store)).create()
        (store / "tmp" / "7.00000000000000ff").write_bytes(b"an interrupted write")
    daemon = start_scand(spool_dir, quarantine=q, args=["--backup", b],
                         config={"FP_SCAND_TIMEOUT": "1", "FP_QMAIL_TIMEOUT": "1",
                                 "FP_SCAND_STALE_AGE": "2", "FP_SCAND_JANITOR_INTERVAL": "0.2"})
    for store in (q, b):
        daemon.wait_log(f"janitor: removed {store}/tmp/7.00000000000000ff, left behind", timeout=20)
        assert os.listdir(store / "tmp") == []


def test_check_with_standard_output_closed_still_checks(tmp_path):
    dead = tmp_path / "nonexistent.sock"
    r = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-m", "fpqmail.scand", "--config",
                        "/dev/null", "--tmpdir", str(tmp_path), "--engine", f"clamd:{dead}", "--check"],
                       capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    assert r.returncode == 3 and b"does not answer" in r.stderr and b"Traceback" not in r.stderr, r
