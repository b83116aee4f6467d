#!/usr/bin/env python3
"""Build fp-qmail (the per-message program, fpqmail/queue.py) as a Nuitka standalone
binary: build/fp-qmail.dist/fp-qmail. `make build` runs this.

qmail execs fp-qmail once per message, so its start-up is its cost per message.
docs/performance.md has the measurements behind each choice made here.

Choices:
- Debian's /usr/bin/python3.11, not pyenv's `python3`: Debian builds _socket, select,
  syslog, fcntl, math, zlib... into libpython, and Nuitka links libpython statically, so
  the binary loads no extension module (.so) from its dist folder at run time. That
  matters because fp-qmail is installed setuid: glibc ignores $ORIGIN (the RPATH Nuitka
  gives the binary) in setuid programs, so a bundled .so would not be found, or would
  silently be replaced by the system's copy. pyenv's build dlopens ~6 .so at start.
- --mode=standalone, not onefile: onefile unpacks into a directory the caller chooses
  ($TMPDIR, $HOME) without checking its owner (unsafe setuid) and pays 35-80 ms per run.
- fpqmail/nuitka/fp-qmail.nuitka-package.config.yml, Nuitka's own package
  configuration mechanism: Nuitka imports `inspect` at every start to patch it; the
  file gives the binary a reduced `inspect` with only what that patch touches (-6 ms).
- libexpat: Debian's libpython carries pyexpat, so the binary is linked against
  libexpat.so.1 (DT_NEEDED). Nuitka would copy it next to the binary, where it is
  found through $ORIGIN only when not setuid; --noinclude-dlls keeps it out, so the
  system's /lib copy is used the same way in every mode.
- The daemon (fpqmail.scand) is never compiled in: the per-message program must not
  depend on it.

After the build it checks its own promises and fails if one does not hold: no
fp-qmail module imports `inspect` (so none depends on the reduced one; the tests run
the whole suite against the binary for the rest), the binary needs no shared
library from its own folder, and it is linked with full RELRO (-z now), as a setuid
program should be.

Usage: build.py [--jobs N]
"""
import argparse
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent
BUILD = ROOT / "build"
VENV = BUILD / "venv"
DIST = BUILD / "fp-qmail.dist"
BINARY = DIST / "fp-qmail"
REPORT = BUILD / "fp-qmail.report.xml"
PACKAGE_CONFIG = ROOT / "fpqmail" / "nuitka" / "fp-qmail.nuitka-package.config.yml"

BUILD_PYTHON = "/usr/bin/python3.11"
# Versions this build was made and measured with. zstandard: Nuitka's compression of
# its caches and payloads (standalone mode does not need it at run time); jsonschema:
# the version Nuitka asks for to validate the package configuration against its schema.
REQUIREMENTS = ("nuitka==4.3.3", "zstandard==0.25.0", "jsonschema==4.6.0")

NUITKA_OPTIONS = (
    "--mode=standalone",
    "--output-folder-name=" + DIST.name,
    "--output-filename=" + BINARY.name,
    "--user-package-configuration-file=" + str(PACKAGE_CONFIG),
    # fpqmail.queue imports the config parser lazily; name it so it is surely in.
    "--include-module=fpqmail.shconf",
    "--nofollow-import-to=fpqmail.scand",
    "--noinclude-dlls=libexpat.so*",
    # Python's own -S and -I: no site, no PYTHON* path variables, no user site. The
    # binary never reads PYTHONPATH anyway; isolated also spares it importing os.path
    # for a sys.path_hooks entry it would never use.
    "--python-flag=no_site,isolated",
    "--report=" + str(REPORT),
    "--remove-output",
)


def run(*command, **kwargs):
    print("+", " ".join(str(c) for c in command), flush=True)
    subprocess.run([str(c) for c in command], check=True, **kwargs)


def ensure_toolchain():
    """A venv of Debian's python3.11 with the pinned Nuitka; returns its python."""
    if not Path(BUILD_PYTHON).exists():
        sys.exit("build.py: %s is missing (Debian package python3.11); "
                 "scripts/install-deps installs it" % BUILD_PYTHON)
    if not shutil.which("patchelf"):
        sys.exit("build.py: patchelf is missing (Nuitka standalone needs it); "
                 "scripts/install-deps installs it")
    python = VENV / "bin" / "python"
    if not python.exists():
        run(BUILD_PYTHON, "-m", "venv", VENV)
    installed = subprocess.run([python, "-m", "pip", "freeze"], check=True,
                               capture_output=True, text=True).stdout.lower().split()
    if not set(REQUIREMENTS) <= set(installed):
        run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *REQUIREMENTS)
    return python


def build(python, jobs):
    if DIST.exists():
        shutil.rmtree(DIST)
    # Full RELRO: the binary is installed setuid, so resolve every symbol at start
    # and make the GOT read-only (Nuitka passes LDFLAGS on to its linker).
    env = dict(os.environ, LDFLAGS=(os.environ.get("LDFLAGS", "") + " -Wl,-z,relro,-z,now").strip())
    run(python, "-m", "nuitka", *NUITKA_OPTIONS, "--jobs=%d" % jobs,
        "--output-dir=" + str(BUILD), ROOT / "fpqmail", cwd=ROOT, env=env)


def check_no_inspect():
    """fp-qmail's own modules must not import inspect: the binary's is reduced."""
    users = sorted(m.get("name") for m in ET.parse(REPORT).getroot().iter("module")
                   if m.get("name").startswith("fpqmail")
                   and any(u.get("name") == "inspect" for u in m.iter("module_usage")))
    if users:
        sys.exit("build.py: %s import inspect, but the binary carries a reduced inspect "
                 "(fpqmail/nuitka/*.yml): keep inspect off the per-message path"
                 % ", ".join(users))


def needed_libraries(path):
    out = subprocess.run(["readelf", "-d", path], check=True, capture_output=True,
                         text=True).stdout
    return [line.rsplit("[", 1)[1].rstrip("]") for line in out.splitlines()
            if "(NEEDED)" in line]


def check_hardening():
    dynamic = subprocess.run(["readelf", "-d", BINARY], check=True, capture_output=True,
                             text=True).stdout
    if "BIND_NOW" not in dynamic and "(NOW)" not in dynamic:
        sys.exit("build.py: the binary is not linked with -z now (it is installed setuid)")


def check_no_bundled_libraries():
    bundled = sorted(set(needed_libraries(BINARY)) & {p.name for p in DIST.iterdir()})
    if bundled:
        sys.exit("build.py: the binary links against %s from its own folder, which a setuid "
                 "run cannot load ($ORIGIN is ignored)" % ", ".join(bundled))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="C compiler jobs (default 2)")
    args = parser.parse_args()
    python = ensure_toolchain()
    build(python, args.jobs)
    check_no_inspect()
    check_no_bundled_libraries()
    check_hardening()
    print("build.py: built %s (%.1f MB folder)" % (
        BINARY.relative_to(ROOT),
        sum(p.stat().st_size for p in DIST.iterdir()) / 1e6))


if __name__ == "__main__":
    main()
