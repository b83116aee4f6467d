"""Configuration: the environment first; /etc/f-prot.conf (FP_QMAIL_CONF) only when
FP_QMAIL_LOGLEVEL is not in the environment; an sh-compatible file read without a shell."""
import shlex
import shutil
import subprocess

import pytest
from hypothesis import given, settings, strategies as st

import scanner_double as sd
from fpqmail import shconf


def write_conf(rig, text):
    path = rig.root / "f-prot.conf"
    path.write_text(text)
    rig.env["FP_QMAIL_CONF"] = str(path)
    return path


def strace_opens(rig, env):
    """Run fp-qmail under strace; return the paths it tried to open."""
    trace = rig.root / "trace"
    command = ["strace", "-f", "-qq", "-e", "trace=open,openat", "-o", str(trace)] + \
        __import__("conftest").fp_qmail_command()
    r = rig.run(env=env, command=command)
    return r, trace.read_text()


def test_loglevel_in_the_environment_means_the_file_is_never_opened(rig):
    rig.scan_with(sd.clean)
    path = write_conf(rig, "FP_QMAIL_ON_VIRUS=reject\n")
    r, trace = strace_opens(rig, {"FP_QMAIL_LOGLEVEL": "6"})
    assert r.code == 0, r
    assert str(path) not in trace


def test_without_loglevel_in_the_environment_the_file_is_read_and_used(rig):
    rig.scan_with(sd.infected("Worm.A"))
    path = write_conf(rig, "# site policy\nexport FP_QMAIL_ON_VIRUS='drop'\nFP_QMAIL_LOGLEVEL=6\n")
    r, trace = strace_opens(rig, {"FP_QMAIL_LOGLEVEL": None})
    assert str(path) in trace
    assert r.code == 0 and r.delivered == [], r
    assert "verdict=dropped" in r.stderr


def test_environment_wins_over_the_file_key_by_key(rig):
    rig.scan_with(sd.infected("Worm.A"))
    write_conf(rig, "FP_QMAIL_ON_VIRUS=drop\nFP_QMAIL_REJECT_TEXT='from the file {threats}'\n")
    r = rig.run(fd6=True, env={"FP_QMAIL_LOGLEVEL": None, "FP_QMAIL_ON_VIRUS": "reject"})
    assert r.code == 82, r
    assert r.fd6_text == b"Dfrom the file Worm.A"


def test_lines_it_cannot_parse_are_logged_and_skipped(rig):
    rig.scan_with(sd.infected("Worm.A"))
    write_conf(rig, "FP_QMAIL_LOGLEVEL=7\nFP_QMAIL_ON_VIRUS=$(touch /tmp/pwned)\n"
                    "rm -rf /\nFP_QMAIL_REJECT_TEXT=\"unterminated\nFP_QMAIL_ON_VIRUS=drop\n")
    r = rig.run(env={"FP_QMAIL_LOGLEVEL": None})
    assert r.code == 0 and r.delivered == [], r  # the last, valid line still counts
    assert "line 2 skipped: expansion is not supported" in r.stderr
    assert "line 3 skipped: not an assignment" in r.stderr
    assert "line 4 skipped: unterminated double quote" in r.stderr


def test_missing_config_file_means_defaults(rig):
    rig.scan_with(sd.clean)
    rig.env["FP_QMAIL_CONF"] = str(rig.root / "absent.conf")
    r = rig.run(env={"FP_QMAIL_LOGLEVEL": None, "FP_QMAIL_LOG_STDERR": "yes"})
    assert r.code == 0, r


def test_unreadable_config_is_exit_55(rig):
    rig.scan_with(sd.clean)
    rig.env["FP_QMAIL_CONF"] = str(rig.root)  # a directory: open works, read fails
    r = rig.run(env={"FP_QMAIL_LOGLEVEL": None})
    assert r.code == 55, r
    assert r.delivered == []


def test_huge_config_is_exit_55(rig):
    rig.scan_with(sd.clean)
    write_conf(rig, "# padding\n" * 200000)
    r = rig.run(env={"FP_QMAIL_LOGLEVEL": None})
    assert r.code == 55, r
    assert "larger than" in r.stderr


@pytest.mark.parametrize("key, value", [
    ("FP_QMAIL_TIMEOUT", "abc"), ("FP_QMAIL_TIMEOUT", "0"), ("FP_QMAIL_TIMEOUT", "-5"),
    ("FP_QMAIL_TIMEOUT", "nan"), ("FP_QMAIL_TIMEOUT", "1e9"), ("FP_QMAIL_CONNECT_TIMEOUT", ""),
    ("FP_QMAIL_LOGLEVEL", "8"), ("FP_QMAIL_LOGLEVEL", "debug"), ("FP_QMAIL_ON_VIRUS", "ignore"),
    ("FP_QMAIL_ON_ERROR", "retry"), ("FP_QMAIL_GROUP_ACCESS", "maybe"),
    ("FP_QMAIL_TMPDIR", "relative/dir"), ("FP_QMAIL_TMPDIR", "/tmp/new\nline"),
    ("FP_QMAIL_QUEUE", "qmail-queue.orig"), ("FP_QMAIL_SCANNER", "localhost"),
    ("FP_QMAIL_SCANNER", "127.0.0.1:99999"), ("FP_QMAIL_SCANNER", "127.0.0.1:11200,"),
    ("FP_QMAIL_SCANNER", b"\xff:11200"), ("FP_QMAIL_SCANNER", "127.0.0.1:\u00b9"),
    ("FP_QMAIL_SCANNER", "127.0.0.1:" + "1" * 5000), ("FP_QMAIL_SCANNER", "/run/sock\u00e9t"),
    ("FP_QMAIL_REJECT_TEXT", ""), ("FP_QMAIL_REJECT_TEXT", "ab"), ("FP_QMAIL_REJECT_TEXT", "\r\nx\r\n"),
    ("FP_QMAIL_MAX_SIZE", "50M"), ("FP_QMAIL_MAX_SIZE", "-1"), ("FP_QMAIL_MAX_SIZE", "1.5"),
], ids=lambda v: repr(v)[:40])
def test_a_value_that_cannot_be_parsed_is_exit_55_naming_key_and_value(rig, key, value):
    scanner = rig.scan_with(sd.clean)
    r = rig.run(env={key: value})
    assert r.code == 55, r
    assert "bad setting %s=" % key in r.stderr
    assert r.delivered == [] and scanner.requests == []


def test_unknown_fp_qmail_variables_are_ignored(rig):
    rig.scan_with(sd.clean)
    r = rig.run(env={"FP_QMAIL_": "x", "FP_QMAIL_FOO": "\xff garbage", "FP_QMAILX": "1"})
    assert r.code == 0, r


# ---- the parser on its own ---------------------------------------------------------------

def test_parser_handles_the_sh_forms_it_promises():
    values, problems = shconf.parse(
        "# c\n\nA=1\nexport B='x y'  # c\nC=\"q \\\"d\\\" \\$x\" D=e\\ f\nexport E\nF=a'b'\"c\"\nG=v#1\n")
    assert values == {"A": "1", "B": "x y", "C": 'q "d" $x', "D": "e f", "F": "abc", "G": "v#1"}
    assert problems == []


@pytest.mark.parametrize("line", [
    "A=$HOME", "A=`id`", "A=\"$(id)\"", "A=x; B=y", "echo hi", "A='open", "A=\"open",
    "A=(1 2)", "A=x\\", "1A=x", "A=x | tee f", ". /etc/other.conf"])
def test_parser_refuses_what_needs_a_shell(line):
    values, problems = shconf.parse(line)
    assert values == {} and len(problems) == 1


names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True)
values = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0\n"), max_size=40)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(names, values, min_size=1, max_size=5), st.booleans())
def test_parser_agrees_with_sh(assignments, export):
    """Whatever values, quoted the way shlex quotes them, the parser reads exactly what
    /bin/sh assigns when it sources the same file."""
    text = "".join("%s%s=%s\n" % ("export " if export else "", k, shlex.quote(v))
                   for k, v in assignments.items())
    ours, problems = shconf.parse(text)
    assert problems == []
    script = text + "".join("printf '%%s\\0' \"$%s\"\n" % k for k in assignments)
    out = subprocess.run([shutil.which("sh"), "-c", script], capture_output=True, check=True).stdout
    sh_values = out.decode("utf-8", "surrogateescape").split("\0")[:-1]
    assert [ours[k] for k in assignments] == sh_values


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_parser_never_raises(text):
    values, problems = shconf.parse(text)
    assert all(isinstance(p, str) for _, p in problems)
