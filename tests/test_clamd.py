"""The clamd engine against a real, private clamd (unix socket and TCP)."""

import io
import os
import socket
import tempfile

import pytest

from clamd_fixtures import HDB_FILE, MARKER, STREAM_MAX, Clamd, clamd  # noqa: F401 (fixture)
from fpqmail.scand.engines import EngineError, make_engine
from fpqmail.scand.examine import examine
from mime_corpus import EICAR, check_output, corpus, text_and_attachment

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


def test_stream_over_limit_is_an_error_not_clean(engine):
    big = b"a" * (STREAM_MAX + 1)
    with pytest.raises(EngineError, match="size limit exceeded"):
        engine.scan(big)
    assert engine.scan(b"a" * STREAM_MAX) == [], "the limit is inclusive"


def test_a_big_decoded_part_goes_as_a_descriptor_on_unix_and_meets_the_stream_limit_on_tcp(clamd):
    # Decoded, the attachment is over clamd's StreamMaxLength: over the unix socket it
    # lives in a memfd that clamd reads itself (FILDES), over TCP it must be streamed.
    message = text_and_attachment(b"b" * (STREAM_MAX + 100_000) + EICAR, filename="big.bin").data
    result = examine(message, None, [make_engine(clamd.unix_spec, {})])
    assert result.status == "cleaned" and result.threats == ["Fpqmail-Test-Eicar.UNOFFICIAL in big.bin"]
    with pytest.raises(EngineError, match="size limit exceeded"):
        examine(message, None, [make_engine(clamd.tcp_spec, {})])


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
