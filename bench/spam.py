#!/usr/bin/env python3
"""Per-message cost of spam scoring (issue 12), side by side: the fp-qmail binary and
fpqmail-scand on its unix socket with the builtin engine alone (the virus-only path),
with rspamd beside it, and with spamd beside it.

The three daemons and the two engines (private instances, as tests/spam_fixtures.py
starts them: no network checks) run at once; every round sends one fresh ordinary
message with full headers through each path, in an order rotated every round, so the
drift of this shared machine spreads over all three. Printed: the median and 90th
percentile of fp-qmail's wall time (what qmail-smtpd waits for), the median of
fp-qmail's CPU, and each engine's own CPU per message.

    make build && python3 bench/spam.py [--rounds 100] [--size 4096]
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
import runner  # noqa: E402
from spam_fixtures import HAM, Rspamd, Spamd, _own  # noqa: E402

BINARY = REPO / "build" / "fp-qmail.dist" / "fp-qmail"
ENVELOPE = b"Falice@example.org\0Tbob@example.net\0\0"
PATHS = ("builtin", "builtin + rspamd", "builtin + spamd")


def message(serial, size):
    """HAM with a unique Message-ID and enough ordinary lines to make size bytes."""
    text = HAM.replace(b"4242@mx.example.org", b"%d.%d@mx.example.org" % (os.getpid(), serial))
    line = b"line %06d of an ordinary letter about lunch, the weather and the garden.\r\n"
    n = 0
    while len(text) < size:
        text += line % (serial * 1000 + n)
        n += 1
    return text


def group_cpu(pgid):
    """CPU seconds (user + system) of the live processes of a process group."""
    ticks = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the name: state ppid pgrp ...
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def start_daemon(work, name, engines):
    sock = work / f"{name}.sock"
    config = work / "empty.conf"
    config.touch()
    argv = [sys.executable, "-m", "fpqmail.scand", "--config", str(config), "--listen", str(sock),
            "--tmpdir", str(work / "spool"), "--loglevel", "4"]
    for spec in engines:
        argv += ["--engine", spec]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=dict(os.environ, PYTHONPATH=str(REPO)))
    deadline = time.monotonic() + 30
    while not sock.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"fpqmail-scand ({name}) did not start")
        time.sleep(0.05)
    return process, str(sock)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    if not BINARY.exists():
        sys.exit(f"bench/spam.py: {BINARY} is missing: run make build")
    work = Path(tempfile.mkdtemp(prefix="fpq-bench-spam-"))
    os.chmod(work, 0o711)  # the engines' children run as their own users
    engines, daemons = {}, []
    try:
        (work / "spool").mkdir()
        for kind in ("rspamd", "spamd"):
            directory = work / kind
            directory.mkdir(mode=0o755)
            if kind == "rspamd":
                (work / "hs").mkdir()
                _own(work / "hs", "_rspamd")
                engines[kind] = Rspamd(str(directory), str(work / "hs")).launch()
            else:
                engines[kind] = Spamd(str(directory)).launch()
        for engine in engines.values():
            engine.ready()
        helpers = work / "measure"
        subprocess.run(["cc", "-O2", "-o", str(helpers), str(REPO / "bench" / "measure.c")], check=True)
        standin = work / "queue_standin"
        subprocess.run(["cc", "-O2", "-o", str(standin), str(REPO / "bench" / "queue_standin.c")], check=True)
        addresses = {}
        for name, specs in (("builtin", ["builtin"]), ("builtin + rspamd", ["builtin", engines["rspamd"].unix_spec]),
                            ("builtin + spamd", ["builtin", engines["spamd"].unix_spec])):
            process, addresses[name] = start_daemon(work, name.replace(" + ", "-"), specs)
            daemons.append(process)
        env = {"FP_QMAIL_TMPDIR": str(work / "spool"), "FP_QMAIL_QUEUE": str(standin), "FP_QMAIL_LOGLEVEL": "4"}
        for name in PATHS:  # one message each first: every path warm, every engine answering
            runner.run_program(str(helpers), [str(BINARY)], dict(env, FP_QMAIL_SCANNER=addresses[name]),
                               message(0, args.size), ENVELOPE)
        samples = {name: [] for name in PATHS}
        engine_cpu = {kind: 0.0 for kind in engines}
        for round_no in range(1, args.rounds + 1):
            shift = round_no % len(PATHS)
            for name in PATHS[shift:] + PATHS[:shift]:
                kind = name.rpartition(" ")[2] if "+" in name else None
                before = group_cpu(engines[kind].process.pid) if kind else 0.0
                samples[name].append(runner.run_program(
                    str(helpers), [str(BINARY)], dict(env, FP_QMAIL_SCANNER=addresses[name]),
                    message(round_no, args.size), ENVELOPE))
                if kind:
                    engine_cpu[kind] += group_cpu(engines[kind].process.pid) - before
        print(f"{args.rounds} messages of {len(message(1, args.size))} bytes per path, through {BINARY.name}")
        base = statistics.median(s.seconds for s in samples["builtin"])
        print(f"{'path':<20} {'median ms':>10} {'p90 ms':>8} {'x virus-only':>13} {'fp-qmail cpu ms':>16} "
              f"{'engine cpu ms':>14}")
        for name in PATHS:
            walls = sorted(s.seconds for s in samples[name])
            median = statistics.median(walls)
            kind = name.rpartition(" ")[2] if "+" in name else None
            print(f"{name:<20} {median * 1e3:>10.1f} {walls[int(len(walls) * 0.9)] * 1e3:>8.1f} "
                  f"{median / base:>13.2f} {statistics.median(s.cpu_seconds for s in samples[name]) * 1e3:>16.2f} "
                  f"{engine_cpu[kind] / args.rounds * 1e3 if kind else 0:>14.1f}")
        left = sorted(p.name for p in (work / "spool").iterdir())
        if left:
            sys.exit(f"bench/spam.py: files left behind in the spool: {left[:10]}")
    finally:
        for process in daemons:
            process.terminate()
            process.wait(20)
        for engine in engines.values():
            engine.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
