#!/usr/bin/env python3
"""Build fp-qmail (the per-message program, fpqmail/queue.py) as one binary:
build/fp-qmail.dist/fp-qmail. `make build` runs this.

qmail execs fp-qmail once per message, so its start-up is its cost per message.
docs/performance.md has the measurements behind each choice made here.

How:
1. Nuitka (4.3.3, pinned below) compiles the fpqmail package with fpqmail.queue and
   the modules of fpqmail it imports, in module mode: the C objects of an extension
   module. The daemon (fpqmail.scand) is not in it: the per-message program must not
   depend on it.
2. This writes the binary's tables of built-in and of frozen modules: only what
   CPython's core and fpqmail.queue use (write_module_tables says what, and why).
3. It links them with fpqmail/nuitka/launcher.c, whose main() starts CPython, against
   Debian's static libpython3.11: a stripped PIE with full RELRO that needs only the
   system's libc and libm.

Why: Nuitka's standalone mode runs CPython's full initialisation and imports os,
types, importlib and inspect on every start (no option, plugin or package
configuration turns that off), and reads the caller's PYTHON* variables (some crash
it). The launcher starts CPython core-only from an isolated configuration, and there
is no module to import but those of the tables: less than half the CPU of
`python3.11 -S -s -m fpqmail` per message. Nuitka's module init also patches the
inspect and types modules for compiled generators; the binary has neither, so the
link puts a no-op in place of that patch (ld --wrap), which saves 3M instructions.
Not static (it would save ~10% more): Nuitka's module runtime calls dladdr(), which
glibc answers only in a dynamically linked program, host names would be looked up by
NSS modules of whichever glibc is installed, and lintian rejects the package.

After the build it checks its own promises and fails if one does not hold: every
module fpqmail imports is compiled in or built in; the binary is a PIE, linked with
-z now and a RELRO segment, and needs no shared library but the system's libc and
libm, with no RPATH (so nothing can come from its own folder).

Usage: build.py [--jobs N]
"""
import argparse
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent
BUILD = ROOT / "build"
VENV = BUILD / "venv"
NUITKA_OUTPUT = BUILD / "nuitka"
OBJECTS = NUITKA_OUTPUT / "fpqmail.build"
MODULE_TABLES = BUILD / "fp-qmail-modules.c"
DIST = BUILD / "fp-qmail.dist"
BINARY = DIST / "fp-qmail"
REPORT = BUILD / "fp-qmail.report.xml"
LAUNCHER = ROOT / "fpqmail" / "nuitka" / "launcher.c"

BUILD_PYTHON = "/usr/bin/python3.11"
# Versions this build was made and measured with. zstandard: Nuitka's compression of
# its caches (not needed at run time).
REQUIREMENTS = ("nuitka==4.3.3", "zstandard==0.25.0")

NUITKA_OPTIONS = (
    "--mode=module",
    "--include-module=fpqmail.queue",
    # With the modules of fpqmail it imports (the config parser lazily: name it so that
    # it is surely in), but never the daemon, which the per-message program must not need.
    "--follow-import-to=fpqmail",
    "--include-module=fpqmail.shconf",
    "--nofollow-import-to=fpqmail.scand",
    # Module mode would compute a package's __path__ with os.path (importing os and
    # five more modules at every start); nothing in the binary reads __path__ or __file__.
    "--file-reference-choice=frozen",
    # Python's -I: Nuitka's loader then spares importing os.path for a sys.path_hooks
    # entry the binary never uses.
    "--python-flag=isolated",
    # This links the objects itself, so they must be plain ones (not for link-time
    # optimisation, which would also inline the patch the link replaces).
    "--lto=no",
    "--report=" + str(REPORT),
)

# The built-in modules CPython's core needs, with their init functions: the import
# system's own (_imp), those its frozen bootstrap loads (_thread, _warnings, _weakref),
# and the codec registry's encodings (launcher.c's, empty). builtins and sys are made by
# the core itself; they are listed (without init function) so that
# sys.builtin_module_names names them, as the bootstrap expects.
CORE_MODULES = {"builtins": None, "sys": None, "_imp": "PyInit__imp", "_thread": "PyInit__thread",
                "_warnings": "_PyWarnings_Init", "_weakref": "PyInit__weakref",
                "encodings": "PyInit_encodings"}

# Prints importlib/_bootstrap.py compiled and marshalled, as CPython freezes it.
BOOTSTRAP = """import marshal, sys, sysconfig
path = sysconfig.get_path("stdlib") + "/importlib/_bootstrap.py"
code = compile(open(path, "rb").read(), "<frozen importlib._bootstrap>", "exec")
sys.stdout.buffer.write(marshal.dumps(code))"""
# CPython's frozen-module tables (its Python/frozen.c) with the bootstrap only, and the
# deep-freeze hooks (its deepfreeze.c) with nothing to do.
FROZEN_TABLES = """
static const struct _frozen bootstrap_modules[] = {
    {"_frozen_importlib", bootstrap, (int)sizeof bootstrap, 0, NULL},
    {NULL, NULL, 0, 0, NULL},
};
static const struct _frozen no_modules[] = {{NULL, NULL, 0, 0, NULL}};
const struct _frozen *_PyImport_FrozenBootstrap = bootstrap_modules;
const struct _frozen *_PyImport_FrozenStdlib = no_modules;
const struct _frozen *_PyImport_FrozenTest = no_modules;
const struct _frozen *PyImport_FrozenModules = NULL;

struct _module_alias {
    const char *name;
    const char *orig;
};
static const struct _module_alias aliases[] = {
    {"_frozen_importlib", "importlib._bootstrap"},
    {NULL, NULL},
};
const struct _module_alias *_PyImport_FrozenAliases = aliases;

int _Py_Deepfreeze_Init(void) {
    return 0;
}

void _Py_Deepfreeze_Fini(void) {
}
"""

# The launcher is linked with these; each check after the build says why.
# pack-relative-relocs: libpython's ~35 000 relocations in 18 kB instead of 850 kB.
# -s: stripped, as Debian installs binaries (lintian fails the package otherwise).
CFLAGS = ("-O2", "-Wall", "-Werror", "-fstack-protector-strong", "-D_FORTIFY_SOURCE=2")
LDFLAGS = ("-pie", "-Wl,-z,relro,-z,now", "-Wl,-z,pack-relative-relocs",
           "-Wl,--wrap=patchInspectModule", "-s")
SYSTEM_LIBRARIES = {"libc.so.6", "libm.so.6"}


def run(*command, **kwargs):
    print("+", " ".join(str(c) for c in command), flush=True)
    subprocess.run([str(c) for c in command], check=True, **kwargs)


def build_python(expression):
    return subprocess.run([BUILD_PYTHON, "-c", "import sys, sysconfig; print(%s)" % expression],
                          check=True, capture_output=True, text=True).stdout.strip()


def ensure_toolchain():
    """A venv of Debian's python3.11 with the pinned Nuitka; returns its python."""
    if not Path(BUILD_PYTHON).exists():
        sys.exit("build.py: %s is missing (Debian package python3.11); "
                 "scripts/install-deps installs it" % BUILD_PYTHON)
    python = VENV / "bin" / "python"
    if not python.exists():
        run(BUILD_PYTHON, "-m", "venv", VENV)
    installed = subprocess.run([python, "-m", "pip", "freeze"], check=True,
                               capture_output=True, text=True).stdout.lower().split()
    if not set(REQUIREMENTS) <= set(installed):
        run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *REQUIREMENTS)
    return python


def compile_package(python, jobs):
    if NUITKA_OUTPUT.exists():
        shutil.rmtree(NUITKA_OUTPUT)
    run(python, "-m", "nuitka", *NUITKA_OPTIONS, "--jobs=%d" % jobs,
        "--output-dir=" + str(NUITKA_OUTPUT), ROOT / "fpqmail", cwd=ROOT)


def builtin_modules_used():
    """The modules fpqmail's compiled modules import that are not compiled in: each
    must be built into libpython, or the binary could not import it."""
    modules = ET.parse(REPORT).getroot().findall("module")
    compiled = {m.get("name") for m in modules}
    used = {u.get("name") for m in modules for u in m.iter("module_usage")} - compiled
    builtin = set(build_python("' '.join(sys.builtin_module_names)").split())
    missing = sorted(used - builtin)
    if missing:
        sys.exit("build.py: fpqmail imports %s: neither compiled into the binary nor built "
                 "into libpython, so the binary could not import it" % ", ".join(missing))
    return sorted(used)


def write_module_tables(used):
    """The binary's tables of modules, which replace libpython's (config.o, frozen.o):
    - built-in: the core's, fpqmail's imports, and fpqmail itself;
    - frozen: the import bootstrap only, as code marshalled here. libpython's table
      also names some twenty standard-library modules (os, codecs, io, site...) as
      deep-frozen objects: 880 kB of data that the dynamic loader relocates on every
      start (~200 page faults) and whose strings the core interns (1.3M instructions).
      With this table the link leaves them out (deepfreeze.o), and the core's hook that
      interns them has nothing to do. The build python compiles the bootstrap: it must
      be libpython's own release."""
    release = build_python("sys.version.split()[0]")
    header = Path(build_python("sysconfig.get_config_var('INCLUDEPY')")) / "patchlevel.h"
    if not re.search(r'#define PY_VERSION\s+"%s"' % re.escape(release), header.read_text()):
        sys.exit("build.py: %s is Python %s, libpython (%s) another release: its frozen "
                 "bootstrap would not match" % (BUILD_PYTHON, release, header))
    bootstrap = subprocess.run([BUILD_PYTHON, "-c", BOOTSTRAP], check=True,
                               capture_output=True).stdout
    table = dict(CORE_MODULES)
    table.update((name, "PyInit_" + name) for name in used if name not in table)
    table["fpqmail"] = "PyInit_fpqmail"
    functions = sorted(f for f in table.values() if f)
    MODULE_TABLES.write_text(
        "/* Written by build.py: the built-in and frozen modules of the fp-qmail binary. */\n"
        "#include <Python.h>\n\n"
        + "".join("extern PyObject *%s(void);\n" % f for f in functions)
        + "\nstruct _inittab _PyImport_Inittab[] = {\n"
        + "".join('    {"%s", %s},\n' % (name, f or "NULL") for name, f in table.items())
        + "    {NULL, NULL},\n};\n\n"
        "/* importlib/_bootstrap.py of Python %s, marshalled. */\n" % release
        + "static const unsigned char bootstrap[] = {\n"
        + "".join("    %s\n" % "".join("%d," % b for b in bootstrap[i:i + 20])
                  for i in range(0, len(bootstrap), 20))
        + "};\n" + FROZEN_TABLES)


def link():
    library_dir = Path(build_python("sysconfig.get_config_var('LIBPL')"))
    # Debian's libpython3.11.a is not position independent; this one is.
    libpython = library_dir / "libpython3.11-pic.a"
    if not libpython.exists():
        sys.exit("build.py: %s is missing (Debian package libpython3.11-dev)" % libpython)
    objects = [OBJECTS / name.strip('"')
               for name in (OBJECTS / "@link_input.txt").read_text().split()]
    if DIST.exists():
        shutil.rmtree(DIST)
    DIST.mkdir()
    # The tables come before libpython, so that the link takes them, not its own.
    command = ["gcc", *CFLAGS, "-I" + build_python("sysconfig.get_config_var('INCLUDEPY')"),
               "-o", str(BINARY), str(LAUNCHER), str(MODULE_TABLES), *map(str, objects),
               str(libpython), "-lm", *LDFLAGS]
    run(*command)


def check_binary():
    header = subprocess.run(["readelf", "-hld", BINARY], check=True, capture_output=True,
                            text=True).stdout
    if "DYN (Position-Independent Executable file)" not in header:
        sys.exit("build.py: the binary is not a PIE (it is installed setuid: its addresses "
                 "must be random)")
    if "GNU_RELRO" not in header or "BIND_NOW" not in header and "(NOW)" not in header:
        sys.exit("build.py: the binary has no full RELRO (-z relro -z now; it is installed setuid)")
    needed = {line.rsplit("[", 1)[1].rstrip("]") for line in header.splitlines()
              if "(NEEDED)" in line}
    if needed - SYSTEM_LIBRARIES or "(RPATH)" in header or "(RUNPATH)" in header:
        sys.exit("build.py: the binary needs %s (RPATH/RUNPATH: %s): it may need only the "
                 "system's %s, found where a setuid program looks" % (
                     ", ".join(sorted(needed)), "PATH)" in header, ", ".join(sorted(SYSTEM_LIBRARIES))))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="C compiler jobs (default 2)")
    args = parser.parse_args()
    python = ensure_toolchain()
    compile_package(python, args.jobs)
    write_module_tables(builtin_modules_used())
    link()
    check_binary()
    print("build.py: built %s (%.1f MB)" % (BINARY.relative_to(ROOT), BINARY.stat().st_size / 1e6))


if __name__ == "__main__":
    main()
