"""Setting values and text from outside: one parser per kind, shared by fp-qmail (the
per-message program) and fpqmail-scand.

Imports only modules built into the interpreter: fp-qmail pays for every import on
every message. Every parser raises ValueError with a short reason; the caller names the
key and maps it to its own error (fp-qmail: exit 55; the daemon: refuse to start).
"""
import _socket

TRUE_WORDS = ("yes", "1", "true")
FALSE_WORDS = ("no", "0", "false")
UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the final NUL

_CONTROLS = bytes.maketrans(bytes(range(32)) + b"\x7f", b"?" * 33)


def printable(data, limit=None):
    """Text from outside (bytes or str) made one line of printable ASCII: every other
    character becomes '?'. Past `limit` characters it is cut and ends in '...'."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = bytes(data).decode("latin-1")
    elif not isinstance(data, str):
        data = str(data)
    if limit is not None and len(data) > limit:
        data = data[:max(limit - 3, 0)] + "..."
    return data.encode("ascii", "replace").translate(_CONTROLS).decode("ascii")


def is_printable_ascii(text):
    return text.isascii() and text.isprintable()


def flag(text):
    """yes|1|true or no|0|false."""
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ValueError("must be one of " + "|".join(TRUE_WORDS + FALSE_WORDS))


def number(text, low, high, kind=float):
    """A plain decimal number (ASCII digits, for float at most one '.'; no sign, no
    exponent, no '_') between low and high inclusive, as int or float."""
    digits = text.strip()
    if kind is float:
        digits = digits.replace(".", "", 1)
    if not digits or len(digits) > 20 or not digits.isascii() or not digits.isdigit():
        raise ValueError("not a decimal number")
    value = kind(text.strip())
    if not low <= value <= high:
        raise ValueError("must be between %g and %g" % (low, high))
    return value


def absolute_path(text):
    """An absolute path of printable ASCII, without its trailing slashes."""
    if not text.startswith("/") or not is_printable_ascii(text):
        raise ValueError("must be an absolute path of printable ASCII")
    return text.rstrip("/") or "/"


def endpoint(text, listen=False):
    """'/unix/socket' -> (AF_UNIX, path); 'host:port' or '[ipv6]:port' ->
    (AF_INET or AF_INET6, (host, port)). Port 0 (any free port) only to listen on."""
    text = text.strip()
    if text.startswith("/"):
        if not is_printable_ascii(text) or len(text) > UNIX_PATH_MAX:
            raise ValueError("a unix socket path must be printable ASCII of at most %d bytes"
                             % UNIX_PATH_MAX)
        return _socket.AF_UNIX, text
    host, sep, port = text.rpartition(":")
    family = _socket.AF_INET
    if host.startswith("[") and host.endswith("]"):
        family, host = _socket.AF_INET6, host[1:-1]
    if (not sep or not host or " " in host or not is_printable_ascii(host) or not port.isascii()
            or not port.isdigit() or len(port) > 5 or not (listen or int(port)) or int(port) > 65535):
        raise ValueError("expected host:port, [ipv6]:port or an absolute unix socket path")
    return family, (host, int(port))


def endpoints(text):
    """A comma-separated list of endpoints: [(family, address, the entry as written)]."""
    return [(*endpoint(entry), entry.strip()) for entry in text.split(",")]
