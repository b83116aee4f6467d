"""The daemon's settings: every one of them, its default and its meaning, in one table.

A setting comes from (later wins) this table, the config file (sh syntax, FP_SCAND_*
keys, default /etc/f-prot.conf, read with fpqmail.shconf) and the command line.
docs/scand.md shows the same table to administrators; keep the two in step.
The engines read their own FP_SCAND_* keys (docs/scand-settings.md) from the same file.
"""

import re
from dataclasses import dataclass

from fpqmail import shconf, values
from fpqmail.queue import DEFAULTS as CLIENT_DEFAULTS

DEFAULT_CONFIG = "/etc/f-prot.conf"


@dataclass(frozen=True)
class Setting:
    key: str
    default: str
    help: str


TABLE = (
    Setting("FP_SCAND_LISTEN", "/run/fpqmail-scand/scand.sock",
            "where to listen, one or more of: an absolute unix socket path (descriptors, "
            "peers checked), host:port or [ipv6]:port (file names), separated by spaces"),
    Setting("FP_SCAND_CLIENTS", "root qmailq",
            "users (names or uids) whose processes may ask for scans on a unix socket; "
            "the daemon's own user always may; anyone may PING"),
    Setting("FP_SCAND_ENGINES", "builtin",
            "engines, separated by spaces; a message is clean only if every virus engine "
            "says so; at most one spam engine (rspamd:..., spamd:...) scores it"),
    Setting("FP_SCAND_POLICY", "",
            "the policy file (fpqmail-policy(5)), read at start and on SIGHUP; empty: none, "
            "the defaults for every recipient"),
    Setting("FP_SCAND_TMPDIR", "",
            "the only directory whose fi/fo files are served and cleaned; "
            "empty: FP_QMAIL_TMPDIR from the same file, else /tmp"),
    Setting("FP_SCAND_WORKERS", "8", "requests scanned at the same time"),
    Setting("FP_SCAND_QUEUE", "100",
            "complete requests that wait for a worker; past that the newest request of the "
            "caller with the most waiting is answered ERROR busy"),
    Setting("FP_SCAND_CONNECTIONS", "512",
            "connections whose request is still being read (or answered) at once; past "
            "that the oldest of them is closed"),
    Setting("FP_SCAND_PEER_CONNECTIONS", "64",
            "the same for one peer (a uid on a unix socket, an address on TCP)"),
    Setting("FP_SCAND_REQUEST_MEMORY", "128",
            "MiB of request heads and envelopes buffered at once over all connections; "
            "past that a request is answered ERROR busy"),
    Setting("FP_SCAND_TIMEOUT", "90",
            "seconds a request may take from accept to reply (then ERROR); keep it "
            "below fp-qmail's FP_QMAIL_TIMEOUT so that fp-qmail hears why"),
    Setting("FP_SCAND_QUARANTINE", "", "directory for infected originals; empty: none kept"),
    Setting("FP_SCAND_QUARANTINE_SPAM", "no",
            "yes: the quarantine also keeps the originals of messages refused as spam"),
    Setting("FP_SCAND_BACKUP", "", "directory for a copy of every message; empty: none kept"),
    Setting("FP_SCAND_JANITOR_INTERVAL", "60", "seconds between two sweeps for stale temp files"),
    Setting("FP_SCAND_STALE_AGE", "600",
            "seconds after its last change that an fi/fo file counts as left behind; "
            "must exceed FP_SCAND_TIMEOUT and FP_QMAIL_TIMEOUT"),
    Setting("FP_SCAND_SOCKET_MODE", "0666",
            "permissions of the unix socket (fp-qmail runs as qmailq and must connect)"),
    Setting("FP_SCAND_LOGLEVEL", "6", "syslog priorities 0 (emerg) .. 7 (debug) to log; 6 logs every message"),
    # What one message may cost (docs/scand-settings.md); past a limit: REFUSED.
    Setting("FP_SCAND_MAX_SIZE", "52428800", "bytes of the largest message scanned; a larger one is refused"),
    Setting("FP_SCAND_MAX_PARTS", "1000", "MIME parts of one message, nested messages' included"),
    Setting("FP_SCAND_MAX_DEPTH", "50", "MIME containers nested inside each other"),
    Setting("FP_SCAND_MAX_HEADER_SIZE", "1048576", "bytes of one header (the message's or a part's)"),
    Setting("FP_SCAND_MAX_HEADER_LINES", "10000", "lines of one header field"),
    Setting("FP_SCAND_MAX_EXPANSION", "4",
            "bytes decoded and sent to the engines for one message, in times its size"),
)
DEFAULTS = {s.key: s.default for s in TABLE}
# Settings a running daemon cannot change on SIGHUP: they shape its sockets and threads.
RESTART_ONLY = ("FP_SCAND_LISTEN", "FP_SCAND_WORKERS", "FP_SCAND_SOCKET_MODE")


class SettingsError(ValueError):
    """A configuration mistake; the message names the file or key and what is wrong."""


@dataclass(frozen=True)
class Settings:
    listen: tuple[str, ...]
    clients: tuple[str, ...]
    engines: tuple[str, ...]
    policy: str        # the policy file, or ""
    tmpdir: str
    workers: int
    queue: int
    connections: int
    peer_connections: int
    request_memory: int  # bytes
    timeout: float
    quarantine: str
    quarantine_spam: bool
    backup: str
    janitor_interval: float
    stale_age: float
    socket_mode: int
    loglevel: int
    raw: dict          # every key of the file plus the effective FP_SCAND_* values
    problems: tuple    # (line, text) the config parser skipped


def load(config_path, overrides, required=False) -> Settings:
    """The effective settings: defaults < config file < overrides (from the command
    line, FP_SCAND_* keys). A missing config file is fine unless `required`."""
    values, problems = read_config(config_path, required)
    raw = dict(values)
    for key, default in DEFAULTS.items():
        raw.setdefault(key, default)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    if not raw["FP_SCAND_TMPDIR"]:
        raw["FP_SCAND_TMPDIR"] = values.get("FP_QMAIL_TMPDIR") or CLIENT_DEFAULTS["FP_QMAIL_TMPDIR"]
    settings = Settings(
        listen=_listen(raw, "FP_SCAND_LISTEN"),
        clients=tuple(words(raw, "FP_SCAND_CLIENTS")),
        engines=tuple(raw["FP_SCAND_ENGINES"].split()),
        policy=_optional_path(raw, "FP_SCAND_POLICY"),
        tmpdir=_path(raw, "FP_SCAND_TMPDIR"),
        workers=number(raw, "FP_SCAND_WORKERS", 1, 1024, int),
        queue=number(raw, "FP_SCAND_QUEUE", 0, 100000, int),
        connections=number(raw, "FP_SCAND_CONNECTIONS", 1, 1000000, int),
        peer_connections=number(raw, "FP_SCAND_PEER_CONNECTIONS", 1, 1000000, int),
        request_memory=number(raw, "FP_SCAND_REQUEST_MEMORY", 1, 1 << 20, int) << 20,
        timeout=number(raw, "FP_SCAND_TIMEOUT", 1, 86400),
        quarantine=_optional_path(raw, "FP_SCAND_QUARANTINE"),
        quarantine_spam=_flag(raw, "FP_SCAND_QUARANTINE_SPAM"),
        backup=_optional_path(raw, "FP_SCAND_BACKUP"),
        janitor_interval=number(raw, "FP_SCAND_JANITOR_INTERVAL", 0.1, 86400),
        stale_age=number(raw, "FP_SCAND_STALE_AGE", 1, 86400 * 30),
        socket_mode=_mode(raw, "FP_SCAND_SOCKET_MODE"),
        loglevel=number(raw, "FP_SCAND_LOGLEVEL", 0, 7, int),
        raw=raw,
        problems=tuple(problems),
    )
    if not settings.engines:
        raise SettingsError("FP_SCAND_ENGINES: no engine given")
    raw.setdefault("FP_QMAIL_TIMEOUT", CLIENT_DEFAULTS["FP_QMAIL_TIMEOUT"])
    client_timeout = number(raw, "FP_QMAIL_TIMEOUT", 0.001, 86400)
    if settings.stale_age <= max(settings.timeout, client_timeout):
        raise SettingsError(
            f"FP_SCAND_STALE_AGE={raw['FP_SCAND_STALE_AGE']} must exceed the longest scan: "
            f"FP_SCAND_TIMEOUT={settings.timeout:g} and FP_QMAIL_TIMEOUT={client_timeout:g}")
    return settings


def read_config(path, required):
    """(values, problems) of the sh-syntax config file; ({}, []) if it is absent."""
    try:
        return shconf.read(path)
    except FileNotFoundError:
        if required:
            raise SettingsError(f"{path}: no such file") from None
        return {}, []
    except OSError as e:
        raise SettingsError(f"{path}: cannot read: {e.strerror}") from None
    except ValueError as e:
        raise SettingsError(f"{path}: {e}") from None


def number(raw, key, low, high, kind=float, default=None):
    """raw[key] as a number between low and high; default when it is unset or empty
    and a default is given."""
    text = raw.get(key, "").strip()
    if not text and default is not None:
        return default
    try:
        return values.number(text, low, high, kind)
    except ValueError as e:
        raise SettingsError(f"{key}={values.printable(text, 100)!r}: {e}") from None


def words(raw, key):
    """raw[key] split on commas and white space (empty items dropped)."""
    return [w for w in re.split(r"[\s,]+", raw.get(key, "")) if w]


def _mode(raw, key):
    text = raw[key].strip()
    try:
        value = int(text, 8)
    except ValueError:
        raise SettingsError(f"{key}={text!r}: not an octal mode like 0660") from None
    if not 0 <= value <= 0o777:
        raise SettingsError(f"{key}={text!r}: not a permission mode")
    return value


def _flag(raw, key):
    try:
        return values.flag(raw[key].strip())
    except ValueError as e:
        raise SettingsError(f"{key}={values.printable(raw[key], 100)!r}: {e}") from None


def _path(raw, key):
    try:
        return values.absolute_path(raw[key])
    except ValueError as e:
        raise SettingsError(f"{key}={values.printable(raw[key], 100)!r}: {e}") from None


def _optional_path(raw, key):
    return _path(raw, key) if raw[key] else ""


def _listen(raw, key):
    """One or more endpoints, each checked; duplicates are a mistake."""
    endpoints = words(raw, key)
    if not endpoints:
        raise SettingsError(f"{key}: no address given")
    for value in endpoints:
        try:
            values.endpoint(value, listen=True)
        except ValueError as e:
            raise SettingsError(f"{key}={values.printable(value, 100)!r}: {e}") from None
    if len(set(endpoints)) != len(endpoints):
        raise SettingsError(f"{key}: an address is given twice")
    return tuple(endpoints)
