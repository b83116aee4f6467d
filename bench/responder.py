"""The benchmarks' instant-clean scanner: speaks docs/protocol.md, scans nothing.

For each request it writes one header line and the message (In) into Out with
copy_file_range (no copy through user space) and answers CLEAN with the Size it
wrote, so what a benchmark measures with it is the client's cost, not a scan's.
One thread per connection, as many at a time as clients connect.

Usage: python3 responder.py HOST:PORT   (prints "ready" on stdout once listening)
"""
import os
import socket
import sys
import threading

HEADER = b"X-Antivirus: bench responder, not scanned\n"


def read_request(conn):
    data = b""
    while b"\n\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise ValueError("request ended before the blank line")
        data += chunk
    head, _, rest = data.partition(b"\n\n")
    fields = dict(line.split(": ", 1) for line in head.decode().split("\n")[1:])
    while len(rest) < int(fields["Envelope"]):
        chunk = conn.recv(65536)
        if not chunk:
            raise ValueError("envelope cut short")
        rest += chunk
    return fields


def answer(conn):
    with conn:
        try:
            fields = read_request(conn)
            src = os.open(fields["In"], os.O_RDONLY | os.O_NOFOLLOW)
            dst = os.open(fields["Out"], os.O_WRONLY | os.O_NOFOLLOW)
            try:
                written = os.write(dst, HEADER)
                while n := os.copy_file_range(src, dst, 1 << 24):
                    written += n
            finally:
                os.close(src)
                os.close(dst)
            conn.sendall(b"FPQMAIL/1 CLEAN\nSize: %d\nEngines: none\n\n" % written)
        except (OSError, ValueError, KeyError) as e:
            conn.sendall(b"FPQMAIL/1 ERROR\nReason: %s\n\n" % str(e).encode("ascii", "replace"))


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    server = socket.create_server((host, int(port)), backlog=128)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=answer, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
