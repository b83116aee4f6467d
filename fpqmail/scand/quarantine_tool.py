"""fpqmail-quarantine: look at, take out, release or delete what fpqmail-scand kept.

    fpqmail-quarantine [--dir DIR] [--config FILE] list
    fpqmail-quarantine [--dir DIR] show ID
    fpqmail-quarantine [--dir DIR] export ID [-o FILE]
    fpqmail-quarantine [--dir DIR] release ID [--again]
    fpqmail-quarantine [--dir DIR] delete ID

DIR defaults to FP_SCAND_QUARANTINE from the config file. `release` hands the original,
byte for byte, with its original envelope to qmail-queue.orig, named by FP_QMAIL_QUEUE
as fp-qmail finds it: the environment, else the config file, else the default.

Exit codes: 0 done, 1 the action failed (no such entry, a damaged entry, `list`
skipped one, qmail-queue.orig refused...), 2 bad command line or configuration, or a
store that cannot be used (absent, a symlink, writable by others, not readable).
Every failure is one line on stderr, never a traceback.
"""

import argparse
import os
import subprocess
import sys
import tempfile

from . import log, settings
from .log import logger
from .quarantine import Store, StoreError, envelope_of
from fpqmail.queue import DEFAULTS as CLIENT_DEFAULTS
from fpqmail.values import printable

EXIT_FAILED = 1
EXIT_USAGE = 2
HEADERS_SHOWN = 64 * 1024  # show prints at most this much of the original's header


class Failed(Exception):
    pass


def parser():
    p = argparse.ArgumentParser(prog="fpqmail-quarantine",
                                description="Manage the messages fpqmail-scand kept (docs/quarantine.md).")
    p.add_argument("--dir", metavar="DIR", help="the store (default: FP_SCAND_QUARANTINE from the config file)")
    p.add_argument("--config", metavar="FILE", help=f"settings file (default {settings.DEFAULT_CONFIG})")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("list", help="one line per stored message: ID, time, status, sender, recipients, threats")
    for name, text in (("show", "the metadata and the header of the original"),
                       ("export", "write the original message (.eml)"),
                       ("release", "re-inject the original with its envelope through qmail-queue.orig"),
                       ("delete", "remove the entry")):
        action = sub.add_parser(name, help=text)
        action.add_argument("id", metavar="ID")
        if name == "export":
            action.add_argument("-o", "--output", metavar="FILE",
                                help="a new file to write (default: standard output)")
        if name == "release":
            action.add_argument("--again", action="store_true", help="release an entry released before")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    for option, value in (("--dir", args.dir), ("--config", args.config)):
        if value == "":  # an unset shell variable: never the configured store instead
            p.error(f"{option}: an empty name")
    log.setup("fpqmail-quarantine", 6, stderr=False)
    try:
        config, _ = settings.read_config(args.config or settings.DEFAULT_CONFIG, args.config is not None)
        directory = args.dir or config.get("FP_SCAND_QUARANTINE", "")
        if not directory:
            raise settings.SettingsError("no store: give --dir DIR or set FP_SCAND_QUARANTINE")
        # Root looks after the daemon's store, so any owner; never a symlink or a
        # directory others may write in (they could forge entries to release).
        store = Store(directory, any_owner=True).check()
    except (settings.SettingsError, StoreError) as e:
        _complain(e)
        return EXIT_USAGE
    if sys.stdout is None and (args.action in ("list", "show") or args.action == "export" and not args.output):
        _complain("cannot write: standard output is closed")
        return EXIT_FAILED
    try:
        if args.action == "list":
            return EXIT_FAILED if list_entries(store) else 0
        if args.action == "show":
            show(store, args.id)
        elif args.action == "export":
            export(store, args.id, args.output)
        elif args.action == "release":
            release(store, args.id, queue_program(config), args.again)
        elif args.action == "delete":
            store.delete(args.id)
            logger.info("deleted %s from %s", args.id, directory)
    except (StoreError, Failed) as e:
        _complain(e)
        return EXIT_FAILED
    except BrokenPipeError:  # `list | head`
        sys.stderr.close()
    except OSError as e:  # standard output closed or full
        _complain(f"cannot write: {e.strerror}")
        return EXIT_FAILED
    return 0


def list_entries(store) -> int:
    """Print one line per entry; return how many could not be listed (each named)."""
    skipped = 0

    def skip(error):
        nonlocal skipped
        skipped += 1
        _complain(error)

    out = sys.stdout
    for entry_id in store.ids(skipped=skip):
        try:
            m = store.meta(entry_id)
        except StoreError as e:
            skip(e)
            continue
        out.write("\t".join([entry_id, printable(m["time"]), printable(m["status"]), printable(m["fate"]),
                             printable(m["sender"]) or "<>",
                             ",".join(printable(r) for r in m["recipients"]),
                             printable("; ".join(m["threats"]))]) + "\n")
    out.flush()
    return skipped


def show(store, entry_id):
    m = store.meta(entry_id)
    message = store.original(entry_id)
    lines = [f"ID: {entry_id}", f"Kind: {m['kind']}", f"Time: {m['time']}", f"Status: {m['status']}",
             f"Fate: {m['fate']}", f"Threats: {'; '.join(m['threats'])}",
             f"Engines: {', '.join(m['engines'])}", f"Sender: <{m['sender']}>"]
    lines += [f"Recipient: <{r}>" for r in m["recipients"]]
    lines += [f"Size: {m['size']}", f"SHA-256: {m['sha256']}", f"Scan: {m['scan_id']}",
              f"Released: {', '.join(m['released']) or 'never'}", f"File: {store.message_path(entry_id)}"]
    end = _header_end(message)
    sys.stdout.write("".join(printable(line) + "\n" for line in lines) + "\n")
    sys.stdout.flush()
    sys.stdout.buffer.write(message[:min(end, HEADERS_SHOWN)])
    sys.stdout.buffer.flush()


def export(store, entry_id, output):
    message = store.original(entry_id)
    if output is None:
        sys.stdout.buffer.write(message)
        sys.stdout.buffer.flush()
        return
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise Failed(f"{output}: cannot create: {e.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(message)


def release(store, entry_id, program, again):
    m = store.meta(entry_id)
    if m["released"] and not again:
        raise Failed(f"{entry_id} was released on {', '.join(m['released'])}; --again to release it once more")
    message = store.original(entry_id)
    envelope = envelope_of(m).raw()
    # qmail-queue reads the message on fd 0 and the envelope on fd 1; both go in
    # unnamed temp files (O_TMPFILE), so nothing is left behind and neither can block.
    with tempfile.TemporaryFile() as msg_file, tempfile.TemporaryFile() as env_file:
        msg_file.write(message)
        env_file.write(envelope)
        msg_file.seek(0)
        env_file.seek(0)
        try:
            code = subprocess.call([program], stdin=msg_file, stdout=env_file, close_fds=True)
        except OSError as e:
            raise Failed(f"cannot run {program}: {e.strerror}") from None
    if code != 0:
        what = f"killed by signal {-code}" if code < 0 else f"exit {code}"
        raise Failed(f"{program} did not accept {entry_id} ({what}); it stays in the store")
    logger.info("released %s to %d recipient(s) through %s", entry_id, len(m["recipients"]), program)
    try:
        store.mark_released(entry_id)
    except StoreError as e:
        raise Failed(f"{program} accepted {entry_id}, but the release is not recorded: {e}") from None
    if sys.stdout is not None:  # done: a closed standard output is no failure now
        print(f"released {entry_id} to {len(m['recipients'])} recipient(s)")


def queue_program(config):
    """FP_QMAIL_QUEUE as fp-qmail finds it: environment, config file, default."""
    return os.environ.get("FP_QMAIL_QUEUE") or config.get("FP_QMAIL_QUEUE") or CLIENT_DEFAULTS["FP_QMAIL_QUEUE"]


def _complain(problem):
    print(f"fpqmail-quarantine: {problem}", file=sys.stderr, flush=True)


def _header_end(message):
    ends = [pos + len(blank) for blank in (b"\r\n\r\n", b"\n\n") if (pos := message.find(blank)) >= 0]
    return min(ends, default=len(message))


if __name__ == "__main__":
    sys.exit(main())
