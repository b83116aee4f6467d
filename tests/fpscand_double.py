#!/usr/bin/env python3
"""A strict stand-in for F-PROT 6's fpscand, which cannot be had any more.

A real TCP server process that follows the documented protocol
(../shared/reference/f-prot.md) and rejects anything else:

  request   SCAN [--opt[=val] ...] STREAM <name> SIZE <n>\\n  then exactly n bytes
            SCAN [--opt[=val] ...] FILE </absolute/path>\\n
            QUIT\\n                                         (ends the session)
  reply     one line per scanned object, `<code> <<text>> <object>\\n`; zip members
            first, as `<object>-><member>`, then the line for the object itself.

Lines end in a bare LF; a CR, an unknown command, a short stream or a stream over
--max-size is a protocol violation: written to --violations (one line each, so a test
can assert there were none) and the connection is closed without a reply.

Verdicts: the EICAR string -> `1 <infected: EICAR_Test_File>`; SUSPICIOUS_MARK ->
`2 <suspicious: Heuristic_Test>`; IOERROR_MARK -> `16 <I/O error>`; else `0 <clean>`.
--mode garbage|silent|close makes every request fail in that way (a broken daemon).
--sessions FILE: one line per connection, when it ends: the names of the streams it
scanned, space-separated (a client's one connection per message shows there).
Prints `PORT <n>` on stdout once it listens.
"""

import argparse
import io
import re
import socketserver
import sys
import threading
import zipfile

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
SUSPICIOUS_MARK = b"FPSCAND-DOUBLE-SUSPICIOUS"
IOERROR_MARK = b"FPSCAND-DOUBLE-IOERROR"
OPTION = r"--[a-z][a-z0-9-]*(?:=\S+)?"
SCAN_STREAM = re.compile(rf"SCAN(?: {OPTION})* STREAM (\S+) SIZE (0|[1-9][0-9]{{0,9}})")
SCAN_FILE = re.compile(rf"SCAN(?: {OPTION})* FILE (/\S*)")
MAX_LINE = 4096


class Violation(Exception):
    pass


def verdict(data):
    if EICAR in data:
        return 1, "infected: EICAR_Test_File"
    if SUSPICIOUS_MARK in data:
        return 2, "suspicious: Heuristic_Test"
    if IOERROR_MARK in data:
        return 16, "I/O error"
    return 0, "clean"


def result_lines(data, name):
    """Member lines first, then the object's own line carrying every member's bits."""
    lines, found = [], []
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                for info in archive.infolist():
                    code, text = verdict(archive.read(info))
                    lines.append(f"{code} <{text}> {name}->{info.filename}\n")
                    if code:
                        found.append((code, text))
        except zipfile.BadZipFile:
            pass
    code, text = verdict(data)
    if not code and found:
        text = found[0][1]
    for member_code, _ in found:
        code |= member_code
    lines.append(f"{code} <{text}> {name}\n")
    return lines


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        self.streams = []
        try:
            while self.one_request():
                pass
        except Violation as e:
            self.server.violation(str(e))
        self.server.session(self.streams)

    def one_request(self):
        line = self.rfile.readline(MAX_LINE + 1)
        if not line:
            return False  # the client closed without QUIT: allowed
        if not line.endswith(b"\n") or len(line) > MAX_LINE:
            raise Violation(f"unterminated or overlong line {line[:80]!r}")
        text = line[:-1].decode("ascii", "replace")
        if "\r" in text:
            raise Violation(f"CR in request line {line[:80]!r}")
        if text == "QUIT":
            return False
        stream, file = SCAN_STREAM.fullmatch(text), SCAN_FILE.fullmatch(text)
        if stream:
            name, size = stream.group(1), int(stream.group(2))
            if size > self.server.max_size:
                raise Violation(f"stream of {size} bytes over the limit {self.server.max_size}")
            data = self.rfile.read(size)
            if len(data) != size:
                raise Violation(f"stream {name}: {len(data)} of {size} bytes before EOF")
            self.streams.append(name)
        elif file:
            name = file.group(1)
            try:
                with open(name, "rb") as f:
                    data = f.read()
            except OSError:
                self.wfile.write(f"16 <I/O error> {name}\n".encode())
                return True
        else:
            raise Violation(f"unknown request {text[:80]!r}")
        mode = self.server.mode
        if mode == "close":
            return False
        if mode == "silent":
            self.rfile.read()  # until the client gives up
            return False
        if mode == "garbage":
            self.wfile.write(b"HTTP/1.0 400 Bad Request\n")
            return True
        self.wfile.write("".join(result_lines(data, name)).encode("utf-8"))
        return True


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port, mode, max_size, violations, sessions):
        super().__init__(("127.0.0.1", port), Handler)
        self.mode, self.max_size, self.violations_path = mode, max_size, violations
        self.sessions_path = sessions
        self.lock = threading.Lock()

    def session(self, streams):
        if self.sessions_path:
            with self.lock, open(self.sessions_path, "a") as f:
                f.write(" ".join(streams) + "\n")

    def violation(self, text):
        print(f"fpscand_double: protocol violation: {text}", file=sys.stderr, flush=True)
        if self.violations_path:
            with self.lock, open(self.violations_path, "a") as f:
                f.write(text + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--mode", choices=["normal", "garbage", "silent", "close"], default="normal")
    parser.add_argument("--max-size", type=int, default=10 << 20)
    parser.add_argument("--violations")
    parser.add_argument("--sessions")
    args = parser.parse_args()
    with Server(args.port, args.mode, args.max_size, args.violations, args.sessions) as server:
        print(f"PORT {server.server_address[1]}", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
