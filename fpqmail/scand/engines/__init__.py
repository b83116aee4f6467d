"""Scanning engines behind one small interface.

An engine judges objects (the decoded MIME parts of a message, and the bytes around
them) and names the threats it found in each. examine() decides what every engine sees
and what to do with a message; the engines only judge bytes, all objects of one message
in one go (one connection to a scanning daemon). Engine modules are imported lazily so a
daemon that uses only the builtin engine never loads the socket code of the others.
"""

from typing import NamedTuple


class ScanObject(NamedTuple):
    """One object to judge."""
    data: object            # bytes-like: bytes, memoryview or a read-only mmap
    fd: int | None = None   # a readable regular file holding exactly data from offset 0
    filename: str | None = None  # the attachment's file name, if known
    owner: object = None    # examine()'s: the MIME part a threat found here incriminates


class EngineError(Exception):
    """The engine could not give a verdict (down, timeout, garbage reply, size limit).

    Never a clean verdict: whoever catches it must not deliver the message as scanned.
    """


class Engine:
    """The interface every engine implements."""

    #: short name, used in the X-Antivirus header and the reply's Engines header
    name = "engine"
    #: True if the engine is also to judge the whole raw message, besides its pieces
    #: (for heuristics that need the mail as a whole: clamd's, if the admin asks)
    whole_message = False

    def scan_objects(self, objects, deadline=None) -> list[list[str]]:
        """The names of the threats in each of objects (ScanObject), in order ([] =
        clean). Raises EngineError, or deadline.TimeLimit once the deadline (a
        time.monotonic() value, None for none) has passed: no blocking call of an
        engine waits past it."""
        raise NotImplementedError

    def scan(self, data, fd=None, filename=None) -> list[str]:
        """The threats in one object (see ScanObject)."""
        return self.scan_objects([ScanObject(data, fd, filename)])[0]

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
