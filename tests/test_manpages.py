"""The man pages (packaging/man) and the sample /etc/f-prot.conf against the code:
roff that `man --warnings` passes, every setting documented with its default and its
setuid rule, and a sample whose commented defaults are the code's."""
import re
import subprocess

import pytest

from conftest import REPO
from fpqmail import queue, shconf
from fpqmail.scand import settings as scand_settings

MAN = REPO / "packaging" / "man"
PAGES = sorted(MAN.glob("*.[158]"))
SAMPLE = REPO / "packaging" / "f-prot.conf"


def daemon_keys():
    """Every FP_SCAND_* key the daemon and its engines read, from their sources."""
    keys = set(scand_settings.DEFAULTS)
    for path in (REPO / "fpqmail" / "scand").rglob("*.py"):
        keys |= set(re.findall(r'"(FP_SCAND_[A-Z0-9_]+)"', path.read_text()))
    return keys


def entries():
    """key -> its paragraph in f-prot.conf(5), rendered as plain text."""
    text = subprocess.run(["groff", "-man", "-Tascii", "-rHY=0", "-rLL=300n", "-P-cbou",
                           str(MAN / "f-prot.conf.5")], check=True, capture_output=True,
                          text=True).stdout
    found = {}
    for match in re.finditer(r"^ {7}(FP_[A-Z0-9_]+)\n {14}(.*)$", text, re.M):
        found[match.group(1)] = match.group(2)
    return found


def test_pages_cover_the_programs():
    assert [p.name for p in PAGES] == ["f-prot.conf.5", "fp-qmail.8", "fpqmail-policy.5",
                                       "fpqmail-quarantine.1", "fpqmail-scand.8"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_man_warnings(page):
    result = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True,
                            text=True, env={"LC_ALL": "C.UTF-8", "MANWIDTH": "80", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0
    assert result.stderr == ""
    assert "NAME" in result.stdout


def test_every_setting_documented_with_its_default():
    documented = entries()
    for key, default in {**queue.DEFAULTS, **scand_settings.DEFAULTS}.items():
        assert key in documented, key
        expected = "Default: " + (default if default else "empty")
        assert documented[key].startswith(expected), (key, documented[key])
    assert daemon_keys() <= set(documented)
    assert set(documented) == set(queue.DEFAULTS) | daemon_keys(), \
        set(documented) ^ (set(queue.DEFAULTS) | daemon_keys())


def test_every_client_setting_states_its_setuid_rule():
    documented = entries()
    for key in queue.DEFAULTS:
        rule = re.search(r"Setuid: ([^.]*)\.", documented[key]).group(1)
        if key in queue.PATH_SETTINGS:
            assert rule == "file or default only", key
        elif key == "FP_QMAIL_SCANNER":
            assert "unix-socket entries only from the file or default" in rule
        else:
            assert rule == "environment allowed", key


def test_sample_config_names_every_key_with_the_code_defaults():
    text = SAMPLE.read_text()
    values, problems = shconf.parse(text)
    assert problems == []
    commented, _ = shconf.parse("\n".join(line[1:] for line in text.splitlines()
                                          if re.match(r"#FP_[A-Z0-9_]+=", line)))
    assert set(values) | set(commented) == set(queue.DEFAULTS) | daemon_keys()
    for key, value in commented.items():
        default = {**queue.DEFAULTS, **scand_settings.DEFAULTS}.get(key)
        if default is not None:
            assert value == default, key
    # What the installed sample changes, and why (f-prot.conf(5), FILES).
    assert values == {"FP_SCAND_QUARANTINE": "/var/lib/fp-qmail/quarantine"}
