"""fpqmail-scand's command line. Runs in the foreground, as supervise, runit and
systemd expect; logs to syslog (facility mail) and stderr.

Exit codes: 0 stopped by SIGTERM/SIGINT (or --check passed), 1 cannot listen,
2 bad command line or configuration, 3 (--check) an engine does not answer.
"""

import argparse
import sys

from . import log, memory, settings
from .engines import EngineError
from .log import logger
from fpqmail.values import printable

EXIT_LISTEN = 1
EXIT_CONFIG = 2
EXIT_ENGINE = 3  # --check only: a daemon starts anyway, and its requests fail meanwhile


def parser():
    p = argparse.ArgumentParser(
        prog="fpqmail-scand",
        description="The Mail Scanner daemon fp-qmail talks to (docs/scand.md). Every option "
                    "overrides the FP_SCAND_* setting named in brackets from the config file.")
    p.add_argument("--config", metavar="FILE",
                   help=f"sh-syntax settings file (default {settings.DEFAULT_CONFIG}, optional; "
                        "given here, it must exist)")
    p.add_argument("--listen", metavar="ADDR", help="host:port, [ipv6]:port or /unix/socket (FP_SCAND_LISTEN)")
    p.add_argument("--engine", metavar="SPEC", action="append",
                   help="builtin, clamd:ENDPOINT[,ENDPOINT...] or fpscand:HOST:PORT; repeat to "
                        "chain engines; one spam engine rspamd:ENDPOINT[,...] or spamd:ENDPOINT[,...] "
                        "(FP_SCAND_ENGINES)")
    p.add_argument("--policy", metavar="FILE", help="the policy file, fpqmail-policy(5) (FP_SCAND_POLICY)")
    p.add_argument("--quarantine", metavar="DIR", help="keep infected originals here (FP_SCAND_QUARANTINE)")
    p.add_argument("--backup", metavar="DIR", help="keep every original here (FP_SCAND_BACKUP)")
    p.add_argument("--tmpdir", metavar="DIR", help="fp-qmail's temp directory (FP_SCAND_TMPDIR)")
    p.add_argument("--workers", metavar="N", help="concurrent scans (FP_SCAND_WORKERS)")
    p.add_argument("--queue", metavar="N", help="requests waiting for a worker (FP_SCAND_QUEUE)")
    p.add_argument("--timeout", metavar="SECONDS", help="per-request time limit (FP_SCAND_TIMEOUT)")
    p.add_argument("--loglevel", metavar="0-7", help="syslog priority to log up to (FP_SCAND_LOGLEVEL)")
    p.add_argument("--check", action="store_true",
                   help="check the configuration and the engines, print the settings, exit")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.config == "":
        p.error("--config: an empty file name")
    overrides = {
        "FP_SCAND_LISTEN": args.listen,
        "FP_SCAND_ENGINES": " ".join(args.engine) if args.engine else None,
        "FP_SCAND_POLICY": args.policy,
        "FP_SCAND_QUARANTINE": args.quarantine,
        "FP_SCAND_BACKUP": args.backup,
        "FP_SCAND_TMPDIR": args.tmpdir,
        "FP_SCAND_WORKERS": args.workers,
        "FP_SCAND_QUEUE": args.queue,
        "FP_SCAND_TIMEOUT": args.timeout,
        "FP_SCAND_LOGLEVEL": args.loglevel,
    }
    config = args.config or settings.DEFAULT_CONFIG

    def load():
        loaded = settings.load(config, overrides, required=args.config is not None)
        for line, problem in loaded.problems:
            logger.warning("%s line %d skipped: %s", printable(config), line, printable(problem))
        return loaded

    log.setup("fpqmail-scand", int(settings.DEFAULTS["FP_SCAND_LOGLEVEL"]))
    try:
        current = load()
        log.set_level(current.loglevel)
        from .server import Server, build_runtime
        runtime = build_runtime(current, ping=not args.check)
    except settings.SettingsError as e:
        logger.error("configuration: %s", printable(e))  # it may quote the command line
        return EXIT_CONFIG
    if args.check:
        print("".join(f"{s.key}={current.raw[s.key]}\n" for s in settings.TABLE), end="", flush=True)
        return check_engines(runtime.engines + ([runtime.spam] if runtime.spam else []))
    memory.give_back_big_blocks()
    try:
        server = Server(current, runtime, load)
    except OSError as e:
        logger.error("%s", e.strerror or e)
        return EXIT_LISTEN
    return server.serve()


def check_engines(engines) -> int:
    """--check: every engine's own health check (the spam engine's too); each that does
    not answer is named. engines: [(spec, engine)]."""
    silent = 0
    for spec, engine in engines:
        try:
            engine.ping()
        except EngineError as e:
            logger.error("--check: engine %s does not answer: %s", printable(spec), e)
            silent += 1
    return EXIT_ENGINE if silent else 0


if __name__ == "__main__":
    sys.exit(main())
