"""examine() with the builtin engine over the MIME corpus: verdicts, byte-exactness."""

import hashlib
import io
import mmap
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fpqmail.scand.engines import EngineError, make_engine
from fpqmail.scand.examine import LimitExceeded, examine
from mime_corpus import (CRLF, EICAR, LF, Built, check_output, corpus, leaf, message, multipart,
                         split_header, text_and_attachment, zip_of)

CORPUS = corpus()


def run(built, engines, fd=None):
    result = examine(built.data if isinstance(built, Built) else built, fd, engines)
    out = io.BytesIO()
    assert result.write(out) == len(out.getvalue())
    return result, out.getvalue()


@pytest.fixture(scope="module")
def builtin():
    return make_engine("builtin", {})


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_verdict_and_bytes(name, builtin):
    built = CORPUS[name]
    result, output = run(built, [builtin])
    assert result.status == built.expected_status
    assert result.engines == ["builtin"]
    assert bool(result.threats) == (result.status != "clean")
    assert all(" " <= c <= "~" for t in result.threats for c in t)
    notices = check_output(output, built, result.status)
    assert len(notices) == len(built.spans) if result.status == "cleaned" else not notices


def test_clean_output_is_header_plus_original(builtin):
    built = CORPUS["attachment-clean-crlf"]
    _, output = run(built, [builtin])
    assert output == b"X-Antivirus: scanned by fp-qmail (builtin)\r\n" + built.data
    built = CORPUS["plain-lf"]
    _, output = run(built, [builtin])
    assert output == b"X-Antivirus: scanned by fp-qmail (builtin)\n" + built.data


@pytest.mark.parametrize("payload, status", [(b"harmless", "clean"), (EICAR, "infected")])
def test_a_boundary_with_non_ascii_bytes_makes_one_unsplittable_leaf(builtin, payload, status):
    # Found by the full fuzz run: such a boundary crashed the parser (the daemon then
    # answered ERROR for that message forever). It is not usable: the body is one leaf.
    data = (b"Subject: x\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\xff\"b\"\n\n"
            b"--b\nContent-Type: text/plain\n\n" + payload + b"\n--b--\n")
    result = examine(data, None, [builtin])
    assert result.status == status
    out = io.BytesIO()
    result.write(out)
    if status == "clean":
        assert out.getvalue() == b"X-Antivirus: scanned by fp-qmail (builtin)\n" + data


def test_cleaned_header_names_threat_and_file(builtin):
    result, output = run(CORPUS["zip-eicar-crlf"], [builtin])
    assert result.threats == ["EICAR-Test-File in invoice.zip"]
    header, _ = split_header(output)
    assert header == (b"X-Antivirus: scanned by fp-qmail (builtin); infected:\r\n"
                      b"\tEICAR-Test-File in invoice.zip, removed\r\n")
    assert b'"invoice.zip": it contained EICAR-Test-File' in output


def test_notice_takes_the_line_ending_of_the_part_it_replaces(builtin):
    for name, newline in (("mixed-line-endings", b"\n"), ("attachment-eicar-crlf", b"\r\n"),
                          ("attachment-eicar-lf", b"\n")):
        built = CORPUS[name]
        result, output = run(built, [builtin])
        [notice] = check_output(output, built, result.status)
        assert notice.count(b"\n") == notice.count(newline) >= 4, (name, notice)


def test_infected_header_has_no_removed(builtin):
    result, output = run(CORPUS["single-eicar-lf"], [builtin])
    assert result.status == "infected"
    assert split_header(output)[0] == b"X-Antivirus: scanned by fp-qmail (builtin); infected: EICAR-Test-File\n"


def test_many_threats_fold_the_header(builtin):
    parts = [leaf(EICAR, CRLF, "application/octet-stream", "base64", f"attachment-number-{k}.com") for k in range(8)]
    result, output = run(message(multipart(parts)), [builtin])
    assert result.status == "cleaned" and len(result.threats) == 8
    header, _ = split_header(output)
    lines = header.split(b"\r\n")[:-1]
    assert len(lines) > 2 and all(len(line) <= 78 for line in lines)
    assert all(line.startswith(b"\t") for line in lines[1:])


@pytest.mark.parametrize("kind", ["bytes", "memoryview", "mmap"])
def test_input_kinds_give_the_same_output(kind, builtin):
    built = CORPUS["two-infected"]
    _, expected = run(built, [builtin])
    with tempfile.TemporaryFile() as f:
        f.write(built.data)
        f.flush()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            data = {"bytes": built.data, "memoryview": memoryview(built.data), "mmap": mapped}[kind]
            result = examine(data, f.fileno(), [builtin])
            out = io.BytesIO()
            result.write(out)
            del result  # the mmap closes only when nothing refers to it
    assert out.getvalue() == expected


def test_banned_names_none_by_default(builtin):
    result, _ = run(text_and_attachment(b"MZ program", filename="setup.exe"), [builtin])
    assert result.status == "clean"


def test_banned_names_attachment_and_zip_member():
    engine = make_engine("builtin", {"FP_SCAND_BANNED_NAMES": "*.exe, *.scr"})
    built = text_and_attachment(b"MZ program", filename="Setup.EXE")
    result, output = run(built, [engine])
    assert result.status == "cleaned"
    assert result.threats == ["Banned-File-Name(*.exe) in Setup.EXE"]
    check_output(output, Built(built.data, built.spans or _only_attachment_span(built)), "cleaned")
    result, _ = run(text_and_attachment(zip_of({"docs/screen.scr": b"x"}), filename="a.zip"), [engine])
    assert result.threats == ["Banned-File-Name(*.scr) in a.zip"]
    result, _ = run(text_and_attachment(b"fine", filename="notes.txt"), [engine])
    assert result.status == "clean"


def _only_attachment_span(built):
    """The span of the second body part of a text_and_attachment message."""
    delimiter = b"--=_fpq_boundary_1\r\n"
    start = built.data.index(delimiter, built.data.index(delimiter) + 1) + len(delimiter)
    return [(start, built.data.index(b"\r\n--=_fpq_boundary_1--"))]


def test_sha256_list_and_reload(tmp_path):
    bad, worse = b"a known bad file\n" * 10, b"another bad one"
    digests = tmp_path / "bad.sha256"
    digests.write_text(f"# known bad\n{hashlib.sha256(bad).hexdigest()}  Trojan.Test\n")
    engine = make_engine("builtin", {"FP_SCAND_SHA256_FILE": str(digests)})
    assert engine.scan(bad) == ["Trojan.Test"]
    assert run(text_and_attachment(bad, filename="x.doc"), [engine])[0].threats == ["Trojan.Test in x.doc"]
    assert engine.scan(zip_of({"in.doc": bad})) == ["Trojan.Test"]
    assert engine.scan(worse) == []
    digests.write_text(f"{hashlib.sha256(worse).hexdigest().upper()}\n")
    engine.reload()
    assert engine.scan(worse) == ["Known-Bad-SHA256"] and engine.scan(bad) == []


def test_sha256_file_problems_are_engine_errors(tmp_path):
    with pytest.raises(EngineError, match="cannot read"):
        make_engine("builtin", {"FP_SCAND_SHA256_FILE": str(tmp_path / "missing")})
    bad = tmp_path / "bad"
    bad.write_text("not a digest\n")
    with pytest.raises(EngineError, match=":1: not a SHA-256"):
        make_engine("builtin", {"FP_SCAND_SHA256_FILE": str(bad)})
    good = tmp_path / "good"
    good.write_text(hashlib.sha256(b"x").hexdigest() + "\n")
    engine = make_engine("builtin", {"FP_SCAND_SHA256_FILE": str(good)})
    good.write_text("garbage\n")
    with pytest.raises(EngineError):
        engine.reload()
    assert engine.scan(b"x") == ["Known-Bad-SHA256"], "a failed reload keeps the old list"


def test_zip_limits():
    engine = make_engine("builtin", {"FP_SCAND_ZIP_MAX_SIZE": "1000000", "FP_SCAND_ZIP_MAX_FILES": "5",
                                     "FP_SCAND_ZIP_MAX_DEPTH": "2"})
    bomb = zip_of({"zeros.bin": bytes(5_000_000)})
    assert engine.scan(bomb) == ["Zip-Limit-Exceeded"]
    assert engine.scan(zip_of({f"f{k}": b"x" for k in range(6)})) == ["Zip-Limit-Exceeded"]
    assert engine.scan(zip_of({f"f{k}": b"x" for k in range(5)})) == []
    assert engine.scan(zip_of({"a.zip": zip_of({"e.com": EICAR})})) == ["EICAR-Test-File"]
    assert engine.scan(zip_of({"a.zip": zip_of({"b.zip": zip_of({"e.com": b"x"})})})) == ["Zip-Limit-Exceeded"]
    ratio = make_engine("builtin", {"FP_SCAND_ZIP_MAX_RATIO": "50"})
    assert ratio.scan(zip_of({"zeros.bin": bytes(2_000_000)})) == ["Zip-Limit-Exceeded"]
    assert ratio.scan(zip_of({"small.bin": bytes(500_000)})) == [], "small members are not ratio-checked"
    result, _ = run(text_and_attachment(bomb, filename="bomb.zip"), [engine])
    assert result.status == "cleaned" and result.threats == ["Zip-Limit-Exceeded in bomb.zip"]


def test_broken_zip_is_scanned_as_bytes(builtin):
    broken = zip_of({"e.com": b"harmless"})[:40]
    assert builtin.scan(broken) == []
    assert builtin.scan(broken + EICAR) == ["EICAR-Test-File"]


def test_nesting_past_the_limit_is_refused(builtin):
    entity = leaf(b"innermost, clean" + CRLF)
    for depth in range(60):
        entity = multipart([entity], boundary=f"=_fpq_level_{depth}")
    with pytest.raises(LimitExceeded, match=r"nested more than 50 levels deep \(#5\.6\.0\)"):
        examine(message(entity).data, None, [builtin])
    entity = leaf(b"innermost, clean" + CRLF)
    for depth in range(40):
        entity = multipart([entity], boundary=f"=_fpq_level_{depth}")
    assert run(message(entity), [builtin])[0].status == "clean"


def test_threat_left_after_removal_makes_it_infected(builtin):
    # The attachment is removable, but the same threat also sits in a header: removing
    # the part does not make the message clean, and both findings are named.
    built = text_and_attachment(EICAR, filename="e.com")
    data = built.data.replace(b"Subject: test", b"Subject: " + EICAR)
    result, output = run(data, [builtin])
    assert result.status == "infected"
    assert result.threats == ["EICAR-Test-File in e.com", "EICAR-Test-File"]
    assert split_header(output)[1] == data


def test_bad_settings_are_value_errors():
    with pytest.raises(ValueError, match="FP_SCAND_ZIP_MAX_SIZE"):
        make_engine("builtin", {"FP_SCAND_ZIP_MAX_SIZE": "lots"})
    with pytest.raises(ValueError, match="unknown engine"):
        make_engine("sophos", {})


# Property: rewriting never drops or changes a part that was not infected.
_SAFE = st.binary(max_size=300).map(lambda b: bytes(c for c in b if c not in b"-=\r\n") or b"x")


@st.composite
def _entity(draw, nl, depth=0):
    if depth < 3 and draw(st.booleans()):
        children = draw(st.lists(_entity(nl, depth + 1), min_size=1, max_size=4))
        return multipart(children, nl, draw(st.sampled_from(["mixed", "alternative", "related"])),
                         f"=_fpq_{depth}_{draw(st.integers(0, 10 ** 6))}",
                         preamble=draw(st.sampled_from([b"", b"preamble text"])))
    infected = draw(st.integers(0, 3)) == 0
    body = draw(_SAFE)
    if infected:
        body = body[: len(body) // 2] + EICAR + body[len(body) // 2:]
    encoding = draw(st.sampled_from(["7bit", "8bit", "base64", "quoted-printable"]))
    if draw(st.booleans()):
        return leaf(zip_of({"member.bin": body}), nl, "application/zip", "base64", "archive.zip")
    return leaf(body, nl, "application/octet-stream", encoding, draw(st.sampled_from([None, "file.bin"])))


@st.composite
def _message(draw):
    nl = draw(st.sampled_from([CRLF, LF]))
    entity = draw(_entity(nl))
    return message(entity, nl)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_message())
def test_property_only_infected_parts_change(built):
    engine = make_engine("builtin", {})
    result, output = run(built, [engine])
    assert result.status == built.expected_status
    check_output(output, built, result.status)


@st.composite
def _mangled(draw):
    """A corpus message with a few bytes inserted, deleted or changed: broken MIME."""
    data = bytearray(draw(st.sampled_from(sorted(CORPUS.items())))[1].data)
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["insert", "delete", "replace"]))
        junk = draw(st.sampled_from([b"\r\n", b"\n", b"--", b"\"", b";", b"=", b"\x00", b"\xff", b"Content-Type: multipart/mixed; boundary=x\n", b"--x\n"]))
        if action == "insert":
            data[pos:pos] = junk
        elif action == "delete":
            del data[pos:pos + len(junk)]
        else:
            data[pos:pos + len(junk)] = junk
    return bytes(data)


@settings(max_examples=200, deadline=None)
@given(_mangled())
def test_property_broken_mime_never_crashes_and_clean_stays_exact(data):
    engine = make_engine("builtin", {})
    result, output = run(data, [engine])
    assert result.status in ("clean", "cleaned", "infected")
    header, rest = split_header(output)
    if result.status == "clean":
        assert rest == data
    if EICAR in data:
        assert result.status != "clean"
    if result.status != "infected":
        assert EICAR not in rest, "what is delivered never carries the threat"
