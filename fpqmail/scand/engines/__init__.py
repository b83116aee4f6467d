"""Scanning engines behind one small interface.

An engine looks at one object (a whole message, or one decoded MIME part) and names the
threats it found. examine() decides what to do with a message; the engines only judge
bytes. Engine modules are imported lazily so a daemon that uses only the builtin engine
never loads the socket code of the others.
"""


class EngineError(Exception):
    """The engine could not give a verdict (down, timeout, garbage reply, size limit).

    Never a clean verdict: whoever catches it must not deliver the message as scanned.
    """


class Engine:
    """The interface every engine implements."""

    #: short name, used in the X-Antivirus header and the reply's Engines header
    name = "engine"
    #: True if scan() of a whole raw RFC 5322 message decodes its MIME parts itself
    #: (clamd does). examine() then sends a clean message once, whole; otherwise it
    #: decodes the parts and sends each one.
    decodes_mail = False

    def scan(self, data, fd=None, filename=None) -> list[str]:
        """Return the names of the threats in data ([] = clean); raise EngineError.

        data: bytes-like (bytes, memoryview or mmap) of the object to scan.
        fd: optional readable descriptor holding the same bytes from offset 0.
        filename: the attachment's file name, if known.
        """
        raise NotImplementedError

    def ping(self) -> None:
        """Health check: return if the engine can scan now, else raise EngineError."""

    def reload(self) -> None:
        """Re-read signatures and ban lists (on SIGHUP); raise EngineError on failure
        (the engine then keeps what it had)."""

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"


def make_engine(spec: str, settings: dict[str, str]) -> Engine:
    """Build an engine from a --engine SPEC and the daemon's FP_SCAND_* settings.

    spec: "builtin" | "clamd:ENDPOINT[,ENDPOINT...]" | "fpscand:HOST:PORT[,HOST:PORT...]",
    where a clamd ENDPOINT is an absolute unix socket path or host:port ([v6]:port).
    Raises ValueError for a bad spec or setting (a configuration mistake) and
    EngineError when a file the engine needs cannot be read.
    """
    kind, _, arg = spec.partition(":")
    if kind == "builtin" and not arg:
        from .builtin import BuiltinEngine
        return BuiltinEngine(settings)
    if kind == "clamd" and arg:
        from .clamd import ClamdEngine
        return ClamdEngine(arg, settings)
    if kind == "fpscand" and arg:
        from .fpscand import FpscandEngine
        return FpscandEngine(arg, settings)
    raise ValueError(f"unknown engine {spec!r} (expected builtin, clamd:ENDPOINT or fpscand:HOST:PORT)")
