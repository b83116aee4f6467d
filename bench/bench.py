#!/usr/bin/env python3
"""Per-message cost of fp-qmail (issues 4 and 11): `make bench` runs this.

Variants, each fed unique messages the way qmail feeds its queue program:
  (a) the stand-in qmail-queue.orig alone (bench/queue_standin.c): the floor
  (b) bench/anchor.c: fp-qmail's work in C, the physical-limit anchor
  (c) /usr/bin/python3.11 -S -s -m fpqmail, the package found through PYTHONPATH
      (the interpreter the binary is built from, at its cheapest)
  (d) the console script `fp-qmail` that pip installed (site, editable install)
  (e) the binary build.py makes: build/fp-qmail.dist/fp-qmail
  (r) with --reference PATH: another build of the binary (say, main's), run wherever
      (e) is, to compare two builds side by side
  clamd: clamd's own INSTREAM of the same bytes (with the clamd scanner only)
against scanners: an instant-clean responder, fpqmail-scand + builtin engine,
fpqmail-scand + clamd. Variants run interleaved (A B C A B C ..., the order rotated
every round) so drift of this shared machine spreads over all of them.
Settings come from the environment (FP_QMAIL_LOGLEVEL set: the config file is not read).

Each run's wall time, CPU time, minor page faults and peak RSS are measured (CPU and
faults of the process and of the qmail-queue.orig it execs). --quick (the default) fits
in a few minutes and still gives every target's figure; --full runs every size,
concurrency, scanner and variant.
"""
import argparse
import concurrent.futures
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import report
import runner
import scanners

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
RESULTS = BENCH / "results"
BINARY = REPO / "build" / "fp-qmail.dist" / "fp-qmail"
INTERPRETER = "/usr/bin/python3.11"
CONSOLE_SCRIPT = Path(sys.executable).parent / "fp-qmail"
K, M = 1 << 10, 1 << 20

NAMES = {"a": "qmail-queue stand-in", "b": "C anchor", "c": "python3.11 -S -s -m",
         "d": "console script", "e": "fp-qmail binary", "r": "reference binary",
         "clamd": "clamd INSTREAM alone"}
ALL = ("a", "b", "c", "d", "e")

# (scanner, sizes, concurrencies, variants): what each mode measures.
QUICK = (
    ("responder", (1 * K, 4 * K, 64 * K, 1 * M, 10 * M), (1,), ALL),
    ("responder", (4 * K,), (8,), ALL),
    ("scand-builtin", (4 * K, 1 * M), (1,), ("a", "b", "c", "e")),
    ("scand-clamd", (4 * K, 1 * M), (1,), ("a", "b", "e", "clamd")),
)
SIZES = (1 * K, 4 * K, 64 * K, 1 * M, 10 * M)
FULL = (
    ("responder", SIZES, (1, 8), ALL),
    ("scand-builtin", SIZES, (1, 8), ALL),
    ("scand-clamd", SIZES, (1, 8), ALL + ("clamd",)),
)


def compile_helpers(directory):
    built = {}
    for name in ("queue_standin", "anchor", "measure"):
        built[name] = Path(directory) / name
        subprocess.run(["cc", "-O2", "-Wall", "-o", str(built[name]), str(BENCH / (name + ".c"))],
                       check=True)
    return built


def variant_commands(helpers, env, reference):
    """{variant: (argv, environment)}; only (c) finds the package through PYTHONPATH."""
    commands = {"a": [str(helpers["queue_standin"])], "b": [str(helpers["anchor"])],
                "e": [str(BINARY)]}
    if CONSOLE_SCRIPT.exists():
        commands["d"] = [str(CONSOLE_SCRIPT)]
    if reference:
        commands["r"] = [reference]
    commands = {v: (argv, env) for v, argv in commands.items()}
    commands["c"] = ([INTERPRETER, "-S", "-s", "-m", "fpqmail"], dict(env, PYTHONPATH=str(REPO)))
    return commands


def rounds_for(size, base):
    """Fewer rounds for the big messages: their time is in the copying, not the noise."""
    return base if size < M else max(5, base // 3)


def measure(scanner, clamd, sizes, concurrencies, variants, commands, launcher, messages, base_rounds):
    results = {}
    if "e" in variants:  # (r), if given, runs beside (e)
        variants = variants[:variants.index("e") + 1] + ("r",) + variants[variants.index("e") + 1:]
    variants = [v for v in variants if v in commands or v == "clamd"]
    for size in sizes:
        for concurrency in concurrencies:
            samples = {v: [] for v in variants}
            with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
                for round_no in range(rounds_for(size, base_rounds)):
                    shift = round_no % len(variants)
                    for variant in variants[shift:] + variants[:shift]:
                        batch = [messages.make(size) for _ in range(concurrency)]
                        if variant == "clamd":
                            job = lambda m: timed(scanners.clamd_instream, clamd.unix_socket, m)
                        else:
                            job = lambda m, v=variant: runner.run_program(launcher, *commands[v], m, runner.ENVELOPE)
                        samples[variant].extend(pool.map(job, batch))
            results[(scanner, size, concurrency)] = samples
            print("  %s %s x%d, median wall/cpu ms: %s" % (
                scanner, report.human_size(size), concurrency, "  ".join(
                    "(%s) %.2f/%s" % (v, 1e3 * statistics.median(s.seconds for s in samples[v]),
                                      "-" if v == "clamd" else "%.2f" % (
                                          1e3 * statistics.median(s.cpu_seconds for s in samples[v])))
                    for v in variants)), flush=True)
    return results


def timed(function, *args):
    start = time.perf_counter()
    function(*args)
    return runner.Sample(time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick",
                      help="a subset that gives every target's figure (default)")
    mode.add_argument("--full", action="store_const", dest="mode", const="full",
                      help="every size, concurrency, scanner and variant")
    parser.add_argument("--rounds", type=int, help="rounds per size (default 30 quick, 60 full)")
    parser.add_argument("--reference", metavar="PATH",
                        help="another build of the binary, measured beside (e) as (r)")
    args = parser.parse_args()
    mode = args.mode or "quick"
    plan = QUICK if mode == "quick" else FULL
    base_rounds = args.rounds or (30 if mode == "quick" else 60)
    if not BINARY.exists():
        sys.exit("bench.py: %s is missing: run make build" % BINARY)

    work = Path(tempfile.mkdtemp(prefix="fpq-bench-"))
    spool = work / "spool"
    spool.mkdir()
    try:
        helpers = compile_helpers(work)
        if not CONSOLE_SCRIPT.exists():
            print("note: no console script at %s (scripts/install-deps installs it): no (d)" % CONSOLE_SCRIPT)
        env = {"FP_QMAIL_TMPDIR": str(spool), "FP_QMAIL_QUEUE": str(helpers["queue_standin"]),
               "FP_QMAIL_LOGLEVEL": "4"}
        messages = runner.Messages()
        results = {}
        with scanners.running_clamd(work / "clamd") as clamd:
            starters = {"responder": lambda: scanners.responder(spool),
                        "scand-builtin": lambda: scanners.scand_builtin(spool),
                        "scand-clamd": lambda: scanners.scand_clamd(spool, clamd)}
            for scanner, sizes, concurrencies, variants in plan:
                with starters[scanner]() as address:
                    commands = variant_commands(helpers, dict(env, FP_QMAIL_SCANNER=address),
                                                args.reference)
                    results.update(measure(scanner, clamd, sizes, concurrencies, variants, commands,
                                           str(helpers["measure"]), messages, base_rounds))
                left = sorted(p.name for p in spool.iterdir())
                if left:
                    sys.exit("bench.py: files left behind in the spool: %s" % left[:10])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = report.summarise(results)
    print()
    report.print_table(rows, NAMES)
    report.print_targets(report.targets(rows))
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    csv_path = RESULTS / ("bench-%s-%s.csv" % (mode, stamp))
    report.write_csv(rows, csv_path)
    print("\nCSV: %s" % csv_path.relative_to(REPO))
    png_path = csv_path.with_suffix(".png")
    if report.write_chart(rows, NAMES, png_path):
        print("chart: %s" % png_path.relative_to(REPO))
    else:
        print("chart: none (pip install '.[plot]' for matplotlib)")


if __name__ == "__main__":
    os.chdir("/")
    main()
