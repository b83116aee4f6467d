"""The clamd engine against a real, private clamd (unix socket and TCP)."""

import io
import os
import re
import socket
import tempfile
import threading

import pytest

from clamd_fixtures import HDB_FILE, MAIL_MARKER, MARKER, STREAM_MAX, TESTFILE_THREAT, TESTFILES, Clamd
from fpqmail.scand.engines import EngineError, make_engine
from fpqmail.scand.examine import examine
from mime_corpus import (CRLF, EICAR, check_output, corpus, leaf, message, multipart, realistic, rfc822,
                         text_and_attachment)

CORPUS = corpus()


def file_of(data):
    f = tempfile.TemporaryFile()
    f.write(data)
    f.flush()
    return f


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["unix", "tcp"])
def engine(request, clamd):
    return make_engine(clamd.unix_spec if request.param == "unix" else clamd.tcp_spec, {})


def test_ping_and_verdicts(engine):
    engine.ping()
    assert engine.scan(b"nothing to see") == []
    found = engine.scan(b"prefix " + EICAR + b" suffix")
    assert len(found) == 1 and found[0].endswith(".UNOFFICIAL"), "names are reported as clamd gives them"
    assert engine.scan(MARKER) == ["Fpqmail-Test-Marker.UNOFFICIAL"]
    assert engine.scan(HDB_FILE) == ["Fpqmail-Test-Md5.UNOFFICIAL"]
    assert engine.scan(HDB_FILE + b"x") == []


def test_fildes_passes_the_descriptor(clamd):
    # The data argument is deliberately empty: only clamd reading the descriptor can
    # find the EICAR string, and only over the unix socket.
    with file_of(b"head " + EICAR) as f:
        assert make_engine(clamd.unix_spec, {}).scan(b"", fd=f.fileno()) == ["Fpqmail-Test-Eicar.UNOFFICIAL"]
        assert make_engine(clamd.tcp_spec, {}).scan(b"", fd=f.fileno()) == []


def test_write_only_descriptor_and_pipe_are_streamed(clamd, tmp_path):
    # clamd would answer OK for a write-only descriptor and an error for a pipe.
    engine = make_engine(clamd.unix_spec, {})
    path = tmp_path / "msg"
    path.write_bytes(EICAR)
    fd = os.open(path, os.O_WRONLY)
    try:
        assert engine.scan(EICAR, fd=fd) == ["Fpqmail-Test-Eicar.UNOFFICIAL"]
    finally:
        os.close(fd)
    r, w = os.pipe()
    try:
        os.write(w, EICAR)
        assert engine.scan(EICAR, fd=r) == ["Fpqmail-Test-Eicar.UNOFFICIAL"]
    finally:
        os.close(r)
        os.close(w)


def test_stream_over_limit_is_an_error_not_clean(clamd):
    engine = make_engine(clamd.tcp_spec, {})  # (over the unix socket no object is streamed)
    big = b"a" * (STREAM_MAX + 1)
    with pytest.raises(EngineError, match="size limit exceeded"):
        engine.scan(big)
    assert engine.scan(b"a" * STREAM_MAX) == [], "the limit is inclusive"
    assert make_engine(clamd.unix_spec, {}).scan(big + EICAR) == ["Fpqmail-Test-Eicar.UNOFFICIAL"]


@pytest.mark.parametrize("encoding", ["base64", "8bit"])
def test_a_big_part_goes_as_a_descriptor_on_unix_and_meets_the_stream_limit_on_tcp(clamd, encoding):
    # The attachment is over clamd's StreamMaxLength: over the unix socket clamd reads it
    # from a memfd itself (FILDES: decoded into one, or copied), over TCP it is streamed.
    message = message_of(leaf(b"b" * (STREAM_MAX + 100_000) + EICAR, CRLF, "application/octet-stream",
                              encoding, "big.bin"))
    result = examine(message, None, [make_engine(clamd.unix_spec, {})])
    assert result.status == "cleaned" and result.threats == ["Fpqmail-Test-Eicar.UNOFFICIAL in big.bin"]
    with pytest.raises(EngineError, match="size limit exceeded"):
        examine(message, None, [make_engine(clamd.tcp_spec, {})])


def message_of(attachment):
    return message(multipart([leaf(b"see the attachment" + CRLF), attachment])).data


@pytest.mark.parametrize("name", sorted(CORPUS))
@pytest.mark.parametrize("transport", ["fildes", "instream"])
def test_corpus(name, transport, clamd):
    built = CORPUS[name]
    engine = make_engine(clamd.unix_spec if transport == "fildes" else clamd.tcp_spec, {})
    with file_of(built.data) as f:
        result = examine(built.data, f.fileno(), [engine])
    out = io.BytesIO()
    result.write(out)
    assert result.status == built.expected_status
    assert result.engines == ["clamd"]
    check_output(out.getvalue(), built, result.status)


def test_zip_attachment_found_and_replaced(clamd):
    built = CORPUS["zip-eicar-crlf"]
    result = examine(built.data, None, [make_engine(clamd.tcp_spec, {})])
    assert result.status == "cleaned"
    assert result.threats == ["Fpqmail-Test-Eicar.UNOFFICIAL in invoice.zip"]


def test_chain_clean_only_if_every_engine_says_so(clamd):
    engines = [make_engine("builtin", {}), make_engine(clamd.unix_spec, {})]
    built = text_and_attachment(HDB_FILE, filename="known.txt")  # only clamd knows it
    result = examine(built.data, None, engines)
    out = io.BytesIO()
    result.write(out)
    assert result.status == "cleaned"
    assert result.engines == ["builtin", "clamd"]
    assert result.threats == ["Fpqmail-Test-Md5.UNOFFICIAL in known.txt"]
    assert out.getvalue().startswith(b"X-Antivirus: scanned by fp-qmail (builtin, clamd); infected:")
    clean = CORPUS["attachment-clean-crlf"]
    result = examine(clean.data, None, engines)
    out = io.BytesIO()
    result.write(out)
    assert out.getvalue() == b"X-Antivirus: scanned by fp-qmail (builtin, clamd)\r\n" + clean.data


def test_engine_down_is_an_error(tmp_path):
    for spec in (f"clamd:{tmp_path}/no.sock", f"clamd:127.0.0.1:{closed_port()}"):
        engine = make_engine(spec, {})
        with pytest.raises(EngineError):
            engine.ping()
        with pytest.raises(EngineError):
            engine.scan(b"x")
        with pytest.raises(EngineError):
            examine(CORPUS["plain-crlf"].data, None, [make_engine("builtin", {}), engine])


def test_stopped_clamd_is_an_error(tmp_path):
    instance = Clamd(str(tmp_path))
    instance.start()
    engine = make_engine(instance.unix_spec, {})
    assert engine.scan(EICAR) == ["Fpqmail-Test-Eicar.UNOFFICIAL"]
    instance.stop()
    with pytest.raises(EngineError, match="clamd: "):
        engine.scan(b"x")


def test_failover(clamd, tmp_path):
    dead_unix, dead_tcp = f"{tmp_path}/no.sock", f"127.0.0.1:{closed_port()}"
    for spec in (f"clamd:{dead_unix},{clamd.tcp_spec[6:]}", f"clamd:{dead_tcp},{clamd.unix_socket}"):
        engine = make_engine(spec, {})
        engine.ping()
        assert engine.scan(EICAR) == ["Fpqmail-Test-Eicar.UNOFFICIAL"]
    with pytest.raises(EngineError) as caught:
        make_engine(f"clamd:{dead_unix},{dead_tcp}", {}).scan(b"x")
    assert dead_unix in str(caught.value) and dead_tcp in str(caught.value), "every endpoint's problem is named"


def test_bad_endpoints_are_value_errors():
    for spec in ("clamd:", "clamd:localhost", "clamd:host:99999", "clamd:relative.sock"):
        with pytest.raises(ValueError):
            make_engine(spec, {})
    make_engine("clamd:[::1]:3310", {})


# ---- what clamd sees (issue 9 section 2) ----------------------------------------------

class CountingProxy:
    """A real proxy in front of clamd (unix socket in, clamd's socket out) that passes
    descriptors on and records, per connection, the commands it saw."""

    def __init__(self, path, upstream):
        self._sessions = []  # (commands, closed Event)
        self._upstream = upstream
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(path)
        self._listener.listen(8)
        self.spec = f"clamd:{path}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            commands, closed = [], threading.Event()
            self._sessions.append((commands, closed))
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(self._upstream)
            threading.Thread(target=self._forward, args=(client, upstream, commands, closed), daemon=True).start()
            threading.Thread(target=self._back, args=(upstream, client), daemon=True).start()

    @property
    def sessions(self):
        """The commands of every connection, once each has been closed by the client."""
        for _, closed in self._sessions:
            assert closed.wait(10)
        return [commands for commands, _ in self._sessions]

    def _forward(self, client, upstream, commands, closed):
        while True:
            data, fds, _, _ = socket.recv_fds(client, 1 << 16, 4)
            if not data:  # the client is done: so is the connection
                client.close()
                upstream.close()
                closed.set()
                return
            commands += [c.decode(errors="replace") for c in re.findall(rb"z([A-Z]{3,10})\0", data)]
            if fds:
                # The descriptor came with the byte sent alone after FILDES (a read may
                # have joined the command to it): pass it on with that last byte.
                upstream.sendall(data[:-1])
                socket.send_fds(upstream, [data[-1:]], fds)
                for fd in fds:
                    os.close(fd)
            else:
                upstream.sendall(data)

    @staticmethod
    def _back(upstream, client):
        try:
            while True:
                data = upstream.recv(1 << 16)
                if not data:
                    client.shutdown(socket.SHUT_WR)
                    return
                client.sendall(data)
        except OSError:
            pass  # closed by _forward meanwhile

    def close(self):
        self._listener.close()


def test_one_connection_per_message_a_session_of_one_command_per_object(clamd, tmp_path):
    proxy = CountingProxy(str(tmp_path / "proxy.sock"), clamd.unix_socket)
    try:
        engine = make_engine(proxy.spec, {})
        big = os.urandom(400_000)  # decoded, bigger than what stays in memory: a memfd
        built = message(multipart([leaf(b"text" + CRLF), leaf(big, CRLF, "application/octet-stream", "base64", "big.bin"),
                                   leaf(b"small", CRLF, "application/octet-stream", "base64", "small.bin")]))
        assert examine(built.data, None, [engine]).status == "clean"
        [commands] = proxy.sessions
        # the bytes around the parts, the text, the attachments: one descriptor each
        assert commands == ["IDSESSION", "FILDES", "FILDES", "FILDES", "FILDES", "END"]
    finally:
        proxy.close()
    proxy = CountingProxy(str(tmp_path / "tcp-is-not-proxied.sock"), clamd.unix_socket)
    try:
        assert examine(built.data, None, [make_engine(clamd.tcp_spec, {})]).status == "clean"
        assert proxy.sessions == []
    finally:
        proxy.close()


@pytest.mark.parametrize("seed", range(120))
def test_realistic_corpus(seed, clamd):
    built = realistic(seed)
    engine = make_engine(clamd.unix_spec if seed % 2 else clamd.tcp_spec, {})
    result = examine(built.data, None, [engine])
    out = io.BytesIO()
    result.write(out)
    assert result.status == built.expected_status
    check_output(out.getvalue(), built, result.status)


@pytest.mark.parametrize("name", sorted(os.listdir(TESTFILES)) if os.path.isdir(TESTFILES) else ["missing"])
def test_every_clamav_testfile_attached_to_mail_is_found(name, clamd):
    if name == "missing":
        pytest.fail(f"{TESTFILES} is missing: run scripts/install-deps (installs clamav-testfiles)")
    with open(os.path.join(TESTFILES, name), "rb") as f:
        data = f.read()
    built = text_and_attachment(data, filename=name)
    result = examine(built.data, None, [make_engine(clamd.unix_spec, {})])
    assert result.status == "cleaned" and result.threats == [f"{TESTFILE_THREAT} in {name}"]


def test_the_testfiles_are_all_there():
    assert len(os.listdir(TESTFILES)) == 44


@pytest.mark.parametrize("encoding", ["7bit", "base64", "quoted-printable"])
def test_eicar_in_a_forwarded_message_in_any_encoding(encoding, clamd):
    inner = message(multipart([leaf(b"inner" + CRLF), leaf(EICAR, CRLF, "application/octet-stream", "base64",
                                                           "inner.com")], boundary="in"), CRLF, b"inner")
    built = message(multipart([leaf(b"forwarding" + CRLF), rfc822(inner, CRLF, encoding)]))
    result = examine(built.data, None, [make_engine(clamd.unix_spec, {})])
    assert result.status == "cleaned"
    assert result.threats == ["Fpqmail-Test-Eicar.UNOFFICIAL in inner.com"]


def test_the_whole_message_goes_too_only_when_asked(clamd, tmp_path):
    proxy = CountingProxy(str(tmp_path / "proxy.sock"), clamd.unix_socket)
    try:
        built = CORPUS["attachment-clean-lf"]
        with file_of(built.data) as f:
            for setting, extra in (("no", []), ("yes", ["FILDES"])):
                engine = make_engine(proxy.spec, {"FP_SCAND_CLAMD_WHOLE_MESSAGE": setting})
                assert examine(built.data, f.fileno(), [engine]).status == "clean"
                assert proxy.sessions[-1] == ["IDSESSION", "FILDES", "FILDES", "FILDES"] + extra + ["END"]
        with pytest.raises(ValueError, match="FP_SCAND_CLAMD_WHOLE_MESSAGE"):
            make_engine(proxy.spec, {"FP_SCAND_CLAMD_WHOLE_MESSAGE": "maybe"})
        # A signature for mail only (target type 4) matches the whole message, never a
        # part: found with the setting, and tied to no part, so the message is infected.
        data = b"Received: from x by y\nFrom: a@b\nTo: c@d\nSubject: mail only\n\nHello,\n" + MAIL_MARKER + b"\n"
        with file_of(data) as f:
            assert examine(data, f.fileno(), [make_engine(proxy.spec, {})]).status == "clean"
            whole = examine(data, f.fileno(), [make_engine(proxy.spec, {"FP_SCAND_CLAMD_WHOLE_MESSAGE": "yes"})])
        assert whole.status == "infected" and whole.threats == ["Fpqmail-Test-Mail-Only.UNOFFICIAL"]
    finally:
        proxy.close()
